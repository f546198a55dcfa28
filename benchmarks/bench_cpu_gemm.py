"""Benchmark of gptqkit's fused low-bit CPU GEMM against PyTorch, 2 threads, same run.

For each weight shape K x N and each batch M (rows of x) it times

* gptqkit: ``y = x @ W.T`` with W packed int4, group size 128 (``_C.cpu_gemm``
  on a prepared weight, float32 x: what ``QuantLinear.forward`` runs; large M
  is routed to dequantize + BLAS by the library itself),
* torch fp32: ``F.linear`` with the dense float32 weight,
* torch bf16: ``F.linear`` with bfloat16 x and weight,
* torch int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (the CPU kernel
  other GPTQ tools use), weight from ``_convert_weight_to_int4pack_for_cpu``
  and the same codes, scales and zeros (``scales_and_zeros[g, n] = (scale,
  scale * (8 - zero))``, since its dequantization is ``(q - 8) * scale +
  zero``). It is timed with bfloat16 and with float32 activations and the
  faster of the two is compared.

Each time is the best of several runs after a warm-up (the machine may be
shared; best-of is the least noisy statistic); medians are kept in the JSON.
The contenders run in short blocks, in turn, round after round, so that they
all sample the same stretches of time.
It also measures the memory bandwidth (a large numpy copy, and a 2-thread
torch copy) and states the M = 1 bound: bytes of the prepared weight divided
by that bandwidth.

    python benchmarks/bench_cpu_gemm.py                   # full sweep, plot to docs/cpu_gemm_sweep.png
    python benchmarks/bench_cpu_gemm.py --quick           # one shape, few M
    python benchmarks/bench_cpu_gemm.py --crossover       # fused kernel vs dequantize + BLAS by M
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

def _threads_from_argv(default=2):
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


THREADS = _threads_from_argv()
os.environ["GPTQKIT_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gptqkit  # noqa: E402
from gptqkit._native import _C  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # K x N
MS = [1, 2, 4, 8, 16, 64, 256]
GROUP = 128


def timeit(fn, min_time=0.4, min_runs=5, max_runs=50):
    """(best, median) seconds per call after two warm-up calls."""
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


_EVICT = None


def evict_caches():
    """Streams 2 x 64 MiB through the caches, so the next call reads its weight from DRAM."""
    global _EVICT
    if _EVICT is None:
        _EVICT = (np.ones(16 << 20, dtype=np.float32), np.empty(16 << 20, dtype=np.float32))
    np.copyto(_EVICT[1], _EVICT[0])


def timeit_interleaved(fns, flush=False, budget=2.0, block=0.03, min_rounds=3, max_rounds=20):
    """{name: (best, median)} seconds per call.

    The contenders run in blocks (each one repeatedly for about `block` seconds, at least 2
    calls), block after block, round after round: on a machine shared with other jobs the CPU
    time a process gets changes from second to second, and timing one contender after the
    other would compare different conditions. Within a block the first call is not timed, so
    that the previous contender's threads (PyTorch's OpenMP workers spin for a while after
    each parallel region) are out of the way. flush: evict the caches before every call."""
    times = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget and rounds < max_rounds):
        for name, fn in fns.items():
            fn()  # untimed: warm-up / hand-over from the previous contender
            t_block = time.perf_counter()
            calls = 0
            while calls < 2 or time.perf_counter() - t_block < block:
                if flush:
                    evict_caches()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                calls += 1
        rounds += 1
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def bandwidth():
    """GB/s of a STREAM-like copy (bytes read + bytes written per second): numpy (1 thread) and torch (2)."""
    a = np.ones(64 << 20, dtype=np.float32)  # 256 MiB, far beyond the caches
    b = np.empty_like(a)
    t_np, _ = timeit(lambda: np.copyto(b, a), min_time=1.0)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_torch, _ = timeit(lambda: tb.copy_(ta), min_time=1.0)
    return 2 * a.nbytes / t_np / 1e9, 2 * a.nbytes / t_torch / 1e9


def make_layer(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = k // GROUP
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    zeros = torch.randint(4, 13, (groups, n), dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.004 + 0.001).half()
    g_idx = (torch.arange(k) // GROUP).to(torch.int32)
    return codes, zeros, scales, g_idx, gptqkit.pack(codes, zeros, scales, g_idx, 4, "v1")


def bench_shape(k, n, ms, with_torch=True):
    codes, zeros, scales, g_idx, packed = make_layer(k, n)
    prepared = _C.CpuPreparedWeight(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, 4, "v1")
    rows = []
    dense = packed.dequantize() if with_torch else None  # float32 [N, K]
    if with_torch:
        dense_bf16 = dense.to(torch.bfloat16)
        w_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        s32 = scales.float()
        sz = torch.stack([s32, s32 * (8 - zeros.float())], dim=2).contiguous()  # [G, N, 2]
        sz_bf16 = sz.to(torch.bfloat16)
    for m in ms:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = torch.empty(m, n)
        xb = x.to(torch.bfloat16)
        hot = {"gptqkit": lambda: _C.cpu_gemm(x, prepared, None, y)}
        cold = {}
        if m == 1:
            cold["gptqkit_cold"] = hot["gptqkit"]
        if with_torch:
            hot["torch_fp32"] = lambda: F.linear(x, dense)
            hot["torch_bf16"] = lambda: F.linear(xb, dense_bf16)
            hot["torch_int4_bf16"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w_int4, GROUP, sz_bf16)
            if m <= 4:  # its float32 path is far slower than its bf16 one at every M measured
                hot["torch_int4_fp32"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w_int4, GROUP, sz)
            if m == 1:
                cold["torch_fp32_cold"] = hot["torch_fp32"]
                cold["torch_int4_bf16_cold"] = hot["torch_int4_bf16"]
        r = {"K": k, "N": n, "M": m}
        r.update(timeit_interleaved(hot))
        if cold:
            r.update(timeit_interleaved(cold, flush=True))
        if with_torch:  # correctness guard: same weights, same answer
            ref = F.linear(x[:1], dense)
            got = torch.empty(1, n)
            _C.cpu_gemm(x[:1].contiguous(), prepared, None, got)
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3), "gptqkit and torch fp32 disagree"
        rows.append(r)
        best = {key: v[0] for key, v in r.items() if isinstance(v, tuple)}
        line = f"  K={k:5d} N={n:5d} M={m:4d}  gptqkit {best['gptqkit'] * 1e3:8.3f} ms"
        if with_torch:
            int4 = min(best["torch_int4_bf16"], best.get("torch_int4_fp32", float("inf")))
            line += (f" | fp32 {best['torch_fp32'] * 1e3:8.3f} ({best['torch_fp32'] / best['gptqkit']:5.2f}x)"
                     f" | bf16 {best['torch_bf16'] * 1e3:8.3f} ({best['torch_bf16'] / best['gptqkit']:5.2f}x)"
                     f" | int4 {int4 * 1e3:8.3f} ({int4 / best['gptqkit']:5.2f}x)")
        if m == 1:
            line += f"\n  {'':27s}caches flushed: gptqkit {best['gptqkit_cold'] * 1e3:8.3f} ms"
            if with_torch:
                line += (f" | fp32 {best['torch_fp32_cold'] * 1e3:8.3f} "
                         f"({best['torch_fp32_cold'] / best['gptqkit_cold']:5.2f}x)"
                         f" | int4 {best['torch_int4_bf16_cold'] * 1e3:8.3f} "
                         f"({best['torch_int4_bf16_cold'] / best['gptqkit_cold']:5.2f}x)")
        print(line, flush=True)
    return prepared.nbytes, rows


def crossover(k=4096, n=4096, ms=(8, 16, 32, 48, 64, 96, 128, 192, 256)):
    """Fused kernel vs dequantize + BLAS, forced, by M."""
    *_, packed = make_layer(k, n)
    prepared = _C.CpuPreparedWeight(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, 4, "v1")
    out = []
    print(f"crossover, K={k} N={n} int4 g128, kernel {_C.cpu_kernel_name()}:")
    for m in ms:
        x = torch.randn(m, k)
        y = torch.empty(m, n)
        fused = timeit(lambda: _C.cpu_gemm(x, prepared, None, y, "auto", 1 << 40))[0]
        blas = timeit(lambda: _C.cpu_gemm(x, prepared, None, y, "auto", 0))[0]
        print(f"  M={m:4d}  fused {fused * 1e3:8.2f} ms   dequantize+BLAS {blas * 1e3:8.2f} ms   "
              f"{'fused' if fused < blas else 'BLAS'} wins", flush=True)
        out.append({"M": m, "fused": fused, "blas": blas})
    return out


def markdown_table(results):
    """The sweep as a markdown table: best-of-N milliseconds, and each torch time over gptqkit's."""
    lines = ["| K x N | M | gptqkit int4 | torch fp32 | torch bf16 | torch int4 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        g = r["gptqkit"][0]
        int4 = min(r["torch_int4_bf16"][0], r.get("torch_int4_fp32", (float("inf"),))[0])
        cells = [f"{t * 1e3:.2f} ms ({t / g:.1f}x)" for t in (r["torch_fp32"][0], r["torch_bf16"][0], int4)]
        lines.append(f"| {r['K']} x {r['N']} | {r['M']} | {g * 1e3:.2f} ms | " + " | ".join(cells) + " |")
        if "gptqkit_cold" in r:
            gc = r["gptqkit_cold"][0]
            lines.append(f"| (caches flushed) | {r['M']} | {gc * 1e3:.2f} ms | "
                         f"{r['torch_fp32_cold'][0] * 1e3:.2f} ms ({r['torch_fp32_cold'][0] / gc:.1f}x) | | "
                         f"{r['torch_int4_bf16_cold'][0] * 1e3:.2f} ms ({r['torch_int4_bf16_cold'][0] / gc:.1f}x) |")
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["K"], r["N"]) for r in results}, key=lambda s: SHAPES.index(s) if s in SHAPES else 0)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.2), squeeze=False)
    series = [("gptqkit", "gptqkit int4 (fp32 x)", "C3", "o-"), ("torch_fp32", "torch fp32", "C0", "s--"),
              ("torch_bf16", "torch bf16", "C2", "^--"), ("torch_int4", "torch int4 (_weight_int4pack_mm_for_cpu)",
                                                         "C1", "d--")]
    for ax, (k, n) in zip(axes[0], shapes):
        rows = [r for r in results if (r["K"], r["N"]) == (k, n)]
        ms = [r["M"] for r in rows]
        for key, label, color, style in series:
            if key == "torch_int4":
                ys = [min(r["torch_int4_bf16"][0], r.get("torch_int4_fp32", (float("inf"),))[0]) for r in rows]
            else:
                ys = [r[key][0] for r in rows]
            ax.plot(ms, [y * 1e3 for y in ys], style, color=color, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("time per call (ms), best of N")
        ax.set_title(f"K={k}, N={n}, int4 g128, {THREADS} threads")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096 x 4096 only, M in 1, 16, 256")
    ap.add_argument("--crossover", action="store_true", help="only time fused vs dequantize + BLAS by M")
    ap.add_argument("--ms", type=int, nargs="*", default=None, help="batch sizes (default %(default)s)")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs", "cpu_gemm_sweep.png"))
    ap.add_argument("--json", default=None, help="write all timings here")
    ap.add_argument("--threads", type=int, default=2, help="torch and gptqkit threads (default 2)")
    args = ap.parse_args(argv)

    torch.set_num_threads(THREADS)
    print(f"gptqkit {gptqkit.__version__}, CPU kernel {_C.cpu_kernel_name()}, torch {torch.__version__}, "
          f"{THREADS} threads (GPTQKIT_NUM_THREADS={os.environ['GPTQKIT_NUM_THREADS']}), {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.crossover:
        crossover()
        return 0

    bw_np, bw_torch = bandwidth()
    bw = max(bw_np, bw_torch)
    print(f"memory bandwidth (copy, read + write): numpy 1 thread {bw_np:.1f} GB/s, torch {THREADS} threads "
          f"{bw_torch:.1f} GB/s")
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = args.ms or ([1, 16, 256] if args.quick else MS)
    results, bounds = [], {}
    for k, n in shapes:
        nbytes, rows = bench_shape(k, n, ms)
        results += rows
        bounds[(k, n)] = nbytes
    print()
    print("M = 1 against the memory-bandwidth bound (prepared weight bytes / copy bandwidth):")
    for (k, n), nbytes in bounds.items():
        r1 = [r for r in results if (r["K"], r["N"], r["M"]) == (k, n, 1)]
        if not r1:
            continue
        t, t_cold = r1[0]["gptqkit"][0], r1[0]["gptqkit_cold"][0]
        bound = nbytes / (bw * 1e9)
        print(f"  K={k} N={n}: {nbytes / 2**20:.1f} MiB -> bound {bound * 1e3:.3f} ms at {bw:.1f} GB/s; measured "
              f"{t_cold * 1e3:.3f} ms from DRAM = {nbytes / t_cold / 1e9:.1f} GB/s ({bound / t_cold * 100:.0f} % "
              f"of the bound); {t * 1e3:.3f} ms when the weight stays in cache")
    print()
    print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_gbs": {"numpy": bw_np, "torch": bw_torch}, "results": results,
                       "prepared_bytes": {f"{k}x{n}": b for (k, n), b in bounds.items()}}, f, indent=1)
    if args.plot and not args.quick and THREADS == 2:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
