"""GPTQ per layer on the GPU: gptqkit's GPU solver vs plain PyTorch, same run.

For every shape (K in_features x N out_features; default the issue's
4096x4096, 11008x4096 (11008 -> 4096) and 28672x8192 (28672 -> 8192)) this
feeds the same activations and weights to

  (a) plain PyTorch on the GPU in float32, the usual GPTQ formulation
      (benchmarks/torch_gptq.py with CUDA tensors: running-average Hessian in
      fp32 matmuls, torch.linalg.cholesky / cholesky_inverse /
      cholesky(upper=True), the Python lazy-batch column loop);
  (b) gptqkit: HessianAccumulator.add_batch on the GPU tensors (16-bit input
      on tensor cores, fp32 accumulation) and quantize_weight on the GPU,

and prints for each the time of Hessian accumulation and of quantization
(4 bits, group 128, symmetric, block 128, damp 0.01), the ratio
torch / gptqkit, identical codes, calibration loss tr((W-Q) H (W-Q)^T) of
both (measured with the same float64 H), and peak GPU memory (torch's
allocator peak; for gptqkit plus the solver's own scratch, which torch's
allocator does not see).

Calibration: --batches (128) batches of --tokens (2048) rows = 262,144 tokens,
--act-dtype (float16) on the GPU. Activations are a low-rank correlated
Gaussian plus noise with log-normal channel scales and outlier channels, as
LLM layer inputs look. A pool of --pool distinct batches is generated up
front and cycled (generation is not timed; holding all 262,144 x 28,672 fp16
values would take 15 GB).

--model llama-7b times the solver over every linear layer of a Llama-style
model with 7B shapes (32 blocks: q/k/v share one Hessian, o, gate/up share
one, down), random weights, the same calibration size per Hessian; no
download, and no forward passes (those are the model's cost, not the
solver's): it reports the solver's minutes for the whole model.

Needs a CUDA (or ROCm) GPU and gptqkit built with GPTQKIT_WITH_CUDA=1 (or
GPTQKIT_WITH_HIP=1); otherwise it says so and exits.

Run from the repository root:  python benchmarks/bench_gpu_solver.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096,28672x8192",
                   help="comma-separated KxN (in_features x out_features), default %(default)s")
    p.add_argument("--batches", type=int, default=128, help="calibration batches (default %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (default %(default)s)")
    p.add_argument("--pool", type=int, default=8, help="distinct batches generated and cycled (default %(default)s)")
    p.add_argument("--act-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--repeat", type=int, default=1, help="best of this many timed runs (default %(default)s)")
    p.add_argument("--skip-torch", action="store_true", help="time gptqkit only")
    p.add_argument("--model", choices=("llama-7b",), default=None,
                   help="time the solver over a whole random Llama-style model instead of --shapes")
    p.add_argument("--blocks", type=int, default=32, help="decoder blocks for --model (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


ARGS = parse_args()

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

QUANT = dict(bits=4, group_size=128, sym=True, desc_act=False, static_groups=False, damp_percent=0.01,
             block_size=128)
GiB = float(1 << 30)


def need_gpu() -> bool:
    from gptqkit.ops import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"bench_gpu_solver: {reason}; nothing to measure here.")
        return False
    return True


def sync():
    torch.cuda.synchronize()


def make_pool(k: int, pool: int, tokens: int, dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rank = max(16, k // 16)
    mix = torch.randn(rank, k, generator=g, device="cuda") / rank ** 0.5
    chan = torch.exp(0.8 * torch.randn(k, generator=g, device="cuda"))
    outliers = torch.randperm(k, generator=g, device="cuda")[:max(2, k // 512)]
    chan[outliers] *= 20.0
    xs = []
    for _ in range(pool):
        x = torch.randn(tokens, rank, generator=g, device="cuda") @ mix
        x += 0.3 * torch.randn(tokens, k, generator=g, device="cuda")
        xs.append((x * chan).to(dtype).contiguous())
    return xs


def make_weight(n: int, k: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    # Mildly heavy tails, std about 0.02.
    w = torch.randn(n, k, generator=g, device="cuda")
    w *= 0.02 * (1.0 + 0.5 * torch.rand(n, k, generator=g, device="cuda") ** 4)
    return w.contiguous()


def batches(pool, count):
    for i in range(count):
        yield pool[i % len(pool)]


def run_torch(pool, W, count):
    from torch_gptq import TorchHessian, torch_gptq

    sync()
    t0 = time.perf_counter()
    acc = TorchHessian(W.shape[1], device="cuda")
    for x in batches(pool, count):
        acc.add_batch(x)
    sync()
    t1 = time.perf_counter()
    res = torch_gptq(W, acc.H, **QUANT)
    sync()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, acc.H, res


def run_gptqkit(pool, W, count):
    import gptqkit

    sync()
    t0 = time.perf_counter()
    acc = gptqkit.HessianAccumulator(W.shape[1])
    for x in batches(pool, count):
        acc.add_batch(x)
    H = acc.hessian()
    sync()
    t1 = time.perf_counter()
    res = gptqkit.quantize_weight(W, H, **QUANT)
    sync()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, H, res


def calibration_loss(W, Q, H64):
    total = 0.0
    for r0 in range(0, W.shape[0], 1024):  # bounded float64 temporaries
        D = W[r0:r0 + 1024].double() - Q[r0:r0 + 1024].double()
        total += float(((D @ H64) * D).sum())
    return total


def peak(fn, *args):
    """Runs fn, returns (its result, torch allocator peak bytes, gptqkit scratch peak bytes)."""
    import gptqkit

    sync()
    torch.cuda.reset_peak_memory_stats()
    gptqkit._C.gpu_solver_memory(reset_peak=True)
    base = torch.cuda.memory_allocated()
    out = fn(*args)
    sync()
    torch_peak = torch.cuda.max_memory_allocated() - base
    own = gptqkit._C.gpu_solver_memory()["peak_bytes"]
    return out, torch_peak, own


def bench_shapes():
    dtype = getattr(torch, ARGS.act_dtype)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in ARGS.shapes.split(",") if s]
    count = ARGS.batches
    print(f"calibration: {count} batches x {ARGS.tokens} tokens = {count * ARGS.tokens:,} tokens, {ARGS.act_dtype}; "
          f"quantization: {QUANT}")
    # Warm-up: kernels, allocator, cuSOLVER handles.
    wp = make_pool(256, 2, 256, dtype, ARGS.seed + 99)
    wW = make_weight(256, 256, ARGS.seed + 99)
    run_gptqkit(wp, wW, 2)
    if not ARGS.skip_torch:
        run_torch(wp, wW, 2)
    del wp, wW

    for k, n in shapes:
        pool = make_pool(k, ARGS.pool, ARGS.tokens, dtype, ARGS.seed)
        W = make_weight(n, k, ARGS.seed)
        names = ["gptqkit"] + ([] if ARGS.skip_torch else ["torch"])
        best = {name: [float("inf")] * 2 for name in names}
        mem = {}
        out = {}
        for _ in range(max(1, ARGS.repeat)):
            for name in names:
                fn = run_gptqkit if name == "gptqkit" else run_torch
                (t_acc, t_q, H, res), torch_peak, own = peak(fn, pool, W, count)
                best[name] = [min(best[name][0], t_acc), min(best[name][1], t_q)]
                mem[name] = (torch_peak, own)
                out[name] = (H, res)
                del H, res
        print(f"\nK x N = {k} x {n} ({k} -> {n})")
        print(f"  {'':8s} {'accumulate':>11s} {'quantize':>10s} {'total':>9s}   {'peak GPU memory':>16s}")
        for name in names:
            tp, own = mem[name]
            extra = f" (+{own / GiB:.2f} GiB solver scratch)" if name == "gptqkit" else ""
            print(f"  {name:8s} {best[name][0]:10.3f}s {best[name][1]:9.3f}s {sum(best[name]):8.3f}s   "
                  f"{(tp + own) / GiB:12.2f} GiB{extra}")
        H_g, r_g = out["gptqkit"]
        H64 = H_g.double()
        loss_g = calibration_loss(W, r_g.dequantize(), H64)
        if not ARGS.skip_torch:
            H_t, r_t = out["torch"]
            tt, tg = sum(best["torch"]), sum(best["gptqkit"])
            print(f"  {'ratio':8s} {best['torch'][0] / best['gptqkit'][0]:10.2f}x "
                  f"{best['torch'][1] / best['gptqkit'][1]:9.2f}x {tt / tg:8.2f}x   (torch / gptqkit; goal >= 5x)")
            loss_t = calibration_loss(W, r_t.dequantize(), H64)
            same = float((r_t.codes == r_g.codes).double().mean())
            h_diff = float(torch.linalg.norm(H_t.double() - H64) / torch.linalg.norm(H64))
            print(f"  identical codes: {same:.4%}; calib. loss torch {loss_t:.5g}, gptqkit {loss_g:.5g} "
                  f"(gptqkit/torch - 1 = {loss_g / loss_t - 1:+.2e}); |H_torch - H_gptqkit|_F / |H|_F = {h_diff:.2e}")
            del H_t, r_t
        else:
            print(f"  calib. loss gptqkit {loss_g:.5g}")
        del pool, W, out, H_g, r_g, H64
        torch.cuda.empty_cache()


def bench_model():
    import gptqkit

    dtype = getattr(torch, ARGS.act_dtype)
    hidden, inter = 4096, 11008
    # (in_features, [out_features of the layers sharing this input])
    groups = [(hidden, [hidden, hidden, hidden]),   # q, k, v
              (hidden, [hidden]),                   # o
              (hidden, [inter, inter]),             # gate, up
              (inter, [hidden])]                    # down
    count = ARGS.batches
    print(f"Llama-style 7B shapes, {ARGS.blocks} blocks, random weights; {count * ARGS.tokens:,} calibration tokens "
          f"per Hessian ({ARGS.act_dtype}); {QUANT}; solver only (no forward passes)")
    pools = {k: make_pool(k, ARGS.pool, ARGS.tokens, dtype, ARGS.seed + k) for k in (hidden, inter)}
    sync()
    t_acc = t_q = 0.0
    layers = 0
    start = time.perf_counter()
    for b in range(ARGS.blocks):
        for gi, (k, outs) in enumerate(groups):
            t0 = time.perf_counter()
            acc = gptqkit.HessianAccumulator(k)
            for x in batches(pools[k], count):
                acc.add_batch(x)
            H = acc.hessian()
            sync()
            t1 = time.perf_counter()
            for li, n in enumerate(outs):
                W = make_weight(n, k, ARGS.seed + 1000 * b + 10 * gi + li)
                sync()
                t2 = time.perf_counter()
                res = gptqkit.quantize_weight(W, H, **QUANT)
                sync()
                t_q += time.perf_counter() - t2
                layers += 1
                del W, res
            t_acc += t1 - t0
            del acc, H
        print(f"  block {b + 1}/{ARGS.blocks}: {time.perf_counter() - start:8.1f} s so far", flush=True)
    total = time.perf_counter() - start
    print(f"\n{layers} layers: accumulate {t_acc:.1f} s + quantize {t_q:.1f} s; end to end {total / 60:.2f} min "
          f"(incl. weight generation)")


def main():
    if not need_gpu():
        return 0
    import gptqkit

    print(f"gptqkit {gptqkit.__version__} ({gptqkit.gpu_backend()}), torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")
    if ARGS.model:
        bench_model()
    else:
        bench_shapes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
