"""GPTQ quantization of one weight matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptqkit import _arrays, _gpu
from gptqkit._native import _C

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantizeResult:
    """The outcome of :func:`quantize_weight` for a weight ``W [N, K]``.

    Attributes:
        codes: uint8 ``[N, K]`` integer codes in the original column order.
        scales: float32 ``[G, N]`` grid step per group and output channel.
        zeros: int32 ``[G, N]`` true zero points (checkpoints in the v1 layout
            store ``zero - 1``; :func:`gptqkit.pack` handles that).
        g_idx: int32 ``[K]`` group of every input column.
        perm: int64 ``[K]`` order in which columns were quantized (identity
            unless ``desc_act`` or ``act_group_aware``).
        loss: ``sum((w - q)^2 / d^2) / 2`` over all entries, the figure the
            reference GPTQ prints per layer.
        damp_used: damping actually applied, as a fraction of ``mean(diag H)``
            (larger than requested when the Hessian needed the automatic retry).
        damp_lambda: the absolute value added to ``diag(H)``.
        damp_attempts: Cholesky attempts (1 when the requested damping worked).
        dead_columns: inputs that never activated (``H_ii == 0``); their weights
            were zeroed.
    """

    codes: Any
    scales: Any
    zeros: Any
    g_idx: Any
    perm: Any
    loss: float
    damp_used: float
    damp_lambda: float
    damp_attempts: int
    dead_columns: int
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    static_groups: bool
    act_group_aware: bool = False

    def dequantize(self):
        """Dense float32 ``[N, K]``: ``scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])``."""
        if _arrays.is_torch(self.codes):
            g = self.g_idx.long()
            return (self.codes.float() - self.zeros[g].T.float()) * self.scales[g].T
        g = self.g_idx
        return (self.codes.astype("float32") - self.zeros[g].T.astype("float32")) * self.scales[g].T


def quantize_weight(
    W,
    H,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    max_damp_retries: int = 8,
    clip_steps: int = 0,
    clip_min_ratio: float = 0.75,
    clip_norm: float = 2.0,
    clip_hessian_weighted: bool = True,
    fp16_scales: bool = False,
    min_zero_point: int = 0,
    act_group_aware: bool = False,
) -> QuantizeResult:
    """Quantizes ``W [N, K]`` with GPTQ given the Hessian ``H [K, K]`` of its inputs.

    Runs the lazy-batch column sweep with error feedback of Frantar et al.
    (2022) in the native core (multi-threaded; the GIL is released).

    Args:
        W: weight ``[out_features, in_features]`` (float32, float16, bfloat16 or
            float64), torch tensor or numpy array, C-contiguous. On the CPU, or
            on a GPU (torch CUDA / ROCm tensor, builds with a GPU backend): the
            solver then runs there on the current stream (``block_size`` at
            most 256) and the results are on that device.
        H: Hessian ``[in_features, in_features]`` (float32 or float64), e.g. from
            :class:`HessianAccumulator`, on the same device as ``W``.
        bits: 2, 3, 4 or 8.
        group_size: input columns sharing one grid; -1 for one grid per output
            channel. A last partial group is allowed.
        sym: symmetric grid (zero point ``2^(bits-1)``) instead of min-max asymmetric.
        desc_act: act-order: quantize columns by descending ``diag(H)``;
            ``g_idx`` then maps columns to groups.
        static_groups: take every group's grid from the unquantized weight
            before the sweep (keeps ``g_idx`` sequential with ``desc_act``).
        act_group_aware: group-aware act-order (GPTQModel's default): each
            group's columns by descending ``diag(H)``, groups by their largest
            ``diag(H)``, a last partial group last. Groups stay whole, so
            ``g_idx`` stays ``k // group_size`` (a ``desc_act=False``
            checkpoint) while the most sensitive inputs go first. Needs
            ``group_size > 0``; excludes ``desc_act``.
        damp_percent: damping ``lambda = damp_percent * mean(diag H)``; grows
            3x per retry (up to ``max_damp_retries`` times, at most 100 %)
            when ``H + lambda I`` is not positive definite.
        block_size: lazy-batch width (columns updated together).
        max_damp_retries: extra Cholesky attempts with growing damping.
        clip_steps: clipping search. 0 keeps GPTQ's min-max grid; N > 0 also
            tries N ranges shrunk evenly down to ``clip_min_ratio`` of the
            min-max range and keeps, per row and group, the one with the least
            error ``sum_j c_j |w_j - q_j|^clip_norm``, where ``c_j = 1/U_jj^2``
            (GPTQ's own loss weight of column j) if ``clip_hessian_weighted``.
        fp16_scales: round every scale to float16 before quantizing with it, so
            the error feedback accounts for the float16 scales checkpoints store.
        min_zero_point: 1 keeps asymmetric zero points >= 1, as the v1
            checkpoint layout (which stores ``zero - 1``) requires.

    Returns:
        A :class:`QuantizeResult`; its arrays are torch tensors when ``W`` is
        one, numpy arrays otherwise.

    Raises:
        ValueError: a bad argument (the message names it), e.g. tensors on
            different devices.
        NotPositiveDefiniteError: the Hessian stayed indefinite after all retries.
        NotImplementedError: GPU tensors, but gptqkit was built without GPU support.
    """
    W = _arrays.as_native(W, "weight")
    H = _arrays.as_native(H, "hessian")
    if W.ndim != 2:
        raise ValueError(f"weight: expected a 2-d [out_features, in_features] matrix, got shape {_arrays.shape_of(W)}")
    n, k = _arrays.shape_of(W)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {bits}")
    if group_size == 0 or group_size < -1:
        raise ValueError(f"group_size: expected -1 (per output channel) or a positive value, got {group_size}")
    g = _C.num_groups(k, group_size)
    codes = _gpu.empty(W, (n, k), "uint8")
    scales = _gpu.empty(W, (g, n), "float32")
    zeros = _gpu.empty(W, (g, n), "int32")
    g_idx = _gpu.empty(W, (k,), "int32")
    perm = _gpu.empty(W, (k,), "int64")
    stats = _C.quantize_weight(
        W, H, codes, scales, zeros, g_idx, perm,
        bits=int(bits), group_size=int(group_size), sym=bool(sym), desc_act=bool(desc_act),
        static_groups=bool(static_groups), damp_percent=float(damp_percent), block_size=int(block_size),
        max_damp_retries=int(max_damp_retries), clip_steps=int(clip_steps), clip_min_ratio=float(clip_min_ratio),
        clip_norm=float(clip_norm), clip_hessian_weighted=bool(clip_hessian_weighted), fp16_scales=bool(fp16_scales),
        min_zero_point=int(min_zero_point), act_group_aware=bool(act_group_aware), stream=_gpu.stream_of(W),
    )
    return QuantizeResult(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, perm=perm,
        loss=stats["loss"], damp_used=stats["damp_percent_used"], damp_lambda=stats["damp_lambda"],
        damp_attempts=stats["damp_attempts"], dead_columns=stats["dead_columns"],
        bits=int(bits), group_size=int(group_size), sym=bool(sym), desc_act=bool(desc_act),
        static_groups=bool(static_groups), act_group_aware=bool(act_group_aware),
    )
