"""Plain NumPy float64 reference of GPTQ (Frantar et al., 2022), the test oracle.

This is deliberately simple and slow: one column at a time, no lazy-batch
matrix updates, everything in float64. It follows the rules of the original
GPTQ ``fasterquant`` routine, which gptqkit reproduces:

* dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and their weights zeroed;
* the per-channel grid (``group_size == -1``) comes from the whole weight row;
* static groups take their grids from the unpermuted weight before the sweep;
* act-order (``desc_act``) processes columns by descending ``diag(H)``
  (stable sort, so ties keep their original order);
* group-aware act-order (``act_group_aware``) keeps every group of
  ``group_size`` columns whole: columns by descending ``diag(H)`` within the
  group, full groups by their largest ``diag(H)`` (descending, stable), a
  partial last group last; a group's grid then belongs to its original group;
* ``damp_percent * mean(diag H)`` is added to the diagonal, retried with 3x
  the damping (capped at 100 %) while the Cholesky factorization fails;
* the sweep uses U, the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``);
* a group that starts inside a lazy block of ``block_size`` columns takes its
  min/max from the weights as they stood at the start of that block (the
  original implementation quantizes from a clone of the block and computes
  group grids from the not-yet-updated matrix). Here that is a snapshot of
  ``W`` taken at every block boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ReferenceNotPositiveDefinite(RuntimeError):
    pass


@dataclass
class ReferenceResult:
    codes: np.ndarray     # uint8 [N, K], original column order
    scales: np.ndarray    # float64 [G, N]
    zeros: np.ndarray     # int64 [G, N]
    g_idx: np.ndarray     # int64 [K]
    perm: np.ndarray      # int64 [K]
    loss: float
    damp_used: float
    damp_attempts: int
    dead: np.ndarray      # bool [K]
    follow_distance: np.ndarray  # [N, K], see gptq_reference(follow=...)

    def dequantize(self) -> np.ndarray:
        s = self.scales[self.g_idx].T   # [N, K]
        z = self.zeros[self.g_idx].T
        return s * (self.codes.astype(np.float64) - z)


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-k // group_size)


def find_params(x: np.ndarray, bits: int, sym: bool):
    """Min-max grid per row of x [N, m]. Returns (scale [N], zero [N])."""
    maxq = 2 ** bits - 1
    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = np.maximum(x.max(axis=1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = np.where(empty, -1.0, xmin)
    xmax = np.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes (as float64) of x [N] on the grid (scale [N], zero [N])."""
    maxq = 2 ** bits - 1
    return np.clip(np.round(x / scale) + zero, 0, maxq)   # np.round: half to even


