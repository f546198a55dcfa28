"""Invalid arguments raise clear errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_weight, spd_hessian

torch = pytest.importorskip("torch")

N, K = 32, 64


@pytest.fixture(scope="module")
def wh():
    rng = np.random.default_rng(0)
    return random_weight(rng, N, K), spd_hessian(rng, K).astype(np.float32)


def test_not_positive_definite_is_runtime_error(gptqkit):
    assert issubclass(gptqkit.NotPositiveDefiniteError, RuntimeError)
    assert not issubclass(gptqkit.NotPositiveDefiniteError, ValueError)


@pytest.mark.parametrize("h_shape", [(K + 1, K + 1), (K, K + 1), (K - 1, K - 1), (K,), (K, K, 1)])
def test_hessian_shape_mismatch(gptqkit, wh, h_shape):
    W, _ = wh
    H = np.eye(int(np.prod(h_shape)) if len(h_shape) == 1 else h_shape[0], dtype=np.float32)
    H = np.resize(H, h_shape).astype(np.float32)
    with pytest.raises(ValueError, match="hessian"):
        gptqkit.quantize_weight(W, H)


@pytest.mark.parametrize("shape", [(K,), (2, N, K), (0, K), (N, 0)])
def test_weight_rank_and_empty(gptqkit, shape):
    W = np.zeros(shape, np.float32)
    H = np.eye(shape[-1] if shape[-1] else 1, dtype=np.float32)
    with pytest.raises(ValueError, match="weight"):
        gptqkit.quantize_weight(W, H)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.complex64])
def test_weight_dtype(gptqkit, wh, dtype):
    W, H = wh
    with pytest.raises((ValueError, TypeError), match="weight"):
        gptqkit.quantize_weight(W.astype(dtype), H)


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_hessian_dtype(gptqkit, wh, dtype):
    W, H = wh
    with pytest.raises((ValueError, TypeError), match="hessian"):
        gptqkit.quantize_weight(W, H.astype(dtype))


def test_hessian_bfloat16_rejected(gptqkit, wh):
    W, H = wh
    with pytest.raises((ValueError, TypeError), match="hessian"):
        gptqkit.quantize_weight(torch.from_numpy(W), torch.from_numpy(H).bfloat16())


def test_unsupported_input_type(gptqkit, wh):
    _, H = wh
    with pytest.raises((TypeError, ValueError), match="weight"):
        gptqkit.quantize_weight("not an array", H)


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16])
def test_bits(gptqkit, wh, bits):
    W, H = wh
    with pytest.raises(ValueError, match="bits"):
        gptqkit.quantize_weight(W, H, bits=bits)


@pytest.mark.parametrize("kw,match", [(dict(act_group_aware=True, desc_act=True), "act_group_aware.*desc_act"),
                                      (dict(act_group_aware=True, group_size=-1), "act_group_aware.*group_size > 0")])
def test_act_group_aware_conflicts(gptqkit, wh, kw, match):
    W, H = wh
    with pytest.raises(ValueError, match=match):
        gptqkit.quantize_weight(W, H, **kw)


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_group_size(gptqkit, wh, group_size):
    W, H = wh
    with pytest.raises(ValueError, match="group_size"):
        gptqkit.quantize_weight(W, H, group_size=group_size)


@pytest.mark.parametrize("block_size", [0, -1])
def test_block_size(gptqkit, wh, block_size):
    W, H = wh
    with pytest.raises(ValueError, match="block_size"):
        gptqkit.quantize_weight(W, H, block_size=block_size)


@pytest.mark.parametrize("damp", [-0.01, float("nan"), float("inf")])
def test_damp_percent(gptqkit, wh, damp):
    W, H = wh
    with pytest.raises(ValueError, match="damp_percent"):
        gptqkit.quantize_weight(W, H, damp_percent=damp)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_weight(gptqkit, wh, bad, dtype):
    W, H = wh
    Wt = torch.from_numpy(W.copy())
    Wt[3, 7] = bad
    Wt = Wt.to(getattr(torch, dtype))
    with pytest.raises(ValueError, match="weight"):
        gptqkit.quantize_weight(Wt, torch.from_numpy(H))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_hessian(gptqkit, wh, bad, dtype):
    W, H = wh
    H = H.astype(dtype)
    H[5, 9] = bad
    H[9, 5] = bad
    with pytest.raises(ValueError, match="hessian"):
        gptqkit.quantize_weight(W, H)
    H2 = wh[1].astype(dtype)
    H2[0, 0] = bad
    with pytest.raises(ValueError, match="hessian"):
        gptqkit.quantize_weight(W, H2)


def _rejects_or_matches(gptqkit, name, call, expected):
    """Non-contiguous input: either a ValueError naming the argument and
    mentioning contiguity, or a result identical to the contiguous input's."""
    try:
        got = call()
    except ValueError as e:
        msg = str(e)
        assert name in msg and "contiguous" in msg, msg
        return "rejected"
    for attr in ("codes", "scales", "zeros", "g_idx", "perm"):
        np.testing.assert_array_equal(np.asarray(getattr(got, attr)), np.asarray(getattr(expected, attr)),
                                      err_msg=attr)
    return "copied"


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["transposed", "sliced_cols", "sliced_rows"])
def test_non_contiguous_weight(gptqkit, wh, library, kind):
    W, H = wh
    conv = torch.from_numpy if library == "torch" else (lambda a: a)
    if kind == "transposed":
        view = conv(np.ascontiguousarray(W.T)).T          # [N, K] view, column-major
    elif kind == "sliced_cols":
        wide = np.repeat(W, 2, axis=1)                     # columns 0, 2, 4, ... are W
        view = conv(wide)[:, ::2]
    else:
        tall = np.repeat(W, 2, axis=0)
        view = conv(tall)[::2]
    assert not (view.is_contiguous() if library == "torch" else view.flags.c_contiguous)
    expected = gptqkit.quantize_weight(conv(W.copy()), conv(H.copy()), group_size=32)
    _rejects_or_matches(gptqkit, "weight", lambda: gptqkit.quantize_weight(view, conv(H.copy()), group_size=32),
                        expected)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_non_contiguous_hessian(gptqkit, wh, library):
    W, H = wh
    conv = torch.from_numpy if library == "torch" else (lambda a: a)
    big = np.zeros((2 * K, 2 * K), np.float32)
    big[::2, ::2] = H
    view = conv(big)[::2, ::2]
    expected = gptqkit.quantize_weight(conv(W.copy()), conv(H.copy()), group_size=32)
    _rejects_or_matches(gptqkit, "hessian", lambda: gptqkit.quantize_weight(conv(W.copy()), view, group_size=32),
                        expected)
    # A column-major copy of a symmetric H holds the same matrix.
    fortran = np.asfortranarray(H)
    if library == "torch":
        fortran = torch.from_numpy(np.ascontiguousarray(H)).t()
    _rejects_or_matches(gptqkit, "hessian", lambda: gptqkit.quantize_weight(conv(W.copy()), fortran, group_size=32),
                        expected)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_non_contiguous_activations(gptqkit, library):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((100, 2 * K)).astype(np.float32)
    conv = torch.from_numpy if library == "torch" else (lambda a: a)
    view = conv(x)[:, ::2]
    ref = gptqkit.HessianAccumulator(K)
    ref.add_batch(conv(np.ascontiguousarray(x[:, ::2])))
    acc = gptqkit.HessianAccumulator(K)
    try:
        acc.add_batch(view)
    except ValueError as e:
        assert "x" in str(e) and "contiguous" in str(e), str(e)
        assert acc.n_samples == 0
        return
    np.testing.assert_array_equal(np.asarray(acc.hessian()), np.asarray(ref.hessian()))


