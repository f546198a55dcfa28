"""Per-layer GPTQ cost: Hessian accumulation + quantization, PyTorch vs gptqkit.

For every shape (K in_features x N out_features) this feeds the same
activations and weights to

  (a) plain PyTorch in float32, the reference GPTQ formulation
      (benchmarks/torch_gptq.py: running-average Hessian, cholesky /
      cholesky_inverse / cholesky(upper=True), Python lazy-batch column loop);
  (b) gptqkit (HessianAccumulator + quantize_weight),

and prints the time of accumulation and of quantization for each, totals,
the speed-up (torch / gptqkit), the fraction of identical codes between the
two, and the calibration loss tr((W-Q) H (W-Q)^T) of each (both measured
with the same float64 H, so they are comparable).

Activations: ``--batches`` batches (64) of ``[--tokens, K]`` (512) float32
rows, drawn once per shape with a fixed seed: a low-rank correlated Gaussian
(rank K/16) plus isotropic noise, channel scales spread log-normally, and a
few outlier channels 20x larger, the way LLM layer inputs look.

Threads: ``--threads`` (default 2) sets torch.set_num_threads,
GPTQKIT_NUM_THREADS (gptqkit's own worker threads; it otherwise uses all
cores) and OPENBLAS_NUM_THREADS / OMP_NUM_THREADS (the BLAS under gptqkit's
Hessian update), all before gptqkit is imported.

Each measurement is the best of ``--repeat`` runs after a small warm-up.
Quantization: 4 bits, group 128, symmetric, block 128, damp 0.01, no act-order.

Run from the repository root:  python benchmarks/bench_solver.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2048x2048,4096x4096",
                   help="comma-separated KxN (in_features x out_features), default %(default)s")
    p.add_argument("--repeat", type=int, default=2, help="best of this many timed runs (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch, gptqkit and BLAS (default %(default)s)")
    p.add_argument("--batches", type=int, default=64, help="calibration batches (default %(default)s)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per batch (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


ARGS = parse_args()
# Thread settings must be in the environment before the libraries start their pools.
for var in ("GPTQKIT_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gptq import TorchHessian, torch_gptq  # noqa: E402

import gptqkit  # noqa: E402

QUANT = dict(bits=4, group_size=128, sym=True, desc_act=False, static_groups=False, damp_percent=0.01,
             block_size=128)


def make_inputs(k: int, n: int, batches: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rank = max(16, k // 16)
    mix = torch.randn(rank, k, generator=g) / rank ** 0.5
    chan = torch.exp(0.8 * torch.randn(k, generator=g))
    outliers = torch.randperm(k, generator=g)[:max(2, k // 512)]
    chan[outliers] *= 20.0
    xs = []
    for _ in range(batches):
        x = torch.randn(tokens, rank, generator=g) @ mix + 0.3 * torch.randn(tokens, k, generator=g)
        xs.append((x * chan).contiguous())
    # Weights with mildly heavy tails (Student t, 6 dof), std about 0.02.
    t = torch.distributions.StudentT(6.0)
    torch.manual_seed(seed + 1)
    W = (0.02 * t.sample((n, k))).float().contiguous()
    return xs, W


def run_torch(xs, W):
    t0 = time.perf_counter()
    acc = TorchHessian(W.shape[1])
    for x in xs:
        acc.add_batch(x)
    t1 = time.perf_counter()
    res = torch_gptq(W, acc.H, **QUANT)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, acc.H, res


def run_gptqkit(xs, W):
    t0 = time.perf_counter()
    acc = gptqkit.HessianAccumulator(W.shape[1])
    for x in xs:
        acc.add_batch(x)
    H = acc.hessian()
    t1 = time.perf_counter()
    res = gptqkit.quantize_weight(W, H, **QUANT)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, H, res


def calibration_loss(W, Q, H64):
    D = (W.double() - Q.double())
    return float(((D @ H64) * D).sum())


def main():
    torch.set_num_threads(ARGS.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in ARGS.shapes.split(",") if s]
    print(f"gptqkit {gptqkit.__version__} (BLAS: {getattr(gptqkit._C, 'blas', '?')}), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible")
    print(f"threads: torch.set_num_threads({ARGS.threads}), GPTQKIT_NUM_THREADS={ARGS.threads}, "
          f"OPENBLAS_NUM_THREADS={ARGS.threads}; best of {ARGS.repeat} after warm-up")
    print(f"calibration: {ARGS.batches} batches x {ARGS.tokens} tokens, float32; quantization: {QUANT}")

    # Warm-up: thread pools, BLAS kernels, allocator.
    wx, wW = make_inputs(256, 256, 2, 128, ARGS.seed + 99)
    run_torch(wx, wW)
    run_gptqkit(wx, wW)

    for k, n in shapes:
        xs, W = make_inputs(k, n, ARGS.batches, ARGS.tokens, ARGS.seed)
        best = {"torch": [float("inf")] * 2, "gptqkit": [float("inf")] * 2}
        out = {}
        for _ in range(max(1, ARGS.repeat)):
            for name, fn in (("torch", run_torch), ("gptqkit", run_gptqkit)):
                t_acc, t_q, H, res = fn(xs, W)
                best[name] = [min(best[name][0], t_acc), min(best[name][1], t_q)]
                out[name] = (H, res)
        H_t, r_t = out["torch"]
        H_g, r_g = out["gptqkit"]
        H64 = H_g.double()
        h_diff = float(torch.linalg.norm(H_t.double() - H64) / torch.linalg.norm(H64))
        same = float((r_t.codes == r_g.codes).double().mean())
        loss_t = calibration_loss(W, r_t.dequantize(), H64)
        loss_g = calibration_loss(W, r_g.dequantize(), H64)
        tt, tg = sum(best["torch"]), sum(best["gptqkit"])
        print(f"\nK x N = {k} x {n}")
        print(f"  {'':10s} {'accumulate':>11s} {'quantize':>10s} {'total':>9s}   calib. loss   GPTQ loss")
        print(f"  {'torch':10s} {best['torch'][0]:10.3f}s {best['torch'][1]:9.3f}s {tt:8.3f}s   "
              f"{loss_t:11.5g}   {r_t.loss:9.5g}")
        print(f"  {'gptqkit':10s} {best['gptqkit'][0]:10.3f}s {best['gptqkit'][1]:9.3f}s {tg:8.3f}s   "
              f"{loss_g:11.5g}   {r_g.loss:9.5g}")
        print(f"  {'ratio':10s} {best['torch'][0] / best['gptqkit'][0]:10.2f}x "
              f"{best['torch'][1] / best['gptqkit'][1]:9.2f}x {tt / tg:8.2f}x   (torch / gptqkit)")
        print(f"  identical codes: {same:.4%}; calib. loss gptqkit/torch - 1 = {loss_g / loss_t - 1:+.2e}; "
              f"|H_torch - H_gptqkit|_F / |H|_F = {h_diff:.2e}")
        del xs


if __name__ == "__main__":
    main()
