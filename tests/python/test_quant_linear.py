"""Tests of gptqkit.nn.QuantLinear and the native op _C.quantized_linear behind it.

The reference is the dense weight from gptqkit.dequantize (itself checked
bit by bit against docs/format.md in the pack tests) multiplied in float64.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from packed_layers import random_packed_layer  # noqa: E402


def _random_layer(gptqkit, n, k, bits, group_size, fmt="v1", act_order=False, seed=0):
    """A random packed layer with float32 scales (the fp16-scale case is test_cpu_gemm's)."""
    return random_packed_layer(gptqkit, n, k, bits, group_size, act_order=act_order, fmt=fmt, seed=seed,
                               scale_dtype=torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt,act_order,bias", [("v1", False, True), ("v2", True, False), ("v1", True, True)])
def test_forward_matches_dense_reference(gptqkit, bits, fmt, act_order, bias):
    from gptqkit.nn import QuantLinear

    n, k = 45, 100  # neither a multiple of 32; last group partial
    packed = _random_layer(gptqkit, n, k, bits, 32, fmt, act_order, seed=bits)
    b = torch.randn(n) if bias else None
    layer = QuantLinear.from_packed(packed, bias=b, group_size=32)
    x = torch.randn(2, 3, k)
    w = packed.dequantize().double()
    ref = x.double() @ w.T + (b.double() if bias else 0)
    y = layer(x)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    # float32 accumulation: the error scales with sum |x w| (8-bit weights reach ~12 here)
    mag = x.double().abs() @ w.abs().T + (b.double().abs() if bias else 0)
    assert ((y.double() - ref).abs() <= 2e-6 * mag + 1e-6).all()
    torch.testing.assert_close(layer.dequantize_weight(), packed.dequantize())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-5)])
def test_output_dtype_follows_input(gptqkit, dtype, tol):
    from gptqkit.nn import QuantLinear

    packed = _random_layer(gptqkit, 64, 96, 4, 32, act_order=True)
    layer = QuantLinear.from_packed(packed, bias=torch.randn(64).to(torch.float16))
    x = torch.randn(5, 96).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = x.double() @ packed.dequantize().double().T + layer.bias.double()
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol * scale


def test_scales_dtype_variants_agree(gptqkit):
    from gptqkit.nn import QuantLinear

    packed = _random_layer(gptqkit, 32, 64, 4, 16)
    layer16 = QuantLinear.from_packed(packed)
    layer32 = QuantLinear.from_packed(packed)
    layer32.scales = layer16.scales.float()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer16(x), layer32(x), rtol=0, atol=0)
    layer_bf = QuantLinear.from_packed(packed)
    layer_bf.scales = layer16.scales.to(torch.bfloat16)
    assert torch.isfinite(layer_bf(x)).all()


def test_non_contiguous_and_empty_inputs(gptqkit):
    from gptqkit.nn import QuantLinear

    layer = QuantLinear.from_packed(_random_layer(gptqkit, 16, 32, 4, 32))
    x = torch.randn(32, 6).T  # [6, 32], not contiguous
    torch.testing.assert_close(layer(x), layer(x.contiguous()))
    assert layer(torch.randn(0, 32)).shape == (0, 16)
    assert layer(torch.randn(2, 0, 32)).shape == (2, 0, 16)


def test_from_linear_and_conv1d(gptqkit):
    from transformers.pytorch_utils import Conv1D

    from gptqkit.nn import QuantLinear

    torch.manual_seed(0)
    x = torch.randn(4, 64)
    h = torch.as_tensor(2.0 / 256 * (lambda a: a.T @ a)(torch.randn(256, 64)))
    lin = torch.nn.Linear(64, 40)
    res = gptqkit.quantize_weight(lin.weight.detach(), h, bits=4, group_size=32)
    q = QuantLinear.from_linear(lin, res)
    assert (q.in_features, q.out_features, q.bits, q.group_size) == (64, 40, 4, 32)
    dense = torch.nn.Linear(64, 40)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize_weight())
        dense.bias.copy_(lin.bias)
    torch.testing.assert_close(q(x), dense(x), rtol=1e-5, atol=1e-5)

    conv = Conv1D(40, 64)  # nf=40 outputs, nx=64 inputs, weight [64, 40]
    res = gptqkit.quantize_weight(conv.weight.detach().T.contiguous(), h, bits=3, group_size=-1)
    qc = QuantLinear.from_linear(conv, res)
    assert (qc.in_features, qc.out_features) == (64, 40)
    torch.testing.assert_close(qc(x), x @ qc.dequantize_weight().T + conv.bias.detach(), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="result.codes"):
        QuantLinear.from_linear(torch.nn.Linear(32, 40), res)
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        QuantLinear.from_linear(torch.nn.Embedding(4, 4), res)


