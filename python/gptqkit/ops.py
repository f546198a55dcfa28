"""PyTorch custom ops of gptqkit's GPU kernels (``torch.library``).

``torch.ops.gptqkit.quantized_matmul`` is what :class:`gptqkit.nn.QuantLinear`
calls on a CUDA (or ROCm) device. It is a real custom op, opaque to
``torch.compile`` (no graph break: its fake implementation gives the output's
shape and dtype) and safe to capture in a CUDA graph (the native call
allocates nothing, never synchronises, and runs on the current stream; the
op's scratch buffer comes from torch's caching allocator).

The weight enters in the kernels' layout (``docs/gpu_gemm.md``), made once per
layer at load time by :func:`prepare_layout`:

* ``qweight`` int32 ``[C * bits, Np]``, ``sz`` float16/bfloat16 ``[G, Np, 2]``,
  ``chunk_group`` int32 ``[C]`` and ``perm`` int32 ``[32 C]`` (or ``None``).

Routing by the number of rows ``M`` of ``x`` (:func:`matmul_kernel` tells which):
4-bit layers on sm_80+ NVIDIA GPUs take the tensor-core kernel with K split
across blocks at every ``M`` from ``GPTQKIT_GPU_MMA_MIN_ROWS`` rows (default 1:
it streams the weight at least as fast as the GEMV kernel even at ``M = 1``;
mma.sync, and on Hopper from ``GPTQKIT_GPU_WGMMA_MIN_ROWS`` rows, default 128,
a warpgroup-MMA kernel; up to ``GPTQKIT_GPU_SKINNY_MAX_ROWS`` rows, default 0 = off,
its "skinny" variant for decode-sized batches); other bit widths and GPUs take a bandwidth-bound GEMV
kernel for ``M <= 8`` and a tiled kernel above; and from ``GPTQKIT_GPU_DENSE_MIN_ROWS`` rows (default 256)
dequantization to a dense fp16/bf16 weight followed by torch's GEMM (cuBLAS /
hipBLAS).

On the CPU the op runs a slow pure-torch reference of the same layout (for
tests and for ``torch.library.opcheck``); CPU inference uses
``gptqkit.nn.QuantLinear``'s native CPU kernels instead.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple, Optional

import torch

from gptqkit._native import _C

__all__ = ["GpuLayout", "prepare_layout", "quantized_matmul", "quantized_matmul_direct", "can_bypass_dispatcher",
           "dequantize_layout", "gpu_backend",
           "require_gpu_backend", "gpu_unavailable_reason", "dense_min_rows", "wgmma_min_rows", "mma_min_rows",
           "skinny_max_rows", "inkernel_reduce_max_rows", "overlapped_launches", "matmul_kernel"]

_GPU_DTYPES = (torch.float16, torch.bfloat16)

NO_GPU_MESSAGE = ("gptqkit was built without GPU support, so quantized layers cannot run on a GPU. Rebuild it with "
                  "a GPU backend: `GPTQKIT_WITH_CUDA=1 pip install .` (NVIDIA, needs nvcc) or "
                  "`GPTQKIT_WITH_HIP=1 pip install .` (ROCm), or run the model on the CPU (device='cpu').")


# Read once: forward code that torch.compile traces checks it without calling
# into the extension (which would break the graph).
_BACKEND = str(_C.gpu_backend())


def gpu_backend() -> str:
    """The GPU backend compiled into gptqkit: ``"cuda"``, ``"hip"`` or ``"none"``."""
    return _BACKEND


def require_gpu_backend() -> None:
    """Raises ``NotImplementedError`` (with how to rebuild) when gptqkit has no GPU backend."""
    if _BACKEND == "none":
        raise NotImplementedError(NO_GPU_MESSAGE)


def gpu_unavailable_reason() -> Optional[str]:
    """``None`` when gptqkit can run on a GPU here (torch sees a CUDA/ROCm device and gptqkit
    has a GPU backend), else why not, in words (for skip messages and tools that need a GPU)."""
    if not torch.cuda.is_available():
        return "needs a GPU: torch sees no CUDA/ROCm device (torch.cuda.is_available() is False)"
    if _BACKEND == "none":
        return ("needs a GPU: gptqkit was built without a GPU backend "
                "(GPTQKIT_WITH_CUDA=1 or GPTQKIT_WITH_HIP=1 pip install .)")
    return None


def dense_min_rows() -> int:
    """Rows of ``x`` from which the op dequantizes and calls torch's GEMM (env ``GPTQKIT_GPU_DENSE_MIN_ROWS``)."""
    # 256: on an H100 dequantize + cuBLAS beat the wgmma kernel at M = 256 on 5
    # of the 6 Llama shapes of benchmarks/bench_gpu_gemm.py (docs/gpu_gemm.md).
    value = os.environ.get("GPTQKIT_GPU_DENSE_MIN_ROWS", "256")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"GPTQKIT_GPU_DENSE_MIN_ROWS: expected an integer, got {value!r}") from None


