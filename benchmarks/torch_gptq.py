"""GPTQ in plain PyTorch, formulated the way the reference GPTQ code does it.

This is the baseline for ``bench_solver.py`` (and a second, independently
formulated implementation the tests compare the NumPy oracle against):

* the Hessian is a running average, ``H *= n/(n+b); H += (2/(n+b)) X^T X``;
* H^-1 comes from ``torch.linalg.cholesky``, ``torch.cholesky_inverse`` and
  ``torch.linalg.cholesky(upper=True)``;
* the sweep is the lazy-batch ("blocked") column loop in Python: columns are
  quantized one by one inside a block of ``block_size`` columns with rank-1
  updates of that block, and the rest of the matrix is updated once per block
  with a matmul.

Everything runs in ``dtype`` (float32 by default, like GPTQ), on the device
of the inputs (``TorchHessian(..., device="cuda")`` and CUDA weights give the
GPU baseline of ``bench_gpu_solver.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class TorchHessian:
    """Running GPTQ Hessian: H = (2/n) sum_i x_i x_i^T over all rows seen."""

    def __init__(self, in_features: int, dtype=torch.float32, device="cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_samples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        b = x.shape[0]
        if b == 0:
            return
        self.H *= self.n_samples / (self.n_samples + b)
        self.n_samples += b
        x = math.sqrt(2.0 / self.n_samples) * x
        self.H += x.t() @ x


def _grid(x: torch.Tensor, maxq: int, sym: bool):
    """Min-max grid per row of x [N, m] -> (scale [N], zero [N])."""
    zero_vec = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zero_vec)
    xmax = torch.maximum(x.max(dim=1).values, zero_vec)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


@dataclass
class TorchGPTQResult:
    codes: torch.Tensor    # uint8 [N, K], original column order
    scales: torch.Tensor   # [G, N]
    zeros: torch.Tensor    # int32 [G, N]
    g_idx: torch.Tensor    # int32 [K]
    perm: torch.Tensor     # int64 [K]
    loss: float

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scales[g].t() * (self.codes.to(self.scales.dtype) - self.zeros[g].t().to(self.scales.dtype))


def torch_gptq(weight: torch.Tensor, H: torch.Tensor, bits=4, group_size=128, sym=True,
               desc_act=False, static_groups=False, damp_percent=0.01, block_size=128,
               dtype=torch.float32) -> TorchGPTQResult:
    W = weight.detach().clone().to(dtype)
    H = H.detach().clone().to(dtype=dtype, device=W.device)
    dev = W.device
    rows, columns = W.shape
    maxq = 2 ** bits - 1

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if group_size == -1:
        channel = _grid(W, maxq, sym)
    static = []
    if static_groups and group_size != -1:
        static = [_grid(W[:, g:g + group_size], maxq, sym) for g in range(0, columns, group_size)]

    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    else:
        perm = torch.arange(columns, device=dev)
    W = W[:, perm]
    H = H[perm][:, perm]

    damp = damp_percent * torch.mean(torch.diag(H))
    idx = torch.arange(columns, device=dev)
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)

    codes = torch.zeros(rows, columns, dtype=torch.uint8, device=dev)
    grids = []
    losses = torch.zeros(rows, dtype=dtype, device=dev)
    scale, zero = channel if group_size == -1 else (None, None)

    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1:
                if static_groups:
                    scale, zero = static[int(perm[col]) // group_size]
                elif col % group_size == 0:
                    # From W, which this block's updates have not reached yet.
                    scale, zero = _grid(W[:, col:col + group_size], maxq, sym)
                    grids.append((scale, zero))
            c = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            q = scale * (c - zero)
            codes[:, col] = c.to(torch.uint8)
            losses += (w - q) ** 2 / d ** 2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    codes = codes[:, invperm]
    if group_size == -1:
        grids = [channel]
        g_idx = torch.zeros(columns, dtype=torch.int32, device=dev)
    elif static_groups:
        grids = static
        g_idx = (torch.arange(columns, device=dev) // group_size).to(torch.int32)
    elif desc_act:
        g_idx = torch.empty(columns, dtype=torch.int32, device=dev)
        g_idx[perm] = (torch.arange(columns, device=dev) // group_size).to(torch.int32)
    else:
        g_idx = (torch.arange(columns, device=dev) // group_size).to(torch.int32)
    scales = torch.stack([s for s, _ in grids])
    zeros = torch.stack([z for _, z in grids]).to(torch.int32)
    return TorchGPTQResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, perm=perm,
                           loss=float(losses.sum()))
