"""``QuantLinear``: a GPTQ-quantized drop-in for ``nn.Linear`` / transformers' ``Conv1D``.

The layer holds the checkpoint tensors (``qweight``, ``qzeros``, ``scales``,
``g_idx`` and an optional ``bias``; layout in ``docs/format.md``) as buffers,
so ``state_dict()`` produces exactly the keys a GPTQ checkpoint stores.

On the CPU, ``forward`` runs in the native core's fused low-bit GEMM
(``_C.cpu_gemm``, AVX-512 / AVX2 / portable kernels chosen at import): on
the first forward the layer repacks its buffers once into the kernels' layout
(``_C.CpuPreparedWeight``, about the size of ``qweight``; see "In-memory CPU
layout" in ``docs/format.md``) and keeps that copy until its buffers change.
Inputs of any leading shape are flattened to ``[M, K]``; the output has the
input's dtype. Large batches (many rows) are routed by the core to
dequantize + BLAS automatically.

On a CUDA (or ROCm) device, ``forward`` calls the custom op
``torch.ops.gptqkit.quantized_matmul`` (:mod:`gptqkit.ops`), which works under
``torch.compile`` and CUDA-graph capture. The kernels' copy of the layer
(:class:`gptqkit.ops.GpuLayout`, ``docs/gpu_gemm.md``) is made once, when the
layer moves to the GPU (``.to("cuda")``, ``from_quantized(device="cuda")``) or
when a checkpoint is loaded into a GPU layer, never during a forward call.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import nn

from gptqkit import ops
from gptqkit._native import _C
from gptqkit.packing import FORMATS, PackedLayer, dequantize, pack, packed_words

__all__ = ["QuantLinear"]

SUPPORTED_BITS = (2, 3, 4, 8)
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _num_groups(in_features: int, group_size: int) -> int:
    """G: 1 for ``group_size == -1``, else ``ceil(in_features / group_size)``."""
    return int(_C.num_groups(int(in_features), int(group_size)))


_PREPARED_FROM = ("qweight", "qzeros", "scales", "g_idx")


def _versions(tensors) -> tuple:
    """Version counters (bumped by every in-place change); inference tensors have none."""
    out = []
    for t in tensors:
        try:
            out.append(t._version)
        except RuntimeError:  # created under torch.inference_mode()
            out.append(None)
    return tuple(out)


def _native_forward(layer: "QuantLinear", x2: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` (contiguous, float32/float16/bfloat16) -> ``[M, N]`` through the native core."""
    y = torch.empty((x2.shape[0], layer.out_features), dtype=x2.dtype)
    _C.cpu_gemm(x2, layer.prepared_cpu_weight(), layer._buffers["bias"], y)
    return y


class _QuantLinearFunction(torch.autograd.Function):
    """The native forward, with a gradient for the input (not for the frozen weight).

    The backward (``grad_x = grad_y @ W``) dequantizes the weight once, so
    adapters trained on top of a quantized model (LoRA and the like) get
    their input gradients.
    """

    @staticmethod
    def forward(ctx, x2, layer):  # x2: [M, K] contiguous, one of _NATIVE_DTYPES
        ctx.layer = layer
        return _native_forward(layer, x2.detach())

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.layer.dequantize_weight()  # float32 [N, K]
        return (grad_y.float() @ w).to(grad_y.dtype), None


class QuantLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` whose weight is stored GPTQ-packed.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: input columns per group, or -1 for one group.
        in_features: K.
        out_features: N.
        bias: whether the layer has a bias (stored unquantized).
        format: ``"v1"`` (``qzeros`` store ``zero - 1``; checkpoint_format
            ``"gptq"``) or ``"v2"`` (true zeros; ``"gptq_v2"``).
        device: where to allocate the buffers; ``"meta"`` builds a shell to be
            filled from a checkpoint without allocating memory.
        dtype: dtype of ``scales`` and ``bias`` (float16 by default, what
            checkpoints store; float32 and bfloat16 also run natively).

    Buffers (all C-contiguous):
        qweight: int32 ``[packed_words(K, bits), N]``
        qzeros: int32 ``[G, packed_words(N, bits)]``
        scales: ``[G, N]``
        g_idx: int32 ``[K]`` (initialised to ``k // group_size``)
        bias: ``[N]`` or ``None``

    Freshly constructed layers are all-zero placeholders; fill them with
    :meth:`from_packed`, :meth:`from_linear` or ``load_state_dict``.

    ``forward`` runs on the CPU and, in builds with a GPU backend, on CUDA /
    ROCm devices (float16/bfloat16 activations; float32 inputs are computed
    in the layer's GPU dtype). Gradients flow to the input, never to the
    quantized weight.
    """

    def __init__(self, bits: int, group_size: int, in_features: int, out_features: int, bias: bool = True,
                 format: str = "v1", *, device=None, dtype: torch.dtype = torch.float16):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
        if format not in FORMATS:
            raise ValueError(f"format: expected 'v1' or 'v2', got {format!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features} and {out_features}")
        if dtype not in _NATIVE_DTYPES:
            raise ValueError(f"dtype: expected float16, bfloat16 or float32 for scales and bias, got {dtype}")
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.format = format
        groups = _num_groups(self.in_features, self.group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros((packed_words(in_features, bits), out_features),
                                                    dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros((groups, packed_words(out_features, bits)), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros((groups, out_features), dtype=dtype, **kw))
        g = torch.arange(in_features, dtype=torch.int32, **kw)
        self.register_buffer("g_idx", g // self.group_size if self.group_size > 0 else torch.zeros_like(g))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.register_buffer("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_packed(cls, packed: PackedLayer, bias: Optional[torch.Tensor] = None,
                    group_size: Optional[int] = None) -> "QuantLinear":
        """A layer holding the tensors of ``packed`` (as returned by :func:`gptqkit.pack`).

        Args:
            packed: the checkpoint tensors (torch tensors, or numpy arrays that
                are converted).
            bias: optional ``[out_features]`` tensor, kept in its dtype when
                that is float16/bfloat16/float32.
            group_size: recorded on the layer (informational: the layout is
                fully described by ``g_idx``). ``None`` infers it from the
                number of groups: ``-1`` for one group, else
                ``ceil(in_features / G)``.
        """
        t = {name: torch.as_tensor(getattr(packed, name)) for name in ("qweight", "qzeros", "scales", "g_idx")}
        groups = int(t["scales"].shape[0])
        k, n = int(packed.in_features), int(packed.out_features)
        if group_size is None:
            group_size = -1 if groups == 1 else math.ceil(k / groups)
        elif _num_groups(k, group_size) != groups:
            raise ValueError(f"group_size={group_size} gives {_num_groups(k, group_size)} groups for "
                             f"in_features={k}, but scales has {groups} rows")
        scales_dtype = t["scales"].dtype if t["scales"].dtype in _NATIVE_DTYPES else torch.float16
        layer = cls(packed.bits, group_size, k, n, bias=bias is not None, format=packed.format, device="meta",
                    dtype=scales_dtype)
        if bias is not None:
            bias = torch.as_tensor(bias).detach()
            if bias.dtype not in _NATIVE_DTYPES:
                bias = bias.float()
        layer._assign(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias)
        return layer

    @classmethod
    def from_linear(cls, module: nn.Module, result, format: str = "v1") -> "QuantLinear":
        """A layer replacing ``module`` (``nn.Linear`` or transformers' ``Conv1D``)
        with the output of :func:`gptqkit.quantize_weight` for its weight.

        Args:
            module: the original layer; supplies in/out features and the bias
                (copied in the module's dtype). For ``Conv1D`` (weight
                ``[in, out]``) the quantized matrix must be ``weight.T``.
            result: a :class:`gptqkit.QuantizeResult` for the ``[out, in]`` weight.
            format: ``"v1"`` (default) or ``"v2"``; v1 cannot store a zero
                point of 0 (asymmetric grids) and raises ``ValueError`` then.
        """
        in_features, out_features = _linear_features(module)
        codes = torch.as_tensor(result.codes)
        if tuple(codes.shape) != (out_features, in_features):
            raise ValueError(f"result.codes: expected shape ({out_features}, {in_features}) for "
                             f"{type(module).__name__} with in_features={in_features}, "
                             f"out_features={out_features}, got {tuple(codes.shape)}")
        packed = pack(codes, torch.as_tensor(result.zeros), torch.as_tensor(result.scales),
                      torch.as_tensor(result.g_idx), result.bits, format)
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach().to("cpu")
        return cls.from_packed(packed, bias=bias, group_size=result.group_size)

    def _assign(self, qweight, qzeros, scales, g_idx, bias):
        """Replaces the buffers (after checking their shapes); used by from_packed and the loader."""
        k, n, b = self.in_features, self.out_features, self.bits
        groups = scales.shape[0] if scales.dim() == 2 else -1
        expected = {
            "qweight": (qweight, torch.int32, (packed_words(k, b), n)),
            "qzeros": (qzeros, torch.int32, (groups, packed_words(n, b))),
            "scales": (scales, None, (groups, n)),
            "g_idx": (g_idx, torch.int32, (k,)),
        }
        for name, (tensor, dtype, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape} for in_features={k}, out_features={n}, "
                                 f"bits={b}, got {tuple(tensor.shape)}")
            if dtype is not None and tensor.dtype != dtype:
                raise ValueError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")
        if scales.dtype not in _NATIVE_DTYPES:
            raise ValueError(f"scales: expected float16, bfloat16 or float32, got {scales.dtype}")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
        self.release_cpu_weight()
        self.qweight = qweight.contiguous()
        self.qzeros = qzeros.contiguous()
        self.scales = scales.contiguous()
        self.g_idx = g_idx.contiguous()
        if bias is None:
            self.bias = None
        else:
            self.bias = bias.contiguous()

    # ------------------------------------------------------------------ CPU kernels' copy
    def prepared_cpu_weight(self):
        """The layer repacked for the CPU GEMM (``_C.CpuPreparedWeight``), made on first use.

        The copy is rebuilt when any of ``qweight``, ``qzeros``, ``scales`` or
        ``g_idx`` was replaced (``_assign``, attribute assignment, ``.to()``)
        or modified in place (``load_state_dict``, ``copy_``): the cache keys
        on each tensor's identity and version counter. It holds about as many
        bytes as ``qweight`` (its ``nbytes``), never a dense weight.
        """
        cache = self.__dict__.get("_cpu_prepared")
        buffers = self._buffers  # (not getattr: nn.Module.__getattr__ costs a microsecond per buffer)
        q, z, s, g = buffers["qweight"], buffers["qzeros"], buffers["scales"], buffers["g_idx"]
        if cache is not None:  # checked on every forward: kept to a few attribute reads
            prepared, (rq, rz, rs, rg), versions = cache
            if rq() is q and rz() is z and rs() is s and rg() is g:
                try:
                    if versions == (q._version, z._version, s._version, g._version):
                        return prepared
                except RuntimeError:  # inference tensors carry no version counter
                    if versions == _versions((q, z, s, g)):
                        return prepared
            self.release_cpu_weight()
        tensors = (q, z, s, g)
        self._check_runnable(None)
        prepared = _C.CpuPreparedWeight(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.format)
        self.__dict__["_cpu_prepared"] = (prepared, tuple(weakref.ref(t) for t in tensors), _versions(tensors))
        return prepared

    def release_cpu_weight(self) -> None:
        """Drops the CPU kernels' prepared copy (it is rebuilt on the next forward)."""
        self.__dict__.pop("_cpu_prepared", None)

    def __setattr__(self, name, value):
        if name in _PREPARED_FROM:
            self.__dict__.pop("_cpu_prepared", None)
            self.__dict__.pop("_gpu_layout", None)
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cpu(), .half(), ... replace the buffers
        self.release_cpu_weight()
        self.__dict__.pop("_gpu_layout", None)
        out = super()._apply(fn, *args, **kwargs)
        self._prepare_gpu_if_needed()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self.release_cpu_weight()
        self.__dict__.pop("_gpu_layout", None)
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare_gpu_if_needed()

    def __getstate__(self):  # copy.deepcopy / pickle: the prepared copies are rebuilt on demand
        state = super().__getstate__()
        state = dict(state)
        state.pop("_cpu_prepared", None)
        state.pop("_gpu_layout", None)
        return state

    # ------------------------------------------------------------------ GPU kernels' copy
    def _gpu_dtype(self) -> torch.dtype:
        """The activation dtype the GPU copy is made for: the bias's, else the scales', if 16-bit; else fp16."""
        for t in (self._buffers.get("bias"), self._buffers["scales"]):
            if t is not None and t.dtype in (torch.float16, torch.bfloat16):
                return t.dtype
        return torch.float16

    def _prepare_gpu_if_needed(self) -> None:
        q = self._buffers.get("qweight")
        if q is not None and q.device.type == "cuda" and "_gpu_layout" not in self.__dict__:
            if ops.gpu_backend() != "none":  # otherwise forward raises the how-to-rebuild error
                self.prepare_gpu_weight()

    def prepare_gpu_weight(self, dtype: Optional[torch.dtype] = None):
        """Makes (or remakes) the GPU kernels' copy of the layer (:class:`gptqkit.ops.GpuLayout`).

        Called automatically when the layer moves to a CUDA device and after
        ``load_state_dict``; call it yourself after changing the buffers in
        place on the GPU (``copy_``), or to prepare for another activation
        dtype (float16 or bfloat16; default: the bias's or scales' dtype).
        Load-time work: it copies the buffers to the host once; never call
        it while a CUDA graph is being captured. Without act-order, with
        ``K % 32 == 0`` and ``N % 128 == 0`` the GPU copy shares ``qweight``'s
        memory; otherwise it holds a reordered copy of about its size.
        """
        ops.require_gpu_backend()
        self._check_runnable(None)
        q = self._buffers["qweight"]
        if q.device.type != "cuda":
            raise ValueError(f"QuantLinear.prepare_gpu_weight: the layer is on {q.device}; move it to a CUDA "
                             f"device first (.to('cuda'))")
        layout = ops.prepare_layout(q, self.qzeros, self.scales, self.g_idx, self.bits, self.format,
                                    dtype=dtype or self._gpu_dtype(), device=q.device)
        if (layout.perm is None and tuple(layout.qweight.shape) == tuple(q.shape) and q.is_contiguous()
                and self.in_features % 32 == 0 and q.data_ptr() % 16 == 0):
            layout = layout._replace(qweight=q)  # identical words: share the buffer, no second copy
        self.__dict__["_gpu_layout"] = layout
        return layout

    def release_gpu_weight(self) -> None:
        """Drops the GPU kernels' copy (made again by :meth:`prepare_gpu_weight` or the next move to the GPU)."""
        self.__dict__.pop("_gpu_layout", None)

    def _gpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` on the layer's CUDA device -> ``[..., N]`` through ``torch.ops.gptqkit.quantized_matmul``
        (or, in eager inference, the same function without the dispatcher: ``ops.can_bypass_dispatcher``)."""
        self._check_runnable(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: expected input with last dimension {self.in_features} "
                             f"(in_features), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"QuantLinear: expected a floating-point input, got {x.dtype}")
        layout = self.__dict__.get("_gpu_layout")
        if layout is None:  # e.g. buffers assigned on the GPU directly; not inside graph capture
            layout = self.prepare_gpu_weight()
        lead = x.shape[:-1]
        out_dtype = x.dtype
        x2 = x.reshape(-1, self.in_features)
        sz = layout.sz
        if x2.dtype in (torch.float16, torch.bfloat16):
            if sz.dtype != x2.dtype:  # the layer was prepared for the other 16-bit type: convert the small table
                sz = sz.to(x2.dtype)
        else:  # float32/float64 inputs run in the layer's 16-bit type
            x2 = x2.to(sz.dtype)
        bias = self._buffers.get("bias")
        if bias is not None and bias.dtype != x2.dtype:
            bias = bias.to(x2.dtype)
        args = (x2.contiguous(), layout.qweight, sz, layout.chunk_group, layout.perm, bias, layout.bits,
                self.in_features, self.out_features)
        if ops.can_bypass_dispatcher(x2, bias):  # eager inference: skip the op's per-call dispatch cost
            y = ops.quantized_matmul_direct(*args)
        else:
            y = torch.ops.gptqkit.quantized_matmul(*args)
        if y.dtype != out_dtype:
            y = y.to(out_dtype)
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ compute
    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (float32 unless ``dtype`` is given)."""
        self._check_runnable(None)
        w = dequantize(self.qweight, self.qzeros, self.scales.float() if self.scales.dtype == torch.bfloat16
                       else self.scales, self.g_idx, self.bits, self.format)
        return w if dtype is None else w.to(dtype)

    def _check_runnable(self, x: Optional[torch.Tensor]) -> None:
        devices = {self.qweight.device.type}
        if x is not None:
            devices.add(x.device.type)
        if "meta" in devices:
            raise RuntimeError("QuantLinear: the layer (or its input) is on the meta device and holds no data; "
                               "load a checkpoint into it first (gptqkit.load_checkpoint)")
        if devices == {"cpu"}:
            return
        if len(devices) > 1:
            raise RuntimeError(f"QuantLinear: the input is on {x.device} but the layer's tensors are on "
                               f"{self.qweight.device}; move the input or the layer (.to()) so they match")
        if devices == {"cuda"}:
            ops.require_gpu_backend()
            return
        where = ", ".join(sorted(devices))
        raise NotImplementedError(f"QuantLinear: got tensors on {where}; gptqkit runs quantized layers on the CPU "
                                  f"and on CUDA/ROCm GPUs")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]`` in ``x``'s dtype."""
        if (x.is_cpu and x.dtype in _NATIVE_DTYPES and "_cpu_prepared" in self.__dict__
                and not (x.requires_grad and torch.is_grad_enabled()) and x.shape[-1] == self.in_features):
            # Fast path (token-by-token decoding calls this hundreds of times per token): the
            # prepared copy exists, so the buffers are on the CPU; prepared_cpu_weight() still
            # checks that they did not change.
            lead = x.shape[:-1]
            y = _native_forward(self, x.reshape(-1, self.in_features).contiguous())
            return y.view(*lead, self.out_features)
        if x.is_cuda:
            return self._gpu_forward(x)
        self._check_runnable(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: expected input with last dimension {self.in_features} "
                             f"(in_features), got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        out_dtype = x.dtype
        x2 = x.reshape(-1, self.in_features)
        if out_dtype not in _NATIVE_DTYPES:
            if not out_dtype.is_floating_point:
                raise TypeError(f"QuantLinear: expected a floating-point input, got {out_dtype}")
            x2 = x2.float()  # e.g. float64: computed in float32
        x2 = x2.contiguous()
        if x2.requires_grad and torch.is_grad_enabled():
            y = _QuantLinearFunction.apply(x2, self)
        else:
            y = _native_forward(self, x2.detach())
        if y.dtype != out_dtype:
            y = y.to(out_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, format={self.format!r}")


def _linear_features(module: nn.Module):
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return int(module.nx), int(module.nf)  # Conv1D: weight [in (nx), out (nf)], y = x @ W + b
    raise TypeError(f"expected an nn.Linear or transformers Conv1D, got {type(module).__name__}")
