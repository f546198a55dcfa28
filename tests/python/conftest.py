"""Shared fixtures for the gptqkit Python tests.

Tests that exercise gptqkit take the ``gptqkit`` fixture, which skips them
(with the import error as the reason) when the extension is not importable;
the self-tests of the NumPy reference run regardless.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for p in (HERE, os.path.join(REPO, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

try:
    import gptqkit as _gptqkit
    _IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken build raising something else
    _gptqkit = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def gptqkit():
    if _gptqkit is None:
        pytest.skip(f"gptqkit is not importable ({_IMPORT_ERROR}); build it with "
                    "`pip install --no-build-isolation -e .`")
    return _gptqkit


@pytest.fixture(scope="module")
def fast_cpu():
    """Keeps a module of tiny-model tests fast on a small shared CPU (results do not depend on
    it); use it with ``pytestmark = pytest.mark.usefixtures("fast_cpu")``.

    * One intra-op thread: the tiny matrices gain nothing from threads, and
      OpenMP workers spinning on a 2-core machine slow every op down by 4x.
    * ``gc.freeze()``: ``quantize`` runs a full ``gc.collect()`` after each
      block, which scans every object transformers and torch created at
      import (~0.25 s a call); frozen objects are skipped.
    """
    import gc

    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(20221031)


def correlated_activations(rng, rows: int, k: int, outliers: int = 4, rank: int | None = None,
                           dtype=np.float32) -> np.ndarray:
    """Activations that look like an LLM layer's input: correlated channels
    (a low-dimensional latent structure plus noise), per-channel scales spread
    over about two orders of magnitude, and a few large outlier channels."""
    rank = rank or max(8, k // 8)
    mix = rng.standard_normal((rank, k)) / np.sqrt(rank)
    x = rng.standard_normal((rows, rank)) @ mix + 0.3 * rng.standard_normal((rows, k))
    x *= np.exp(rng.normal(0.0, 0.8, size=k))          # channel scale spread
    if outliers:
        cols = rng.choice(k, size=outliers, replace=False)
        x[:, cols] *= 20.0
    return x.astype(dtype)


def spd_hessian(rng, k: int, rows: int | None = None, **kw) -> np.ndarray:
    """GPTQ-style Hessian (2/n) X^T X from correlated activations, float64."""
    rows = rows or 4 * k
    x = correlated_activations(rng, rows, k, dtype=np.float64, **kw)
    return 2.0 / rows * (x.T @ x)


def random_weight(rng, n: int, k: int) -> np.ndarray:
    """Weights with mildly heavy tails, like a trained linear layer."""
    w = 0.02 * rng.standard_t(df=6, size=(n, k))
    return w.astype(np.float32)


@pytest.fixture
def make_hessian():
    return spd_hessian


@pytest.fixture
def make_weight():
    return random_weight


@pytest.fixture
def make_activations():
    return correlated_activations
