"""Device routing of the core API: tensors on a GPU go to the GPU solver.

PyTorch on ROCm also names its devices "cuda", so one test covers both
backends; DLPack tells the native core which kind of device it really is.
"""

from __future__ import annotations

from typing import Any, Optional

from gptqkit import _arrays
from gptqkit._native import _C

try:  # torch is optional for the core API
    import torch
except ImportError:  # pragma: no cover
    torch = None


def gpu_backend() -> Optional[str]:
    """``"cuda"`` or ``"hip"`` when this build of gptqkit has a GPU backend, else ``None``."""
    name = getattr(_C, "gpu_backend", None)
    backend = name() if callable(name) else None
    return backend if backend in ("cuda", "hip") else None


def on_gpu(x: Any) -> bool:
    return _arrays.is_torch(x) and x.device.type == "cuda"


def stream_of(x: Any) -> int:
    """The current stream of ``x``'s device as an integer (0, the default stream, for CPU arrays)."""
    if on_gpu(x):
        return int(torch.cuda.current_stream(x.device).cuda_stream)
    return 0


def empty(like: Any, shape, dtype: str):
    """An uninitialised array of ``dtype`` in ``like``'s library and on its device."""
    if on_gpu(like):
        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=like.device)
    return _arrays.empty(like, shape, dtype)
