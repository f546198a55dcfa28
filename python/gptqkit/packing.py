"""Packing quantized layers to and from the GPTQ checkpoint layout.

See ``docs/format.md`` for the bit-exact specification. Summary: ``qweight``
int32 ``[ceil(K*bits/32), N]`` packed along K, ``qzeros`` int32
``[G, ceil(N*bits/32)]`` packed along N, values LSB first as one continuous
bit stream (3-bit values straddle words), ``scales`` float16 ``[G, N]``,
``g_idx`` int32 ``[K]``. Format ``"v1"`` stores ``zero - 1`` in qzeros (what
AutoGPTQ, GPTQModel's "gptq", transformers and vLLM read); ``"v2"`` stores
the true zero (GPTQModel's "gptq_v2").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptqkit import _arrays, _gpu
from gptqkit._native import _C

FORMATS = ("v1", "v2")


@dataclass
class PackedLayer:
    """The tensors of one quantized linear layer as stored in a GPTQ checkpoint."""

    qweight: Any  # int32 [packed_words(K, bits), N]
    qzeros: Any  # int32 [G, packed_words(N, bits)]
    scales: Any  # float16 [G, N]
    g_idx: Any  # int32 [K]
    bits: int
    in_features: int
    out_features: int
    format: str = "v1"

    def dequantize(self):
        """Dense float32 ``[out_features, in_features]`` weight."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.format)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format: expected 'v1' or 'v2', got {format!r}")


def packed_words(count: int, bits: int) -> int:
    """Number of int32 words holding ``count`` values of ``bits`` bits."""
    return _C.packed_words(int(count), int(bits))


def pack(codes, zeros, scales, g_idx, bits: int, format: str = "v1") -> PackedLayer:
    """Packs a quantized layer into checkpoint tensors.

    Args:
        codes: uint8 ``[N, K]`` codes (e.g. ``QuantizeResult.codes``).
        zeros: int32 ``[G, N]`` true zero points.
        scales: ``[G, N]`` float scales (stored as float16, as checkpoints do).
        g_idx: int ``[K]`` group of each input column.
        bits: 2, 3, 4 or 8.
        format: ``"v1"`` (default, widest reader support) or ``"v2"``.
            A zero point of 0 (possible with ``sym=False``) cannot be stored in
            v1 and raises ``ValueError``.
    """
    _check_format(format)
    codes = _arrays.as_native(codes, "codes")
    zeros = _arrays.as_native(zeros, "zeros")
    scales = _arrays.as_native(scales, "scales")
    g_idx = _arrays.as_native(g_idx, "g_idx")
    if codes.ndim != 2:
        raise ValueError(f"codes: expected a 2-d [out_features, in_features] array, got shape {_arrays.shape_of(codes)}")
    if zeros.ndim != 2:
        raise ValueError(f"zeros: expected a 2-d [groups, out_features] array, got shape {_arrays.shape_of(zeros)}")
    n, k = _arrays.shape_of(codes)
    g = _arrays.shape_of(zeros)[0]
    # GPU tensors (builds with a GPU backend) are packed on their GPU.
    qweight = _gpu.empty(codes, (packed_words(k, bits), n), "int32")
    qzeros = _gpu.empty(codes, (g, packed_words(n, bits)), "int32")
    _C.pack_qweight(codes, int(bits), qweight, stream=_gpu.stream_of(codes))
    _C.pack_qzeros(zeros, int(bits), format, qzeros, stream=_gpu.stream_of(codes))
    if _arrays.shape_of(scales) != (g, n):
        raise ValueError(f"scales: expected shape ({g}, {n}) to match zeros, got {_arrays.shape_of(scales)}")
    if _arrays.shape_of(g_idx) != (k,):
        raise ValueError(f"g_idx: expected shape ({k},), got {_arrays.shape_of(g_idx)}")
    if _arrays.is_torch(codes):
        scales16 = scales.to(_arrays.torch.float16).contiguous()
        g_idx32 = g_idx.to(_arrays.torch.int32).contiguous()
    else:
        scales16 = scales.astype("float16")
        g_idx32 = g_idx.astype("int32")
    return PackedLayer(qweight=qweight, qzeros=qzeros, scales=scales16, g_idx=g_idx32, bits=int(bits),
                       in_features=k, out_features=n, format=format)


def unpack(qweight, qzeros, bits: int, in_features: int, format: str = "v1"):
    """Inverse of :func:`pack`: returns ``(codes uint8 [N, K], zeros int32 [G, N])``."""
    _check_format(format)
    qweight = _arrays.as_native(qweight, "qweight")
    qzeros = _arrays.as_native(qzeros, "qzeros")
    if qweight.ndim != 2 or qzeros.ndim != 2:
        raise ValueError("qweight and qzeros: expected 2-d arrays, got shapes "
                         f"{_arrays.shape_of(qweight)} and {_arrays.shape_of(qzeros)}")
    n = _arrays.shape_of(qweight)[1]
    g = _arrays.shape_of(qzeros)[0]
    codes = _arrays.empty(qweight, (n, int(in_features)), "uint8")
    zeros = _arrays.empty(qweight, (g, n), "int32")
    _C.unpack_qweight(qweight, int(bits), codes)
    _C.unpack_qzeros(qzeros, int(bits), format, zeros)
    return codes, zeros


def dequantize(qweight, qzeros, scales, g_idx, bits: int, format: str = "v1"):
    """Dense float32 ``[N, K]`` weight of a packed layer (the kernels' test oracle).

    ``K`` is ``len(g_idx)``; every tensor is validated against it.
    """
    _check_format(format)
    qweight = _arrays.as_native(qweight, "qweight")
    qzeros = _arrays.as_native(qzeros, "qzeros")
    scales = _arrays.as_native(scales, "scales")
    g_idx = _arrays.as_native(g_idx, "g_idx")
    if qweight.ndim != 2 or g_idx.ndim != 1:
        raise ValueError("qweight: expected 2-d and g_idx 1-d, got shapes "
                         f"{_arrays.shape_of(qweight)} and {_arrays.shape_of(g_idx)}")
    n = _arrays.shape_of(qweight)[1]
    k = _arrays.shape_of(g_idx)[0]
    weight = _arrays.empty(qweight, (n, k), "float32")
    _C.dequantize(qweight, qzeros, scales, g_idx, int(bits), format, weight)
    return weight
