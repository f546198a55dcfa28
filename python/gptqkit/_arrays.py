"""Helpers that let the public API accept torch tensors and numpy arrays alike.

Results are returned in the array library of the main input (torch in, torch
out; numpy in, numpy out). Arrays cross into the native core through DLPack,
so the core never links libtorch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # torch is optional for the core API
    import torch
except ImportError:  # pragma: no cover
    torch = None

_NP_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
}


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def as_native(x: Any, name: str):
    """Returns ``x`` ready to cross into the core: a CPU array with ``__dlpack__``.

    Lists and scalars become numpy arrays; torch tensors that require grad are
    detached. Contiguity is not fixed here: the core rejects non-contiguous
    views with a message naming the argument, so no silent copy hides a
    caller's mistake.
    """
    if is_torch(x):
        return x.detach()
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        return x
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def empty(like: Any, shape, dtype: str):
    """An uninitialised CPU array of ``dtype`` in the array library of ``like``."""
    if is_torch(like):
        return torch.empty(tuple(shape), dtype=getattr(torch, dtype))
    return np.empty(tuple(shape), dtype=_NP_DTYPES[dtype])


def zeros(like: Any, shape, dtype: str):
    if is_torch(like):
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype))
    return np.zeros(tuple(shape), dtype=_NP_DTYPES[dtype])


def shape_of(x: Any) -> tuple:
    return tuple(int(s) for s in x.shape)