def test_activation_errors(gptqkit):
    acc = gptqkit.HessianAccumulator(K)
    with pytest.raises(ValueError, match="x"):
        acc.add_batch(np.zeros((10, K + 1), np.float32))          # wrong width
    with pytest.raises(ValueError, match="x"):
        acc.add_batch(np.zeros((2, 3, 4, K + 1), np.float32))     # wrong width, 4-d
    bad = np.ones((10, K), np.float32)
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="x"):
        acc.add_batch(bad)                                         # NaN activations
    with pytest.raises((ValueError, TypeError), match="x"):
        acc.add_batch(np.zeros((10, K), np.int32))                # integer activations
    with pytest.raises((ValueError, TypeError), match="x"):
        acc.add_batch(np.zeros((10, K), np.float64))              # float64 is not an accepted input
    assert acc.n_samples == 0                                      # failed calls leave no trace


def test_one_dimensional_activation_is_one_row(gptqkit):
    """A 1-d [K] activation is either one token or a clear error."""
    acc = gptqkit.HessianAccumulator(K)
    x = np.arange(K, dtype=np.float32)
    try:
        acc.add_batch(x)
    except ValueError as e:
        assert "x" in str(e)
        return
    assert acc.n_samples == 1
    np.testing.assert_allclose(acc.hessian(), 2.0 * np.outer(x, x), rtol=1e-6)


@pytest.mark.parametrize("k", [0, -3])
def test_accumulator_in_features(gptqkit, k):
    with pytest.raises(ValueError, match="in_features"):
        gptqkit.HessianAccumulator(k)


def test_accumulate_dtype(gptqkit):
    with pytest.raises(ValueError, match="accumulate_dtype"):
        gptqkit.HessianAccumulator(K, accumulate_dtype="float16")