def upper_inverse_factor(h: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = h^-1, for an SPD h. Raises LinAlgError."""
    lower = np.linalg.cholesky(h)                  # h = L L^T
    lower_inv = np.linalg.inv(lower)
    h_inv = lower_inv.T @ lower_inv                # h^-1 = L^-T L^-1
    h_inv = (h_inv + h_inv.T) / 2
    return np.linalg.cholesky(h_inv).T             # h^-1 = (L2 L2^T) = U^T U, U = L2^T


def damped_upper_factor(h: np.ndarray, damp_percent: float, max_retries: int = 8):
    """Returns (U, damp_used, attempts); damping grows 3x per retry, capped at 1."""
    mean_diag = float(np.mean(np.diag(h)))
    damp = damp_percent
    for attempt in range(1, max_retries + 2):
        hd = h.copy()
        hd[np.diag_indices_from(hd)] += damp * mean_diag
        try:
            u = upper_inverse_factor(hd)
            if np.all(np.isfinite(u)) and np.all(np.diag(u) > 0):
                return u, damp, attempt
        except np.linalg.LinAlgError:
            pass
        damp = min(damp * 3.0, 1.0)
    raise ReferenceNotPositiveDefinite("hessian is not positive definite even with damping")


def group_aware_order(diag: np.ndarray, group_size: int) -> np.ndarray:
    """The column order of ``act_group_aware`` (see the module docstring)."""
    k = diag.shape[0]
    starts = list(range(0, k, group_size))
    full = [s for s in starts if s + group_size <= k]
    tail = [s for s in starts if s + group_size > k]
    full.sort(key=lambda s: -diag[s:s + group_size].max())    # Python's sort is stable
    pieces = []
    for s in full + tail:
        cols = np.arange(s, min(k, s + group_size))
        pieces.append(cols[np.argsort(-diag[cols], kind="stable")])
    return np.concatenate(pieces)


def gptq_reference(weight, hessian, bits=4, group_size=128, sym=True, desc_act=False,
                   static_groups=False, damp_percent=0.01, block_size=128,
                   max_damp_retries=8, follow=None, act_group_aware=False) -> ReferenceResult:
    """GPTQ of ``weight`` [N, K] given ``hessian`` [K, K].

    ``follow`` (optional uint8 [N, K] codes from another implementation, in
    original column order) turns on *follow mode*: wherever the other
    implementation chose a different code, the sweep continues with the other
    code instead of its own, and the result records how far (in quantization
    steps) the reference's unrounded value lay outside the rounding interval of
    the other code (``follow_distance``, 0 where the codes agree). Without it,
    a single tie broken differently (float32 vs float64) changes the error
    feedback of the rest of the row and makes later codes diverge; with it,
    every code of the other implementation is checked against the exact
    history it was produced from.
    """
    W = np.array(weight, dtype=np.float64, copy=True)
    H = np.array(hessian, dtype=np.float64, copy=True)
    n, k = W.shape
    assert H.shape == (k, k)
    maxq = 2 ** bits - 1

    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Grids that do not depend on the sweep.
    channel_grid = find_params(W, bits, sym) if group_size == -1 else None
    static = None
    if static_groups and group_size != -1:
        static = [find_params(W[:, g:g + group_size], bits, sym) for g in range(0, k, group_size)]

    if desc_act:
        perm = np.argsort(-np.diag(H), kind="stable")
    elif act_group_aware:
        perm = group_aware_order(np.diag(H), group_size)
    else:
        perm = np.arange(k)
    W = W[:, perm]
    H = H[np.ix_(perm, perm)]

    U, damp_used, attempts = damped_upper_factor(H, damp_percent, max_damp_retries)

    G = num_groups(k, group_size)
    scales = np.zeros((G, n))
    zeros = np.zeros((G, n))
    if channel_grid is not None:
        scales[0], zeros[0] = channel_grid
    if static is not None:
        for g, (s, z) in enumerate(static):
            scales[g], zeros[g] = s, z

    follow_perm = None if follow is None else np.asarray(follow)[:, perm].T.astype(np.float64)
    # The sweep works on the transpose: row i of Wt is column i of W (in
    # processing order), so a column and the columns after it are contiguous.
    Wt = W.T.copy()
    codes_perm = np.zeros((k, n))
    follow_distance = np.zeros((k, n))
    loss = 0.0
    snapshot = Wt.copy()
    scale = zero = None
    if channel_grid is not None:
        scale, zero = channel_grid
    for i in range(k):
        if i % block_size == 0:
            snapshot = Wt.copy()         # W as it stands at the start of this lazy block
        if group_size != -1:
            if static is not None:
                scale, zero = static[perm[i] // group_size]
            elif i % group_size == 0:
                scale, zero = find_params(snapshot[i:i + group_size].T, bits, sym)
                g = i // group_size if desc_act else perm[i] // group_size
                scales[g], zeros[g] = scale, zero
        w = Wt[i]
        c = quantize_codes(w, scale, zero, bits)
        if follow_perm is not None:
            other = follow_perm[i]
            v = w / scale + zero                     # unrounded, unclamped code
            lo = np.where(other == 0, -np.inf, other - 0.5)
            hi = np.where(other == maxq, np.inf, other + 0.5)
            follow_distance[i] = np.where(other == c, 0.0, np.maximum(np.maximum(lo - v, v - hi), 0.0))
            c = other
        q = scale * (c - zero)
        d = U[i, i]
        codes_perm[i] = c
        loss += float(np.sum((w - q) ** 2 / d ** 2)) / 2
        err = (w - q) / d
        Wt[i + 1:] -= np.outer(U[i, i + 1:], err)

    codes = np.zeros((n, k), dtype=np.uint8)
    codes[:, perm] = codes_perm.T.astype(np.uint8)
    distance = np.zeros((n, k))
    distance[:, perm] = follow_distance.T

    if group_size == -1:
        g_idx = np.zeros(k, dtype=np.int64)
    elif desc_act and not static_groups:
        g_idx = np.zeros(k, dtype=np.int64)
        g_idx[perm] = np.arange(k) // group_size
    else:
        g_idx = np.arange(k) // group_size

    assert np.all(codes <= maxq)
    return ReferenceResult(codes=codes, scales=scales, zeros=zeros.astype(np.int64), g_idx=g_idx,
                           perm=perm.astype(np.int64), loss=loss, damp_used=damp_used,
                           damp_attempts=attempts, dead=dead, follow_distance=distance)


def calibration_loss(weight, dequantized, hessian) -> float:
    """tr((W - Q) H (W - Q)^T) in float64: the layer's output error on the calibration set."""
    D = np.asarray(weight, dtype=np.float64) - np.asarray(dequantized, dtype=np.float64)
    H = np.asarray(hessian, dtype=np.float64)
    return float(np.einsum("nk,nk->", D @ H, D))


def hessian_reference(batches) -> np.ndarray:
    """(2/n) X^T X in float64 over all rows of all batches ([..., K] each)."""
    rows = [np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1]) for b in batches]
    X = np.concatenate(rows, axis=0)
    return 2.0 / X.shape[0] * (X.T @ X)