def test_from_packed_numpy_and_group_inference(gptqkit):
    from gptqkit.nn import QuantLinear

    codes = np.random.default_rng(0).integers(0, 16, size=(24, 70), dtype=np.uint8)
    zeros = np.full((3, 24), 8, dtype=np.int32)
    scales = np.full((3, 24), 0.01, dtype=np.float32)
    g_idx = (np.arange(70) // 32).astype(np.int32)
    packed = gptqkit.pack(codes, zeros, scales, g_idx, 4)
    layer = QuantLinear.from_packed(packed)
    assert layer.group_size == 24  # ceil(70 / 3): any size giving 3 groups describes the layout
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == torch.float16
    with pytest.raises(ValueError, match="group_size=16 gives 5 groups"):
        QuantLinear.from_packed(packed, group_size=16)


def test_state_dict_round_trip(gptqkit):
    from gptqkit.nn import QuantLinear

    src = QuantLinear.from_packed(_random_layer(gptqkit, 48, 64, 3, 16, act_order=True), bias=torch.randn(48))
    assert set(src.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    dst = QuantLinear(3, 16, 64, 48, bias=True, dtype=torch.float32)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_meta_construction_and_errors(gptqkit):
    from gptqkit.nn import QuantLinear

    big = QuantLinear(4, 128, 8192, 28672, bias=False, device="meta")  # would be ~117 MB of qweight
    assert big.qweight.device.type == "meta"
    assert tuple(big.qweight.shape) == (1024, 28672)
    assert tuple(big.qzeros.shape) == (64, 3584) and tuple(big.scales.shape) == (64, 28672)
    assert big.bias is None
    with pytest.raises(RuntimeError, match="meta device"):
        big(torch.randn(1, 8192))
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(5, 128, 64, 64)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(4, 0, 64, 64)
    with pytest.raises(ValueError, match="format"):
        QuantLinear(4, 32, 64, 64, format="v3")

    layer = QuantLinear.from_packed(_random_layer(gptqkit, 16, 32, 4, 32))
    with pytest.raises(ValueError, match="last dimension 32"):
        layer(torch.randn(2, 31))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 32, dtype=torch.int64))


def test_input_on_another_device_than_the_layer(gptqkit):
    from gptqkit.nn import QuantLinear

    layer = QuantLinear.from_packed(_random_layer(gptqkit, 16, 32, 4, 32))
    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        with pytest.raises(RuntimeError, match="move the input or the layer"):
            layer(torch.randn(2, 32, device="cuda"))
    fake = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="the input is on cuda:0 but the layer's tensors are on cpu"):
        layer._check_runnable(fake)


def test_input_gradient(gptqkit):
    from gptqkit.nn import QuantLinear

    layer = QuantLinear.from_packed(_random_layer(gptqkit, 24, 40, 4, 8, act_order=True), bias=torch.randn(24))
    x = torch.randn(3, 40, requires_grad=True)
    (layer(x) * torch.arange(24.0)).sum().backward()
    w = layer.dequantize_weight()
    torch.testing.assert_close(x.grad, (torch.arange(24.0) @ w).expand(3, 40), rtol=1e-5, atol=1e-5)
    assert not layer.qweight.requires_grad


def test_native_op_rejects_bad_arguments(gptqkit):
    from gptqkit._native import _C

    p = _random_layer(gptqkit, 16, 64, 4, 32)
    x = torch.randn(3, 64)
    y = torch.empty(3, 16)
    _C.quantized_linear(x, p.qweight, p.qzeros, p.scales, p.g_idx, None, 4, "v1", y)
    with pytest.raises(ValueError, match="y: expected the dtype of x"):
        _C.quantized_linear(x, p.qweight, p.qzeros, p.scales, p.g_idx, None, 4, "v1", torch.empty(3, 16).half())
    with pytest.raises(ValueError, match=r"qweight: expected shape \[16, 16\]"):
        _C.quantized_linear(x, p.qweight, p.qzeros, p.scales, p.g_idx, None, 8, "v1", y)
    with pytest.raises(ValueError, match=r"x: expected shape \[\*, 64\]"):
        _C.quantized_linear(torch.randn(3, 32), p.qweight, p.qzeros, p.scales, p.g_idx, None, 4, "v1", y)
    with pytest.raises(ValueError, match=r"bias: expected shape \[16\]"):
        _C.quantized_linear(x, p.qweight, p.qzeros, p.scales, p.g_idx, torch.zeros(15), 4, "v1", y)
    bad = p.g_idx.clone()
    bad[5] = 7
    with pytest.raises(ValueError, match=r"g_idx\[5\] = 7 is out of range"):
        _C.quantized_linear(x, p.qweight, p.qzeros, p.scales, bad, None, 4, "v1", y)
    with pytest.raises(ValueError, match="format"):
        _C.quantized_linear(x, p.qweight, p.qzeros, p.scales, p.g_idx, None, 4, "v9", y)
