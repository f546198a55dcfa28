"""Tests of the fused CPU GEMM (``_C.CpuPreparedWeight`` / ``_C.cpu_gemm``) and its use by QuantLinear.

The oracle is the dense weight from ``gptqkit.dequantize`` multiplied with the
(dtype-rounded) input in float64. The tolerance is float32 accumulation
error, relative to ``sum_k |x_k w_nk|``, plus one rounding of a 16-bit output.
Every kernel variant this CPU can run is checked, on both routes (the fused
kernel, and dequantize + BLAS for large M).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from packed_layers import random_packed_layer  # noqa: E402 (needs torch)

OUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FUSED, BLAS = 1 << 40, 0  # blas_min_rows forcing either route


def _prepare(packed):
    from gptqkit._native import _C

    return _C.CpuPreparedWeight(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, packed.bits,
                                packed.format)


def _check(prepared, w64, m, dtype, kernel, route, bias=None, seed=0):
    from gptqkit._native import _C

    g = torch.Generator().manual_seed(seed)
    n, k = w64.shape
    x = torch.randn(m, k, generator=g).to(dtype)
    y = torch.full((m, n), float("nan"), dtype=dtype)
    _C.cpu_gemm(x, prepared, bias, y, kernel, route)
    ref = x.double() @ w64.T
    mag = x.double().abs() @ w64.abs().T
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    tol = 2e-6 * mag + OUT_ROUNDING[dtype] * ref.abs() + (2.0 ** -24 if dtype == torch.float16 else 0.0)
    err = (y.double() - ref).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"kernel={kernel} route={'blas' if route == BLAS else 'fused'} dtype={dtype} m={m}: "
                           f"{int(bad.sum())} outputs off, worst {float((err - tol).max()):.3g} above tolerance")


def _kernels():
    from gptqkit._native import _C

    return list(_C.cpu_kernels_available())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, False), (32, True), (128, False), (128, True)])
def test_matches_dequantize_oracle(gptqkit, bits, group_size, act_order):
    n, k = 77, 200  # neither a multiple of 8, 32 or 128
    packed = random_packed_layer(gptqkit, n, k, bits, group_size, act_order, seed=bits * 10 + max(group_size, 0))
    w64 = packed.dequantize().double()
    prepared = _prepare(packed)
    assert (prepared.in_features, prepared.out_features, prepared.bits) == (k, n, bits)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for kernel in _kernels():
        for route in (FUSED, BLAS):
            for i, m in enumerate((1, 2, 3, 7, 16, 64, 257)):
                dtype = dtypes[i % 3]
                _check(prepared, w64, m, dtype, kernel, route, bias=bias.to(dtype) if i % 2 else None, seed=m)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_long_k(gptqkit, bits):
    n, k = 64, 4096
    for group_size, act_order in ((-1, False), (128, True)):
        packed = random_packed_layer(gptqkit, n, k, bits, group_size, act_order, seed=bits)
        w64 = packed.dequantize().double()
        prepared = _prepare(packed)
        for kernel in _kernels():
            for m in (1, 3, 16):
                _check(prepared, w64, m, torch.float32, kernel, FUSED, seed=m)
            _check(prepared, w64, 2, torch.bfloat16, kernel, BLAS, seed=5)


def test_kernel_names_and_environment_override(gptqkit):
    from gptqkit._native import _C

    name = _C.cpu_kernel_name()
    available = _C.cpu_kernels_available()
    assert name in ("generic", "avx2", "avx512")
    assert "generic" in available and name in available
    assert set(available) <= set(_C.cpu_kernels_built())
    # The variant is chosen once per process: the override needs a fresh one.
    # (The other variants are exercised through the kernel= argument above.)
    code = "from gptqkit._native import _C; print(_C.cpu_kernel_name())"
    env = dict(os.environ, GPTQKIT_CPU_KERNEL="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"
    env = dict(os.environ, GPTQKIT_CPU_KERNEL="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "ignoring GPTQKIT_CPU_KERNEL=sse9" in out.stderr
    assert out.stdout.strip() in available


def test_bad_arguments_raise_clear_errors(gptqkit):
    from gptqkit._native import _C

    p = random_packed_layer(gptqkit, 16, 64, 4, 32)
    with pytest.raises(ValueError, match=r"qweight: expected shape \[16, 16\]"):
        _C.CpuPreparedWeight(p.qweight, p.qzeros, p.scales, p.g_idx, 8, "v1")
    with pytest.raises(ValueError, match="scales: expected dtype"):
        _C.CpuPreparedWeight(p.qweight, p.qzeros, p.scales.int(), p.g_idx, 4, "v1")
    with pytest.raises(ValueError, match="qweight: expected dtype int32"):
        _C.CpuPreparedWeight(p.qweight.float(), p.qzeros, p.scales, p.g_idx, 4, "v1")
    bad = p.g_idx.clone()
    bad[3] = 2
    with pytest.raises(ValueError, match=r"g_idx\[3\] = 2 is out of range"):
        _C.CpuPreparedWeight(p.qweight, p.qzeros, p.scales, bad, 4, "v1")
    with pytest.raises(ValueError, match="format"):
        _C.CpuPreparedWeight(p.qweight, p.qzeros, p.scales, p.g_idx, 4, "v3")
    with pytest.raises(ValueError, match="bits"):
        _C.CpuPreparedWeight(p.qweight, p.qzeros, p.scales, p.g_idx, 5, "v1")

    w = _prepare(p)
    x, y = torch.randn(3, 64), torch.empty(3, 16)
    _C.cpu_gemm(x, w, None, y)
    with pytest.raises(ValueError, match=r"x: expected shape \[\*, 64\]"):
        _C.cpu_gemm(torch.randn(3, 63), w, None, y)
    with pytest.raises(ValueError, match="x: expected dtype"):
        _C.cpu_gemm(x.double(), w, None, y)
    with pytest.raises(ValueError, match="x: expected a 2-d array"):
        _C.cpu_gemm(torch.randn(64), w, None, y)
    with pytest.raises(ValueError, match="y: expected the dtype of x"):
        _C.cpu_gemm(x, w, None, y.half())
    with pytest.raises(ValueError, match=r"y: expected shape \[3, 16\]"):
        _C.cpu_gemm(x, w, None, torch.empty(3, 15))
    with pytest.raises(ValueError, match=r"bias: expected shape \[16\]"):
        _C.cpu_gemm(x, w, torch.zeros(15), y)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.cpu_gemm(torch.randn(64, 3).T, w, None, y)
    with pytest.raises(ValueError, match="kernel"):
        _C.cpu_gemm(x, w, None, y, "sse9")
    for kernel in set(_C.cpu_kernels_built()) - set(_C.cpu_kernels_available()):
        with pytest.raises(NotImplementedError, match="options.kernel"):
            _C.cpu_gemm(x, w, None, y, kernel)


def test_numpy_arrays_and_grad_inputs(gptqkit):
    import numpy as np

    from gptqkit._native import _C

    p = random_packed_layer(gptqkit, 24, 64, 4, 32)
    w = _prepare(p)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    y = np.empty((2, 24), dtype=np.float32)
    _C.cpu_gemm(x, w, None, y)  # numpy arrays take the generic DLPack path
    np.testing.assert_allclose(y, x @ p.dequantize().numpy().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(BufferError, match="require"):  # torch refuses to export it; use .detach()
        _C.cpu_gemm(torch.randn(2, 64, requires_grad=True), w, None, torch.empty(2, 24))


def test_prepared_copy_is_about_the_packed_size(gptqkit):
    packed = random_packed_layer(gptqkit, 512, 1024, 4, 128, act_order=True)
    prepared = _prepare(packed)
    packed_bytes = sum(t.numel() * t.element_size() for t in (packed.qweight, packed.qzeros, packed.scales,
                                                               packed.g_idx))
    assert prepared.reordered
    assert prepared.nbytes < 1.15 * packed_bytes  # not dense: fp32 would be 8x qweight
    assert "CpuPreparedWeight(in_features=1024" in repr(prepared)


def test_quant_linear_prepares_once_and_follows_buffer_changes(gptqkit):
    from gptqkit.nn import QuantLinear

    p1 = random_packed_layer(gptqkit, 48, 96, 4, 32, act_order=True, seed=1)
    p2 = random_packed_layer(gptqkit, 48, 96, 4, 32, seed=2)
    layer = QuantLinear.from_packed(p1, bias=torch.randn(48))
    x = torch.randn(5, 96)

    def expect(packed):
        ref = x.double() @ packed.dequantize().double().T + layer.bias.double()
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-4)

    expect(p1)
    first = layer.prepared_cpu_weight()
    layer(x)
    assert layer.prepared_cpu_weight() is first  # cached

    layer.load_state_dict(QuantLinear.from_packed(p2, bias=layer.bias.clone()).state_dict())  # in-place copies
    assert layer.prepared_cpu_weight() is not first
    expect(p2)

    second = layer.prepared_cpu_weight()
    with torch.no_grad():
        layer.qweight.copy_(p1.qweight)  # in place, outside load_state_dict
        layer.qzeros.copy_(p1.qzeros)
        layer.scales.copy_(p1.scales)
        layer.g_idx.copy_(p1.g_idx)
    assert layer.prepared_cpu_weight() is not second
    expect(p1)

    layer._assign(p2.qweight, p2.qzeros, p2.scales, p2.g_idx, layer.bias)
    assert "_cpu_prepared" not in layer.__dict__  # released right away
    expect(p2)

    layer.scales = p1.scales.float()  # attribute assignment of a buffer
    assert "_cpu_prepared" not in layer.__dict__
    layer(x)

    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), layer(x))
    assert "_cpu_prepared" not in layer.state_dict()
    layer.release_cpu_weight()
    assert "_cpu_prepared" not in layer.__dict__


def test_quant_linear_under_inference_mode(gptqkit):
    from gptqkit.nn import QuantLinear

    packed = random_packed_layer(gptqkit, 40, 64, 3, 16)
    with torch.inference_mode():
        layer = QuantLinear.from_packed(packed)  # inference tensors have no version counter
        x = torch.randn(2, 64)
        y = layer(x)
        assert layer.prepared_cpu_weight() is layer.prepared_cpu_weight()
    torch.testing.assert_close(y.double(), x.double() @ packed.dequantize().double().T, rtol=1e-5, atol=1e-5)