def _rows_from_env(name: str, default: int, minimum: int, expected: str) -> int:
    """A row threshold from the environment, checked: the native library reads the
    variable itself, so a malformed value must be an error here instead of its default."""
    value = os.environ.get(name, str(default))
    try:
        rows = int(value)
    except ValueError:
        rows = minimum - 1
    if rows < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return rows


def wgmma_min_rows() -> int:
    """Rows of ``x`` from which Hopper GPUs run the wgmma kernel (env ``GPTQKIT_GPU_WGMMA_MIN_ROWS``, 0: never)."""
    return _rows_from_env("GPTQKIT_GPU_WGMMA_MIN_ROWS", 128, 0,
                          "an integer >= 0 (0 turns the wgmma kernel off)")


def mma_min_rows() -> int:
    """Rows of ``x`` from which 4-bit layers take the tensor-core kernel instead of the GEMV kernel
    (env ``GPTQKIT_GPU_MMA_MIN_ROWS``, default 1; 9 or more: the GEMV kernel up to 8 rows)."""
    return _rows_from_env("GPTQKIT_GPU_MMA_MIN_ROWS", 1, 1, "an integer >= 1")


def skinny_max_rows() -> int:
    """Rows of ``x`` up to which 4-bit layers take the skinny variant of the tensor-core kernel (env
    ``GPTQKIT_GPU_SKINNY_MAX_ROWS``, default 0: off; at most 16 count). See ``docs/gpu_gemm.md``."""
    return _rows_from_env("GPTQKIT_GPU_SKINNY_MAX_ROWS", 0, 0, "an integer >= 0 (0 turns the skinny kernel off)")


def inkernel_reduce_max_rows() -> int:
    """Rows of ``x`` up to which a 4-bit call that splits K across blocks adds the splits' partial sums
    in the GEMM kernel itself (the last block of each output tile) instead of a second kernel (env
    ``GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS``, default 0: off until timed on a GPU). The result has the
    same bits either way. See ``docs/gpu_gemm.md``."""
    return _rows_from_env("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", 0, 0,
                          "an integer >= 0 (0 turns the in-kernel reduction off)")


def overlapped_launches() -> bool:
    """Whether the mma.sync path launches its kernels as programmatic dependent launches on GPUs of
    compute capability 9.0+ (env ``GPTQKIT_GPU_PDL``: 1 on, default 0 = off until timed on a GPU): a
    kernel then starts while the one before it on the stream finishes, and fetches its first weights
    into L2 meanwhile. See ``docs/gpu_gemm.md``."""
    value = os.environ.get("GPTQKIT_GPU_PDL", "0")
    if value not in ("0", "1"):
        raise ValueError(f"GPTQKIT_GPU_PDL: expected 0 or 1, got {value!r}")
    return value == "1"


def _check_routing_env() -> None:
    """Raises ValueError for a malformed routing variable, which the native library would silently ignore."""
    wgmma_min_rows()
    mma_min_rows()
    skinny_max_rows()
    inkernel_reduce_max_rows()
    overlapped_launches()


