"""The GPU solver against the CPU path (same W, same H).

Every test but the last group needs a GPU and a gptqkit built with a GPU
backend (GPTQKIT_WITH_CUDA=1 / GPTQKIT_WITH_HIP=1); they are skipped
otherwise. Run them under compute-sanitizer as docs/gpu.md shows.

The CPU-runnable tests at the end hand the core a view that claims to live on
a CUDA device (a hand-made DLPack capsule) and check that a CPU-only build
refuses it with NotImplementedError before touching its memory.
"""

from __future__ import annotations

import ctypes
import itertools

import numpy as np
import pytest
torch = pytest.importorskip("torch")

import gptqkit
from gptqkit import _C, ops

_NO_GPU = ops.gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(_NO_GPU is not None, reason=str(_NO_GPU))
cpu_only_build = pytest.mark.skipif(gptqkit.gpu_backend() is not None, reason="this gptqkit has a GPU backend")

K, N = 336, 96  # K: partial last group for group sizes 32 and 128


def make_problem(k=K, n=N, tokens=2048, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    rank = max(8, k // 8)
    mix = torch.randn(rank, k, generator=g) / rank ** 0.5
    chan = torch.exp(0.7 * torch.randn(k, generator=g))
    x = (torch.randn(tokens, rank, generator=g) @ mix + 0.3 * torch.randn(tokens, k, generator=g)) * chan
    for d in dead:
        x[:, d] = 0
    acc = gptqkit.HessianAccumulator(k)
    acc.add_batch(x.contiguous())
    H = acc.hessian()
    W = (0.02 * torch.randn(n, k, generator=g) * (1 + torch.rand(n, k, generator=g))).contiguous()
    return W, H


def calib_loss(W, res, H):
    D = W.double().cpu() - res.dequantize().double().cpu()
    return float(((D @ H.double().cpu()) * D).sum())


def compare(W, H, **opts):
    cpu = gptqkit.quantize_weight(W, H, **opts)
    gpu = gptqkit.quantize_weight(W.cuda(), H.cuda(), **opts)
    torch.cuda.synchronize()
    for name in ("codes", "scales", "zeros", "g_idx", "perm"):
        assert getattr(gpu, name).device.type == "cuda", name
    assert torch.equal(gpu.perm.cpu(), cpu.perm)
    assert torch.equal(gpu.g_idx.cpu(), cpu.g_idx)
    same = float((gpu.codes.cpu() == cpu.codes).double().mean())
    assert same >= 0.99, f"{opts}: only {same:.4%} identical codes"
    assert gpu.loss == pytest.approx(cpu.loss, rel=5e-3), opts
    assert calib_loss(W, gpu, H) == pytest.approx(calib_loss(W, cpu, H), rel=5e-3), opts
    assert gpu.damp_attempts == cpu.damp_attempts
    assert gpu.damp_used == pytest.approx(cpu.damp_used)
    assert gpu.dead_columns == cpu.dead_columns
    return cpu, gpu


OPTIONS = list(itertools.product((2, 3, 4, 8), (-1, 32, 128), (True, False), (False, True), (False, True), (0, 8)))


@needs_gpu
@pytest.mark.parametrize("bits,group_size,sym,desc_act,static_groups,clip_steps", OPTIONS)
def test_gpu_matches_cpu(bits, group_size, sym, desc_act, static_groups, clip_steps):
    W, H = make_problem(seed=bits)
    compare(W, H, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups,
            clip_steps=clip_steps)


@needs_gpu
@pytest.mark.parametrize("bits,group_size,sym,static_groups,clip_steps,block_size",
                         [(4, 32, True, False, 0, 128), (3, 128, False, False, 8, 128), (2, 64, False, True, 0, 128),
                          (8, 50, True, False, 0, 48), (4, 100, False, False, 4, 256)])
def test_gpu_act_group_aware_matches_cpu(bits, group_size, sym, static_groups, clip_steps, block_size):
    """Group-aware order (groups out of order, partial group last, groups across lazy blocks)."""
    W, H = make_problem(seed=11, dead=(5,))
    cpu, gpu = compare(W, H, bits=bits, group_size=group_size, sym=sym, static_groups=static_groups,
                       clip_steps=clip_steps, block_size=block_size, act_group_aware=True)
    assert torch.equal(gpu.g_idx.cpu(), torch.arange(W.shape[1], dtype=torch.int32) // group_size)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_weight_dtypes_fp16_scales_v1_zeros(dtype):
    W, H = make_problem(seed=5)
    W = W.to(dtype)
    compare(W, H, bits=4, group_size=32, sym=False, desc_act=True, clip_steps=4, fp16_scales=True, min_zero_point=1)


@needs_gpu
@pytest.mark.parametrize("block_size", [1, 32, 100, 256])
def test_block_sizes_and_float64_hessian(block_size):
    W, H = make_problem(seed=7)
    compare(W, H.double(), bits=3, group_size=32, desc_act=True, block_size=block_size)


@needs_gpu
@pytest.mark.parametrize("k,n,group_size,block_size", [(33, 7, 32, 16), (1, 1, -1, 128), (65, 1, 32, 128),
                                                       (1, 9, 128, 128), (129, 13, 50, 48)])
def test_odd_shapes(k, n, group_size, block_size):
    """Warps that leave the sweep early (N not a multiple of the rows per block), K below one tile."""
    W, H = make_problem(k=k, n=n, tokens=256, seed=k)
    compare(W, H, bits=4, group_size=group_size, sym=False, desc_act=True, block_size=block_size)


@needs_gpu
def test_block_size_above_gpu_limit_is_unsupported():
    W, H = make_problem(seed=1)
    with pytest.raises(NotImplementedError, match="block_size"):
        gptqkit.quantize_weight(W.cuda(), H.cuda(), block_size=512)


@needs_gpu
def test_dead_inputs():
    W, H = make_problem(seed=3, dead=(0, 17, 200))
    cpu, gpu = compare(W, H, bits=4, group_size=32, desc_act=True)
    assert gpu.dead_columns == 3


@needs_gpu
def test_non_default_stream():
    W, H = make_problem(seed=4)
    cpu = gptqkit.quantize_weight(W, H, group_size=32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        Wg, Hg = W.to("cuda", non_blocking=True), H.to("cuda", non_blocking=True)
        gpu = gptqkit.quantize_weight(Wg, Hg, group_size=32)
        codes = gpu.codes.cpu()
    s.synchronize()
    assert float((codes == cpu.codes).double().mean()) >= 0.99


def indefinite_hessian(k=128, min_eig_fraction=-0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    mean_diag = float(eig.mean())
    eig[0] = min_eig_fraction * mean_diag  # damping of 1 % fails, 3 % works
    return ((q * eig) @ q.T).contiguous()


@needs_gpu
def test_not_positive_definite_retry():
    H = indefinite_hessian()
    W = 0.02 * torch.randn(64, H.shape[0], generator=torch.Generator().manual_seed(1))
    cpu, gpu = compare(W, H, bits=4, group_size=32)
    assert gpu.damp_attempts == 2 and gpu.damp_used == pytest.approx(0.03)


@needs_gpu
def test_not_positive_definite_errors():
    H = indefinite_hessian(min_eig_fraction=-0.5)
    W = torch.randn(16, H.shape[0])
    with pytest.raises(gptqkit.NotPositiveDefiniteError, match="after 1 attempt"):
        gptqkit.quantize_weight(W.cuda(), H.cuda(), max_damp_retries=0)
    with pytest.raises(gptqkit.NotPositiveDefiniteError, match="mean of the diagonal"):
        gptqkit.quantize_weight(W.cuda(), -torch.eye(H.shape[0], device="cuda"))


@needs_gpu
def test_inverse_factor_matches_cpu():
    _, H = make_problem(k=200, seed=2)
    up_c = torch.empty(200, 200)
    up_g = torch.empty(200, 200, device="cuda")
    sc = _C.inverse_hessian_upper_factor(H, up_c, 0.01, 8)
    sg = _C.inverse_hessian_upper_factor(H.cuda(), up_g, 0.01, 8,
                                         stream=torch.cuda.current_stream().cuda_stream)
    assert sg["damp_attempts"] == sc["damp_attempts"]
    err = torch.linalg.norm(up_g.cpu().double() - up_c.double()) / torch.linalg.norm(up_c.double())
    assert err < 1e-4
    assert torch.count_nonzero(torch.tril(up_g, -1)) == 0


@needs_gpu
def test_non_finite_inputs():
    W, H = make_problem(seed=6)
    Wb = W.clone()
    Wb[3, 5] = float("nan")
    with pytest.raises(ValueError, match="weight: contains NaN"):
        gptqkit.quantize_weight(Wb.cuda(), H.cuda())
    acc = gptqkit.HessianAccumulator(K)
    x = torch.randn(10, K, device="cuda")
    x[2, 3] = float("inf")
    acc.add_batch(x)  # reported when the Hessian is read: no host sync per batch
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.hessian()


# ---- Hessian accumulation ------------------------------------------------------


def reference_hessian(batches):
    H = None
    n = 0
    for x in batches:
        x = x.reshape(-1, x.shape[-1]).double().cpu()
        b = x.shape[0]
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64) if H is None else H * (n / (n + b))
        n += b
        H += (2.0 / n) * (x.T @ x)
    return H


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [200, 256])
def test_hessian_matches_float64_reference(dtype, k):
    g = torch.Generator().manual_seed(k)
    chan = torch.exp(0.5 * torch.randn(k, generator=g))
    batches = [(torch.randn(rows, k, generator=g) * chan).to(dtype) for rows in (37, 512, 1, 300)]
    batches.append((torch.randn(2, 9, k, generator=g) * chan).to(dtype))  # [batch, seq, K]
    acc = gptqkit.HessianAccumulator(k)
    for x in batches:
        acc.add_batch(x.cuda())
    H = acc.hessian()
    assert H.device.type == "cuda" and H.dtype == torch.float32
    ref = reference_hessian(batches)
    err = float(torch.linalg.norm(H.cpu().double() - ref) / torch.linalg.norm(ref))
    assert err < 1e-4, err
    assert torch.equal(H, H.T)
    assert acc.n_samples == sum(x.reshape(-1, k).shape[0] for x in batches)
    acc.reset()
    acc.add_batch(batches[0].cuda())
    err = float(torch.linalg.norm(acc.hessian().cpu().double() - reference_hessian(batches[:1])) /
                torch.linalg.norm(reference_hessian(batches[:1])))
    assert err < 1e-4


@needs_gpu
def test_hessian_on_gpu_quantizes_like_cpu_hessian():
    # Tensor-core (16-bit) accumulation: only the fp32 summation order changes.
    W, _ = make_problem(seed=8)
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(4096, K, generator=g) * torch.exp(0.5 * torch.randn(K, generator=g))).half()
    acc_c, acc_g = gptqkit.HessianAccumulator(K), gptqkit.HessianAccumulator(K)
    acc_c.add_batch(x)
    acc_g.add_batch(x.cuda())
    res_c = gptqkit.quantize_weight(W, acc_c.hessian(), group_size=128)
    res_g = gptqkit.quantize_weight(W.cuda(), acc_g.hessian(), group_size=128)
    assert float((res_g.codes.cpu() == res_c.codes).double().mean()) >= 0.99
    assert res_g.loss == pytest.approx(res_c.loss, rel=5e-3)


@needs_gpu
def test_mismatched_devices():
    W, H = make_problem(seed=1)
    with pytest.raises(ValueError, match="same device"):
        gptqkit.quantize_weight(W.cuda(), H)
    with pytest.raises(ValueError, match="same device"):
        gptqkit.quantize_weight(W, H.cuda())
    acc = gptqkit.HessianAccumulator(K)
    acc.add_batch(torch.randn(4, K))
    with pytest.raises(ValueError, match="cannot mix devices"):
        acc.add_batch(torch.randn(4, K, device="cuda"))
    acc.reset()
    acc.add_batch(torch.randn(4, K, device="cuda"))  # fine after reset
    with pytest.raises(ValueError, match="cannot mix devices"):
        acc.add_batch(torch.randn(4, K))
    with pytest.raises(NotImplementedError, match="float64"):
        gptqkit.HessianAccumulator(K, accumulate_dtype="float64").add_batch(torch.randn(4, K, device="cuda"))


# ---- packing on the GPU -------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_pack_on_gpu_matches_cpu(bits, fmt):
    g = torch.Generator().manual_seed(bits)
    n, k, groups = 70, 203, 4  # neither a multiple of 32: partial chunks, 3-bit straddling words
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    lo = 1 if fmt == "v1" else 0
    zeros = torch.randint(lo, 2 ** bits + lo, (groups, n), generator=g, dtype=torch.int32)
    scales = torch.rand(groups, n, generator=g)
    g_idx = (torch.arange(k) * groups // k).to(torch.int32)
    cpu = gptqkit.pack(codes, zeros, scales, g_idx, bits=bits, format=fmt)
    gpu = gptqkit.pack(codes.cuda(), zeros.cuda(), scales.cuda(), g_idx.cuda(), bits=bits, format=fmt)
    assert gpu.qweight.device.type == "cuda" and gpu.qzeros.device.type == "cuda"
    assert torch.equal(gpu.qweight.cpu(), cpu.qweight)
    assert torch.equal(gpu.qzeros.cpu(), cpu.qzeros)


@needs_gpu
def test_pack_on_gpu_errors():
    codes = torch.zeros(4, 64, dtype=torch.uint8, device="cuda")
    codes[2, 5] = 16
    zeros = torch.ones(1, 4, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"codes: value 16 at \[n=2, k=5\]"):
        gptqkit.pack(codes, zeros, torch.ones(1, 4), torch.zeros(64, dtype=torch.int32), bits=4)
    codes[2, 5] = 1
    zeros[0, 3] = 0
    with pytest.raises(ValueError, match="zero point 0"):
        gptqkit.pack(codes, zeros, torch.ones(1, 4), torch.zeros(64, dtype=torch.int32), bits=4)
    with pytest.raises(ValueError, match="same device"):
        _C.pack_qweight(codes, 4, torch.empty(8, 4, dtype=torch.int32))


@needs_gpu
def test_quantize_and_pack_on_gpu():
    W, H = make_problem(seed=11)
    res = gptqkit.quantize_weight(W.cuda(), H.cuda(), bits=3, group_size=32, desc_act=True, sym=False,
                                  min_zero_point=1, fp16_scales=True)
    layer = gptqkit.pack(res.codes, res.zeros, res.scales, res.g_idx, bits=3)
    W_hat = gptqkit.dequantize(layer.qweight.cpu(), layer.qzeros.cpu(), layer.scales.cpu(), layer.g_idx.cpu(), bits=3)
    assert torch.allclose(W_hat, res.dequantize().cpu(), rtol=0, atol=0)


@needs_gpu
def test_shift_operator_on_gpu_matches_cpu():
    """Asymmetric calibration's M = D (H + λI)⁻¹ from the GPU factor, against the CPU one."""
    from gptqkit.gptaq import shift_operator

    _, H = make_problem(dead=(5,))
    D = 0.1 * torch.randn(H.shape, generator=torch.Generator().manual_seed(3)) @ H
    cpu = shift_operator(D, H)
    gpu = shift_operator(D.cuda(), H.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4 * float(cpu.abs().max()))


@needs_gpu
@pytest.mark.parametrize("desc_act,clip_steps,gptaq", [(False, 0, False), (True, 16, False), (True, 16, True)])
def test_model_quantize_on_gpu_matches_cpu(desc_act, clip_steps, gptaq):
    """GPTQForCausalLM.quantize(device="cuda"): activations stay on the GPU, Hessians are
    accumulated and layers solved there; the packed model matches a CPU run (also with
    asymmetric calibration: the unquantized model's stream and D on the GPU too)."""
    from tiny_models import make_tiny_model

    from gptqkit import GPTQForCausalLM, QuantizeConfig

    from tiny_models import VOCAB
    import gc

    from gptqkit._native import _C

    ids = torch.randint(4, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    gc.collect()
    native_before = _C.gpu_solver_memory()["current_bytes"]
    runs = {}
    for device in ("cpu", "cuda"):
        q = GPTQForCausalLM(make_tiny_model("llama"), QuantizeConfig(bits=4, group_size=32, desc_act=desc_act,
                                                                     clip_steps=clip_steps, gptaq=gptaq))
        report = q.quantize(ids, batch_size=2, device=device, progress=False)
        runs[device] = (report, {n: b.detach().cpu() for n, b in q.model.named_buffers() if n.endswith("qweight")})
    # Once the model is gone, so is every GPU buffer the native solver allocated
    # (Hessian accumulators, scratch): nothing outlives the run. (The collection
    # also lets compute-sanitizer's leak check see torch's tensors freed.)
    del q
    gc.collect()
    torch.cuda.synchronize()
    assert _C.gpu_solver_memory()["current_bytes"] == native_before
    (cpu_report, cpu_q), (gpu_report, gpu_q) = runs["cpu"], runs["cuda"]
    assert cpu_q.keys() == gpu_q.keys() and cpu_q
    same = sum(int((cpu_q[n] == gpu_q[n]).sum()) for n in cpu_q)
    total = sum(cpu_q[n].numel() for n in cpu_q)
    # A packed word holds 8 codes (99 % equal codes: ~92 % equal words), and later blocks see
    # inputs that float32 rounding made slightly different: looser than the per-layer tests.
    assert same / total >= 0.85
    for a, b in zip(cpu_report.layers, gpu_report.layers):
        assert a.name == b.name
        assert b.loss == pytest.approx(a.loss, rel=0.05, abs=1e-6)
        if gptaq:
            assert b.target_shift == pytest.approx(a.target_shift, rel=0.05, abs=1e-6)


# ---- CPU-only builds: GPU views are refused clearly ----------------------------------


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class FakeCudaArray:
    """Exports host memory through DLPack labelled as device cuda:0 (kDLCUDA).

    Only for checking that the core refuses GPU views before it reads them.
    """

    def __init__(self, shape, dtype=np.float32, device_type=2):
        self._device_type = device_type  # 2 = kDLCUDA, 10 = kDLROCM (what ROCm producers report)
        self._host = np.zeros(shape, dtype=dtype)
        self.shape = tuple(shape)
        self.ndim = len(shape)
        self._shape = (ctypes.c_int64 * self.ndim)(*shape)
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data = self._host.ctypes.data
        t.device = _DLDevice(device_type, 0)
        t.ndim = self.ndim
        t.dtype = _DLDataType(2, 8 * self._host.itemsize, 1)  # kDLFloat
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0

    def __dlpack__(self, **kwargs):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self._managed), b"dltensor", None)  # no destructor: we own the memory

    def __dlpack_device__(self):
        return (self._device_type, 0)


@cpu_only_build
@pytest.mark.parametrize("device_type", [2, 10], ids=["kDLCUDA", "kDLROCM"])
def test_cpu_only_build_refuses_gpu_tensors(device_type):
    """Memory DLPack labels as CUDA or as ROCm is GPU memory to the core: a CPU-only build refuses
    both, naming the missing backend, before reading it."""
    def gpu_array(shape):
        return FakeCudaArray(shape, device_type=device_type)

    assert gptqkit.gpu_backend() is None
    acc = gptqkit.HessianAccumulator(8)
    with pytest.raises(NotImplementedError, match="built without GPU support"):
        acc.add_batch(gpu_array((4, 8)))
    assert acc.n_samples == 0
    with pytest.raises(NotImplementedError, match="GPTQKIT_WITH_CUDA=1"):
        gptqkit.quantize_weight(gpu_array((4, 8)), np.eye(8, dtype=np.float32), group_size=-1)
    with pytest.raises(NotImplementedError, match="built without GPU support"):
        gptqkit.quantize_weight(np.ones((4, 8), np.float32), gpu_array((8, 8)), group_size=-1)
    with pytest.raises(NotImplementedError, match="built without GPU support"):
        _C.inverse_hessian_upper_factor(gpu_array((8, 8)), np.empty((8, 8), np.float32), 0.01, 8)
