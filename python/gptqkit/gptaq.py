"""Asymmetric calibration (GPTAQ, Li et al. 2025) as GPTQ on a shifted target.

Plain GPTQ fits every layer to its own inputs: with ``Xq`` the inputs the
layer receives in the partly quantized model (every earlier layer already
quantized), it minimises ``||(W - Q) Xq||²``. But ``Xq`` already carries the
error of all those earlier layers, and what the model should reproduce is the
full-precision output ``W X``, ``X`` being the inputs in the unquantized
model. Asymmetric calibration minimises ``||W X - Q Xq||²`` instead, so every
layer also compensates what the layers before it got wrong.

That problem is GPTQ's own on a shifted target, with the same Hessian. With
``H = 2/n Xq Xqᵀ + λI`` (GPTQ's damped Hessian; ``λ||W - Q||²`` is the term
the damping adds to the objective) and ``D = 2/n (X - Xq) Xqᵀ``::

    2/n ||W X - Q Xq||² + λ||W - Q||²  =  tr((W0 - Q) H (W0 - Q)ᵀ) + const,
    W0 = W + W D H⁻¹ = W (I + M),  M = D H⁻¹

(expand ``W X - Q Xq = (W - Q) Xq + W (X - Xq)`` and complete the square).
So the solver, its column orders, grids, clipping search and error feedback
are untouched: gptqkit hands it ``W0`` instead of ``W``. ``alpha`` scales the
shift (``W0 = W + alpha W M``; 1 is the exact asymmetric objective). The
GPTAQ paper reaches the same optimum with an extra term in the column sweep;
this form needs no change to the solver, on any backend.

What it costs: the unquantized model runs beside the quantized one (a second
hidden-state cache, a copy of the current block's original weights, and one
more forward pass per layer group), and one ``K x K`` matrix ``D`` per
distinct layer input while a group is collected.

:class:`InputShiftAccumulator` builds ``D`` batch by batch; :func:`shift_operator`
turns it into ``M``; :class:`FullPrecisionStream` carries the unquantized
model's activations through :meth:`gptqkit.GPTQForCausalLM.quantize`.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
from torch import nn

from gptqkit import _arrays, _gpu
from gptqkit._native import _C


class InputShiftAccumulator:
    """Accumulates ``D = 2/n Σ_t (x_t - xq_t) xq_tᵀ`` over token rows.

    ``x`` are a layer's inputs in the unquantized model, ``xq`` the same
    tokens' inputs in the partly quantized one, row for row. The scale ``2/n``
    is the one :class:`gptqkit.HessianAccumulator` gives ``H``, so that ``D``
    and ``H`` combine directly (:func:`shift_operator`).

    Rows are accumulated in float32 on the inputs' device (one ``K x K``
    buffer, updated in place).
    """

    def __init__(self, in_features: int):
        self.in_features = int(in_features)
        self.n_samples = 0
        self._sum: Optional[torch.Tensor] = None

    def add_batch(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        """Adds matching rows ``x [t, K]`` (unquantized model) and ``xq [t, K]`` (quantized model)."""
        if x.shape != xq.shape or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x, xq: expected two [tokens, {self.in_features}] matrices of one shape, got "
                             f"{list(x.shape)} and {list(xq.shape)}")
        if x.device != xq.device:
            raise ValueError(f"x, xq: on different devices ({x.device}, {xq.device})")
        xq = xq.float()
        diff = x.float() - xq
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=xq.device)
        self._sum.addmm_(diff.T, xq)
        self.n_samples += int(x.shape[0])

    def cross(self) -> torch.Tensor:
        """``D [K, K]`` (float32); all zeros when no row was added."""
        if self._sum is None or self.n_samples == 0:
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float32)
        return self._sum * (2.0 / self.n_samples)


def shift_operator(cross: torch.Tensor, hessian: torch.Tensor, damp_percent: float = 0.01,
                   max_damp_retries: int = 8) -> torch.Tensor:
    """``M = D (H + λI)⁻¹`` (float32 ``[K, K]``): the target for weight ``W`` is ``W + alpha W M``.

    The damping is the solver's (``λ = damp_percent * mean(diag H)``, raised
    by the same automatic retries when ``H + λI`` is not positive definite),
    and inputs that never activated (``H_ii == 0``) are treated as the solver
    treats them (``H_ii = 1``), so ``(H + λI)`` is exactly the matrix
    :func:`gptqkit.quantize_weight` then solves with. Runs where ``hessian``
    is (the native core factors it: CPU, or the GPU of a GPU build).

    Raises:
        ValueError: mismatched shapes or devices.
        NotPositiveDefiniteError: ``H`` stayed indefinite after all retries.
    """
    k = hessian.shape[-1]
    if hessian.shape != (k, k) or cross.shape != (k, k):
        raise ValueError(f"cross, hessian: expected two [K, K] matrices, got {list(cross.shape)} and "
                         f"{list(hessian.shape)}")
    h = hessian.detach().to(torch.float32, copy=True).contiguous()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    upper = torch.empty_like(h)
    _C.inverse_hessian_upper_factor(_arrays.as_native(h, "hessian"), _arrays.as_native(upper, "upper"),
                                    damp_percent=float(damp_percent), max_retries=int(max_damp_retries),
                                    stream=_gpu.stream_of(h))
    del h
    # (H + λI)⁻¹ = Uᵀ U, so D (H + λI)⁻¹ = (D Uᵀ) U: two products, no explicit inverse.
    return (cross.to(upper.device, torch.float32) @ upper.T) @ upper


def shifted_target(weight: torch.Tensor, operator: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``W + alpha W M`` in float32: the weight GPTQ quantizes under asymmetric calibration."""
    w = weight.to(torch.float32)
    return torch.addmm(w, w, operator.to(w.device), alpha=float(alpha)).contiguous()


class FullPrecisionStream:
    """The unquantized model's block inputs, run beside the quantized ones during ``quantize``.

    ``hidden[b]`` is batch ``b``'s input to the current block in the
    unquantized model. Before a layer of the block is quantized its original
    weight is kept (:meth:`keep_original`), so that the block can still run
    as it was (:meth:`original_weights`) to give the unquantized inputs of
    its later layers and, at the end, of the next block.
    """

    def __init__(self, hidden: List[torch.Tensor]):
        self.hidden = hidden
        self._originals: Dict[str, tuple] = {}
        #: outputs of the unquantized block's parts, replayed within the block (set by the quantize loop)
        self.replay = None
        #: whether ``hidden`` already holds the next block's inputs
        self.advanced = False

    def keep_original(self, block: nn.Module, name: str) -> None:
        """Remembers the weight of ``block``'s layer ``name`` before it is overwritten."""
        if name not in self._originals:
            layer = block.get_submodule(name)
            self._originals[name] = (layer, layer.weight.detach().clone())

    @contextlib.contextmanager
    def original_weights(self):
        """Context manager: the kept layers run with their original weights (storage swapped, not copied)."""
        swapped = []
        try:
            for layer, original in self._originals.values():
                current = layer.weight.data
                layer.weight.data = original
                swapped.append((layer, current))
            yield
        finally:
            for layer, current in swapped:
                layer.weight.data = current

    def end_block(self) -> None:
        """Drops the current block's kept weights and replayed outputs."""
        self._originals.clear()
        self.replay = None
        self.advanced = False