_ROUTING_VARS = ("GPTQKIT_GPU_DENSE_MIN_ROWS", "GPTQKIT_GPU_WGMMA_MIN_ROWS", "GPTQKIT_GPU_MMA_MIN_ROWS",
                 "GPTQKIT_GPU_SKINNY_MAX_ROWS", "GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "GPTQKIT_GPU_PDL")
# (raw values of _ROUTING_VARS, dense_min_rows, inkernel_reduce_max_rows for them)
_routing_seen: tuple = (None, 0, 0)


def _routing() -> tuple:
    """``(raw routing variables, dense_min_rows(), inkernel_reduce_max_rows())``, parsed and checked
    once per distinct set of values.

    Called on every GEMM: reading the variables costs well under a microsecond,
    parsing and checking them a few (host time that eager decoding pays per layer).
    """
    global _routing_seen
    raw = tuple(os.environ.get(name) for name in _ROUTING_VARS)
    if raw != _routing_seen[0]:
        dense = dense_min_rows()
        _check_routing_env()
        _routing_seen = (raw, dense, inkernel_reduce_max_rows())
    return _routing_seen


# Counters of the in-kernel split-K reduction (the native call's tile_counters):
# zeroed once, left zeroed by every call. Calls that may overlap in time need
# their own, so each stream of a device gets its own row of the device's
# buffer. The buffer is made at load time (prepare_layout), never while a CUDA
# graph is captured: a zeroed buffer made there would belong to the graph.
_COUNTER_STREAMS = 8         # streams per device with their own row; calls on others take the separate reduction
_COUNTERS_PER_STREAM = 1024  # output tiles of one split call (an H100 splits calls of fewer than 264 tiles)
_tile_counter_buffers: dict = {}  # device index -> int32 [_COUNTER_STREAMS, _COUNTERS_PER_STREAM]
_tile_counter_rows: dict = {}     # (device index, stream handle) -> that stream's row (a view)
_tile_counter_lock = threading.Lock()


def _make_tile_counters(device: torch.device) -> None:
    """Creates the device's tile counters (zeroed, and synchronised so that any stream may use them)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    with _tile_counter_lock:
        if index in _tile_counter_buffers:
            return
        counters = torch.zeros((_COUNTER_STREAMS, _COUNTERS_PER_STREAM), dtype=torch.int32,
                               device=torch.device(device.type, index))
        torch.cuda.synchronize(index)
        _tile_counter_buffers[index] = counters


def _tile_counters(index: int, stream: int) -> Optional[torch.Tensor]:
    """The tile counters of ``stream`` on device ``index``, or None (none made for the device yet,
    or all rows taken by other streams): the call then adds its splits in a second kernel."""
    row = _tile_counter_rows.get((index, stream))
    if row is None:
        with _tile_counter_lock:  # two threads meeting new streams must not take the same row
            row = _tile_counter_rows.get((index, stream))
            if row is None:
                counters = _tile_counter_buffers.get(index)
                taken = sum(1 for d, _ in _tile_counter_rows if d == index)
                if counters is None or taken >= _COUNTER_STREAMS:
                    return None
                row = _tile_counter_rows[(index, stream)] = counters[taken]
    return row


_workspace_sizes: dict = {}


def _workspace_bytes(x, qweight, sz, chunk_group, perm, bits, in_features, out_features, routing) -> int:
    """``_C.gpu_matmul_workspace_bytes`` for these arguments, remembered per everything the native
    plan reads (shapes, rows, x's 16-byte alignment, device, routing variables; never the data).
    A stale size could only change the plan (the native planner fits splits to the scratch it gets),
    never the result."""
    key = (x.device.index, x.shape[0], x.data_ptr() % 16, x.dtype, qweight.shape, sz.shape, chunk_group.shape,
           perm is None, bits, in_features, out_features, routing)
    nbytes = _workspace_sizes.get(key)
    if nbytes is None:
        if len(_workspace_sizes) >= 4096:  # many layer shapes x batch sizes: start over rather than grow
            _workspace_sizes.clear()
        nbytes = int(_C.gpu_matmul_workspace_bytes(x, qweight, sz, chunk_group, perm, bits, in_features,
                                                   out_features))
        _workspace_sizes[key] = nbytes
    return nbytes


def matmul_kernel(x: torch.Tensor, layout: "GpuLayout") -> str:
    """The kernel :func:`quantized_matmul` runs for ``x`` (a GPU tensor) and ``layout``:
    ``"gemv"``, ``"wgmma"``, ``"skinny"``, ``"mma"``, ``"tiled"`` or ``"dense"`` (dequantize + torch's GEMM)."""
    require_gpu_backend()
    if x.shape[0] >= dense_min_rows():
        return "dense"
    _check_routing_env()
    return str(_C.gpu_matmul_kernel(x.contiguous(), layout.qweight, layout.sz, layout.chunk_group, layout.perm,
                                    layout.bits, layout.in_features, layout.out_features, True))


class GpuLayout(NamedTuple):
    """One layer in the GPU kernels' layout (see ``docs/gpu_gemm.md``)."""

    qweight: torch.Tensor            # int32 [C * bits, Np]
    sz: torch.Tensor                 # float16/bfloat16 [G, Np, 2]: scale, zero point
    chunk_group: torch.Tensor        # int32 [C]
    perm: Optional[torch.Tensor]     # int32 [32 C] original column of each position (-1: padding), or None
    bits: int
    in_features: int
    out_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.sz.dtype

    def to(self, device) -> "GpuLayout":
        """The layout on ``device`` (load-time work: also makes that GPU's split-K tile counters)."""
        move = (lambda t: None if t is None else t.to(device))
        moved = self._replace(qweight=move(self.qweight), sz=move(self.sz), chunk_group=move(self.chunk_group),
                              perm=move(self.perm))
        if moved.qweight.is_cuda and _BACKEND != "none":
            _make_tile_counters(moved.qweight.device)
        return moved


def prepare_layout(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                   bits: int, format: str = "v1", dtype: torch.dtype = torch.float16,
                   device=None) -> GpuLayout:
    """Repacks checkpoint tensors (any device; read once on the CPU) into the kernels' layout on ``device``.

    Load-time work (a device-to-host copy of the inputs when they live on a
    GPU, the repack on the host, one host-to-device copy per buffer): never
    call it inside a captured CUDA graph.
    """
    if dtype not in _GPU_DTYPES:
        raise ValueError(f"dtype: expected torch.float16 or torch.bfloat16 (the activation dtype), got {dtype}")
    if device is None:
        device = qweight.device
    q, z, s, g = (t.detach().to("cpu").contiguous() for t in (qweight, qzeros, scales, g_idx))
    if q.dim() != 2 or s.dim() != 2 or g.dim() != 1:
        raise ValueError(f"expected qweight [W, N], scales [G, N] and g_idx [K], got shapes {tuple(q.shape)}, "
                         f"{tuple(s.shape)} and {tuple(g.shape)}")
    if g.dtype != torch.int32:
        raise ValueError(f"g_idx: expected dtype torch.int32, got {g.dtype}")
    k, n, groups = int(g.shape[0]), int(q.shape[1]), int(s.shape[0])
    shape = _C.gpu_gemm_shape(g, n, groups, int(bits))
    chunks, np_, reordered = int(shape["chunks"]), int(shape["padded_out"]), bool(shape["reordered"])
    out_q = torch.empty((chunks * bits, np_), dtype=torch.int32)
    out_sz = torch.empty((groups, np_, 2), dtype=dtype)
    out_cg = torch.empty((chunks,), dtype=torch.int32)
    out_perm = torch.empty((chunks * 32,), dtype=torch.int32) if reordered else None
    _C.prepare_gpu_weight(q, z, s, g, int(bits), format, out_q, out_sz, out_cg, out_perm)
    layout = GpuLayout(out_q, out_sz, out_cg, out_perm, int(bits), k, n)
    return layout.to(device)


def _check_args(x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features):
    """The checks that need no data (shared by the real and the fake implementation)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-d [M, K] tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_features:
        raise ValueError(f"x: expected shape [M, {in_features}] (K = in_features), got {tuple(x.shape)}")
    if x.dtype != sz.dtype:
        raise ValueError(f"x: expected dtype {sz.dtype} (the dtype the layer was prepared for), got {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias: expected shape ({out_features},) and dtype {x.dtype}, got {tuple(bias.shape)} "
                         f"and {bias.dtype}")
    for name, t in (("qweight", qweight), ("sz", sz), ("chunk_group", chunk_group), ("perm", perm), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")


def _codes_reference(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``[C, 32, Np]`` codes of the layout's words (pure torch, any device)."""
    np_ = qweight.shape[1]
    chunks = qweight.shape[0] // bits
    words = qweight.view(chunks, bits, np_).to(torch.int64) & 0xFFFFFFFF
    j = torch.arange(32, device=qweight.device)
    bit = j * bits
    word = bit // 32
    shift = bit % 32
    lo = words[:, word, :] >> shift[None, :, None]
    hi = words[:, torch.clamp(word + 1, max=bits - 1), :] << (32 - shift)[None, :, None]
    straddles = (shift + bits > 32)[None, :, None]
    return torch.where(straddles, lo | hi, lo) & ((1 << bits) - 1)


def _positions_reference(qweight, sz, chunk_group, bits, out_features, dtype=torch.float32):
    """``[Kp, N]`` weight of a layout in its position order, padding positions included (pure torch,
    computed in ``dtype``)."""
    codes = _codes_reference(qweight, bits).to(dtype)  # [C, 32, Np]
    g = chunk_group.to(torch.int64)
    scale = sz[..., 0].to(dtype)[g][:, None, :]
    zero = sz[..., 1].to(dtype)[g][:, None, :]
    return (scale * (codes - zero)).reshape(-1, qweight.shape[1])[:, :out_features]


def _dequantize_reference(qweight, sz, chunk_group, perm, bits, in_features, out_features, dtype=torch.float32):
    """Dense ``[N, K]`` weight of a layout in the original column order (pure torch)."""
    w = _positions_reference(qweight, sz, chunk_group, bits, out_features)  # [Kp, N]
    positions = torch.arange(w.shape[0], device=w.device)
    cols = perm.to(torch.int64) if perm is not None else torch.where(positions < in_features, positions, -1)
    keep = cols >= 0
    out = torch.zeros((out_features, in_features), dtype=torch.float32, device=w.device)
    out[:, cols[keep]] = w[keep].t()
    return out.to(dtype)


@torch.library.custom_op("gptqkit::dequantize_layout", mutates_args=())
def dequantize_layout(qweight: torch.Tensor, sz: torch.Tensor, chunk_group: torch.Tensor, perm: Optional[torch.Tensor],
                      bits: int, in_features: int, out_features: int) -> torch.Tensor:
    """Dense ``[out_features, in_features]`` weight (dtype of ``sz``) of a prepared layer."""
    if qweight.is_cuda:
        require_gpu_backend()
        w = torch.empty((out_features, in_features), dtype=sz.dtype, device=qweight.device)
        _C.gpu_dequantize_prepared(qweight, sz, chunk_group, perm, w, bits, in_features, out_features,
                                   torch.cuda.current_stream(qweight.device).cuda_stream)
        return w
    return _dequantize_reference(qweight, sz, chunk_group, perm, bits, in_features, out_features, sz.dtype)


@dequantize_layout.register_fake
def _(qweight, sz, chunk_group, perm, bits, in_features, out_features):
    return sz.new_empty((out_features, in_features))


@torch.library.custom_op("gptqkit::quantized_matmul", mutates_args=())
def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, chunk_group: torch.Tensor,
                     perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, in_features: int,
                     out_features: int) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias)`` with ``W`` a prepared layer; ``x``, ``bias`` and the result in ``sz``'s dtype."""
    return quantized_matmul_direct(x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features)


def can_bypass_dispatcher(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether eager code may call :func:`quantized_matmul_direct` instead of the custom op.

    True outside ``torch.compile`` tracing, for plain tensors (not FakeTensor
    or other subclasses) that need no gradient. The dispatcher's way into a
    Python custom op costs host time on every call: 9.2 us through
    ``torch.ops`` under ``torch.no_grad()`` (what ``generate`` runs in), 5.4 us
    under ``torch.inference_mode()``, 1.3 us for the direct call
    (``benchmarks/bench_op_dispatch.py``, a do-nothing op of the same
    signature, torch 2.13, CPU). A 7B decoder makes 224 such calls per token.
    """
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return bias is None or type(bias) is torch.Tensor


def quantized_matmul_direct(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, chunk_group: torch.Tensor,
                            perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, in_features: int,
                            out_features: int) -> torch.Tensor:
    """What :func:`quantized_matmul` computes, called without torch's dispatcher (no autograd, no
    tracing): for eager inference, where :func:`can_bypass_dispatcher` says so."""
    _check_args(x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features)
    if x.is_cuda:
        require_gpu_backend()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        # The op's autograd wrapper hands over the caller's tensors, which may
        # require grad; DLPack refuses to export those, and the kernels need
        # no graph (the backward formula is registered separately).
        x = x.detach().contiguous()
        bias = None if bias is None else bias.detach()
        routing, dense_rows, reduce_rows = _routing()
        if x.shape[0] >= dense_rows:
            # Compute-bound: dequantize once (16 bits per weight written, 2-8 read)
            # and let the vendor GEMM do the rest.
            if perm is not None:
                return _dense_in_position_order(x, qweight, sz, chunk_group, perm, bias, bits, in_features,
                                                out_features, stream)
            w = torch.empty((out_features, in_features), dtype=x.dtype, device=x.device)
            _C.gpu_dequantize_prepared(qweight, sz, chunk_group, perm, w, bits, in_features, out_features, stream)
            return torch.nn.functional.linear(x, w, bias)
        y = torch.empty((x.shape[0], out_features), dtype=x.dtype, device=x.device)
        workspace = counters = None
        if bits == 4:  # only the 4-bit tensor-core kernels use scratch
            # Scratch for split-K partial sums / act-order x, from torch's caching
            # allocator (reused across layers, and recorded by CUDA graphs).
            nbytes = _workspace_bytes(x, qweight, sz, chunk_group, perm, bits, in_features, out_features, routing)
            if nbytes:
                workspace = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
                if x.shape[0] <= reduce_rows:
                    counters = _tile_counters(x.device.index, stream)
        _C.gpu_quantized_matmul(x, qweight, sz, chunk_group, perm, bias, y, bits, in_features, out_features, stream,
                                workspace, counters)
        return y
    w = _dequantize_reference(qweight, sz, chunk_group, perm, bits, in_features, out_features)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def gather_positions(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` in a layout's position order, ``[M, Kp]``: column ``p`` is ``x[:, perm[p]]``, and 0
    where ``perm[p]`` is -1 (padding). Any device; ``perm`` int32 on ``x``'s device."""
    padded = torch.nn.functional.pad(x, (0, 1))  # column K: the zero that padding positions read
    index = torch.where(perm < 0, x.shape[1], perm)
    return padded.index_select(1, index)


def _dense_in_position_order(x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features, stream):
    """The dense path of an act-order layer: the weight dequantized in the layout's position order
    (whole rows written) and x gathered into that order, instead of the weight scattered back to its
    original columns (one 2-byte store per row and position). The same products, summed in another order."""
    w = torch.empty((out_features, perm.shape[0]), dtype=x.dtype, device=x.device)
    _C.gpu_dequantize_prepared(qweight, sz, chunk_group, perm, w, bits, in_features, out_features, stream,
                               positions=True)
    return torch.nn.functional.linear(gather_positions(x, perm), w, bias)


@quantized_matmul.register_fake
def _(x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features):
    _check_args(x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features)
    return x.new_empty((x.shape[0], out_features))


def _setup_context(ctx, inputs, output):
    x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features = inputs
    ctx.layout = (qweight, sz, chunk_group, perm, bits, in_features, out_features)


def _backward(ctx, grad):
    # Input gradients only (the quantized weight is frozen): grad_x = grad_y @ W.
    w = dequantize_layout(*ctx.layout)
    return (grad.to(w.dtype) @ w).to(grad.dtype), None, None, None, None, None, None, None, None


quantized_matmul.register_autograd(_backward, setup_context=_setup_context)
