"""gptqkit.HessianAccumulator against float64 (2/n) X^T X."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import correlated_activations
from reference_gptq import hessian_reference

torch = pytest.importorskip("torch")

K = 192
RTOL = 1e-5


def rel_fro(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def batches(seed=0, sizes=(300, 37, 512, 1, 128, 211), k=K):
    rng = np.random.default_rng(seed)
    return [correlated_activations(rng, b, k) for b in sizes]


@pytest.mark.parametrize("accumulate_dtype", ["float32", "float64"])
@pytest.mark.parametrize("library,input_dtype", [("numpy", "float32"), ("numpy", "float16"), ("torch", "float32"),
                                                 ("torch", "float16"), ("torch", "bfloat16")])
def test_matches_float64_reference(gptqkit, accumulate_dtype, input_dtype, library):
    xs = batches()
    if library == "torch":
        xs = [torch.from_numpy(x).to(getattr(torch, input_dtype)) for x in xs]
        seen = [x.float().numpy() for x in xs]          # the values after rounding
    else:
        xs = [x.astype(input_dtype) for x in xs]
        seen = [x.astype(np.float32) for x in xs]
    acc = gptqkit.HessianAccumulator(K, accumulate_dtype=accumulate_dtype)
    for x in xs:
        acc.add_batch(x)
    H = acc.hessian()
    assert isinstance(H, torch.Tensor if library == "torch" else np.ndarray)
    assert tuple(H.shape) == (K, K)
    assert str(H.dtype).endswith(accumulate_dtype)
    assert acc.n_samples == sum(x.shape[0] for x in seen)
    ref = hessian_reference(seen)
    err = rel_fro(_np(H), ref)
    assert err < RTOL, f"relative Frobenius error {err:.3g}"
    Hn = _np(H)
    np.testing.assert_array_equal(Hn, Hn.T)              # exactly symmetric


def test_float64_accumulation_is_tighter(gptqkit):
    xs = batches(sizes=(1000,) * 8)
    ref = hessian_reference(xs)
    errs = {}
    for dt in ("float32", "float64"):
        acc = gptqkit.HessianAccumulator(K, accumulate_dtype=dt)
        for x in xs:
            acc.add_batch(x)
        errs[dt] = rel_fro(acc.hessian(), ref)
    assert errs["float64"] < 1e-12, errs
    assert errs["float32"] < RTOL, errs


def test_three_dim_input(gptqkit):
    rng = np.random.default_rng(1)
    x = correlated_activations(rng, 4 * 96, K).reshape(4, 96, K)
    a = gptqkit.HessianAccumulator(K)
    a.add_batch(x)
    b = gptqkit.HessianAccumulator(K)
    b.add_batch(x.reshape(-1, K))
    assert a.n_samples == b.n_samples == 4 * 96
    np.testing.assert_array_equal(a.hessian(), b.hessian())
    assert rel_fro(a.hessian(), hessian_reference([x])) < RTOL
    t = gptqkit.HessianAccumulator(K)
    t.add_batch(torch.from_numpy(x))
    np.testing.assert_array_equal(t.hessian().numpy(), a.hessian())


def test_order_invariance(gptqkit):
    xs = batches(seed=2)
    ref = hessian_reference(xs)
    results = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3]):
        acc = gptqkit.HessianAccumulator(K)
        for i in order:
            acc.add_batch(xs[i])
        results.append(acc.hessian())
    for h in results:
        assert rel_fro(h, ref) < RTOL
        assert rel_fro(h, results[0]) < RTOL


def test_one_batch_or_many(gptqkit):
    xs = batches(seed=3)
    one = gptqkit.HessianAccumulator(K, accumulate_dtype="float64")
    one.add_batch(np.concatenate(xs))
    many = gptqkit.HessianAccumulator(K, accumulate_dtype="float64")
    for x in xs:
        many.add_batch(x)
    assert rel_fro(many.hessian(), one.hessian()) < 1e-12


def test_matches_running_torch_formulation(gptqkit):
    """The GPTQ running average (benchmarks/torch_gptq.TorchHessian) gives the same H."""
    from torch_gptq import TorchHessian
    xs = batches(seed=4)
    th = TorchHessian(K, dtype=torch.float64)
    acc = gptqkit.HessianAccumulator(K)
    for x in xs:
        th.add_batch(torch.from_numpy(x))
        acc.add_batch(x)
    assert th.n_samples == acc.n_samples
    assert rel_fro(acc.hessian(), th.H.numpy()) < RTOL


def test_n_samples_and_reset(gptqkit):
    xs = batches(seed=5)
    acc = gptqkit.HessianAccumulator(K)
    assert acc.n_samples == 0
    acc.add_batch(xs[0])
    acc.add_batch(xs[1])
    assert acc.n_samples == xs[0].shape[0] + xs[1].shape[0]
    acc.add_batch(np.zeros((0, K), np.float32))         # an empty batch is a no-op
    assert acc.n_samples == xs[0].shape[0] + xs[1].shape[0]
    acc.reset()
    assert acc.n_samples == 0
    acc.add_batch(xs[2])
    fresh = gptqkit.HessianAccumulator(K)
    fresh.add_batch(xs[2])
    assert acc.n_samples == xs[2].shape[0]
    np.testing.assert_array_equal(acc.hessian(), fresh.hessian())


def test_outlier_channels_float32(gptqkit):
    """Activations spanning ~6 decades of channel energy still accumulate to 1e-5."""
    rng = np.random.default_rng(6)
    xs = [correlated_activations(rng, 512, K, outliers=8) for _ in range(16)]
    for x in xs:
        x[:, :4] *= 100.0
    acc = gptqkit.HessianAccumulator(K)
    for x in xs:
        acc.add_batch(x)
    assert rel_fro(acc.hessian(), hessian_reference(xs)) < RTOL


def test_feeds_quantize_weight(gptqkit):
    """The accumulator's output is accepted by quantize_weight as is."""
    rng = np.random.default_rng(7)
    acc = gptqkit.HessianAccumulator(K)
    acc.add_batch(torch.from_numpy(correlated_activations(rng, 1024, K)))
    W = torch.randn(64, K)
    res = gptqkit.quantize_weight(W, acc.hessian(), bits=4, group_size=64)
    assert res.codes.shape == (64, K)
