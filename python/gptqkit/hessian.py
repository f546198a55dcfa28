"""Streaming Hessian accumulation for GPTQ."""

from __future__ import annotations

from typing import Any

from gptqkit import _arrays, _gpu
from gptqkit._native import _C


class HessianAccumulator:
    """Accumulates the GPTQ Hessian ``H = (2/n) * sum_i x_i x_i^T`` of one layer.

    Feed it the layer's input activations batch by batch; it keeps the running
    average exactly as GPTQ does (``H <- H * n/(n+b) + (2/(n+b)) X^T X``) with
    one symmetric rank-k BLAS update per batch.

    Activations on a GPU (torch CUDA / ROCm tensors, builds with a GPU
    backend) are accumulated on that GPU, on the current stream, and the
    Hessian is returned there; one accumulator never mixes devices.

    Args:
        in_features: width K of every activation row.
        accumulate_dtype: ``"float32"`` (as the reference GPTQ) or ``"float64"``.

    Example::

        acc = HessianAccumulator(4096)
        for x in activations:          # [batch, seq, 4096] or [tokens, 4096]
            acc.add_batch(x)
        H = acc.hessian()              # [4096, 4096]
    """

    def __init__(self, in_features: int, accumulate_dtype: str = "float32"):
        if accumulate_dtype not in ("float32", "float64"):
            raise ValueError(f"accumulate_dtype: expected 'float32' or 'float64', got {accumulate_dtype!r}")
        self._acc = _C.HessianAccumulator(int(in_features), accumulate_dtype == "float64")
        self._dtype = accumulate_dtype
        self._like: Any = None

    @property
    def in_features(self) -> int:
        return self._acc.in_features

    @property
    def n_samples(self) -> int:
        """Number of activation rows (tokens) accumulated so far."""
        return self._acc.n_samples

    def add_batch(self, x) -> None:
        """Adds activations ``x`` of shape ``[..., K]`` (float32, float16 or bfloat16).

        Every row is one token; drop padded positions before calling.
        Non-contiguous inputs are rejected (call ``.contiguous()``).
        """
        x = _arrays.as_native(x, "x")
        if x.ndim > 3:
            x = x.reshape(-1, x.shape[-1])
        self._acc.add_batch(x, stream=_gpu.stream_of(x))
        self._like = x

    def hessian(self):
        """Returns the symmetric ``[K, K]`` Hessian (torch if torch tensors were added, on their device)."""
        k = self.in_features
        out = _gpu.empty(self._like, (k, k), self._dtype)
        self._acc.hessian(out, stream=_gpu.stream_of(out))
        return out

    def reset(self) -> None:
        """Forgets all accumulated batches."""
        self._acc.reset()
