"""What the GPU benchmarks share: why a GPU benchmark cannot run here, if it cannot."""

from __future__ import annotations

from typing import Optional

import torch


def gpu_unavailable_reason() -> Optional[str]:
    """``None`` when a CUDA GPU and a gptqkit built with GPU support are present, else why not."""
    if not torch.cuda.is_available():
        return "this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from gptqkit import ops
    except Exception as exc:  # pragma: no cover
        return f"gptqkit is not importable: {exc}"
    if ops.gpu_backend() == "none":
        return ("this benchmark needs a CUDA GPU and a gptqkit built with GPU support "
                "(GPTQKIT_WITH_CUDA=1 pip install .)")
    return None
