"""Benchmark of gptqkit's int4 GPU GEMM against torch fp16 and tinygemm, CUDA graphs, same run.

For each weight shape K x N (issue 6) and each batch M it times, per call:

* gptqkit: ``torch.ops.gptqkit.quantized_matmul`` (what ``QuantLinear`` runs on
  a GPU), fp16 activations, 4-bit weight with group size 128 in the kernels'
  layout (``--act-order`` adds a column permutation, i.e. the gather of x);
* torch fp16: ``F.linear`` with a dense fp16 weight (cuBLAS);
* tinygemm: ``torch.ops.aten._weight_int4pack_mm`` (bf16 activations, the only
  type it takes), weight from ``torch.ops.aten._convert_weight_to_int4pack``
  (uint8 ``[N, K/2]``, innerKTiles 8) and bf16 ``scales_and_zeros [G, N, 2]``.

The ``kernel`` column names what the op ran (``gemv``, ``skinny``, ``mma``, ``wgmma``,
``tiled`` or ``dense`` = dequantize + cuBLAS); up to M = 16 the other one of
the two small-M tensor-core kernels is timed too (the skinny variant,
``GPTQKIT_GPU_SKINNY_MAX_ROWS``, or the mma kernel): where that threshold
should be; up to M = 64 the split-K sums added in the GEMM kernel or by a
second kernel, whichever the routing did not pick
(``GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS``) and programmatic dependent launches
or ordinary ones, likewise (``GPTQKIT_GPU_PDL``); from ``--paths-from`` rows the
native kernel and dequantize + cuBLAS are timed apart, and on Hopper also the
mma.sync kernel where wgmma runs (``GPTQKIT_GPU_WGMMA_MIN_ROWS=0``): where the
two routing thresholds should be; from M = 32 below ``--paths-from`` the
wgmma kernel where the mma.sync kernel runs, likewise.

Method: every contender runs inside a CUDA graph that makes ``--calls`` calls
in a row; each call uses the next of several copies of the weight, enough
copies that together they exceed twice the L2 cache, so every call streams
its weight from DRAM as in a real model. The graph is replayed ``--reps``
times between two CUDA events; the time per call is the best replay divided
by the number of calls (best-of: the least noisy statistic on a shared
machine). Achieved bandwidth at M = 1 counts the bytes each kernel must read
(packed words + scales/zeros, or the fp16 weight) and the activations.

Writes a markdown table (``--out``, default ``benchmarks/results/gpu_gemm.md``)
and a PNG plot of the speed-up over fp16 against M per shape (``--plot``); both
are meant for ``docs/performance.md``.

    python benchmarks/bench_gpu_gemm.py             # full sweep (H100: a few minutes)
    python benchmarks/bench_gpu_gemm.py --quick     # one shape, few M
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F


SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # K x N
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]
GROUP = 128


def make_layout(k, n, act_order, device, gen):
    """A random int4 g128 layer directly in the kernels' layout (any 32-bit word is a valid set of 8 codes)."""
    from gptqkit.ops import GpuLayout

    chunks = k // 32
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (chunks * 4, n), dtype=torch.int32, device=device, generator=gen)
    groups = k // GROUP
    sz = torch.empty(groups, n, 2, dtype=torch.float16, device=device)
    sz[..., 0] = torch.rand(groups, n, device=device, generator=gen) * 0.01 + 0.001
    sz[..., 1] = torch.randint(1, 16, (groups, n), device=device, generator=gen).half()
    chunk_group = (torch.arange(chunks, device=device) // (GROUP // 32)).to(torch.int32)
    perm = torch.randperm(k, device=device, generator=gen).to(torch.int32) if act_order else None
    return GpuLayout(qweight, sz, chunk_group, perm, 4, k, n)


def layout_bytes(lay):
    return sum(t.numel() * t.element_size() for t in (lay.qweight, lay.sz, lay.chunk_group) if t is not None)


def copies_for(weight_bytes, l2_bytes, cap=64):
    return max(1, min(cap, math.ceil(2 * l2_bytes / max(1, weight_bytes)) + 1))


def time_graph(fn_list, x, calls, reps):
    """Best time per call (us) of a CUDA graph making `calls` calls, rotating over fn_list."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fn_list[:3]:  # warm-up (lazy init, autotuning) outside the capture
            f(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn_list[i % len(fn_list)](x)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    del graph
    return best


class env_vars:
    """Sets environment variables for a block (the op and the native library read the routing thresholds
    GPTQKIT_GPU_DENSE_MIN_ROWS / GPTQKIT_GPU_WGMMA_MIN_ROWS at each call, so also while a graph is captured)."""

    def __init__(self, **values):
        self.values, self.saved = {k: str(v) for k, v in values.items()}, {}

    def __enter__(self):
        for name, value in self.values.items():
            self.saved[name] = os.environ.get(name)
            os.environ[name] = value

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


TUNE_BLOCKS_PER_SM = (1, 2, 4, 8)


def bench_shape(k, n, ms, args, gen, l2):
    dev = torch.device("cuda")
    lay0 = make_layout(k, n, args.act_order, dev, gen)
    q_bytes = layout_bytes(lay0)
    lays = [lay0] + [make_layout(k, n, args.act_order, dev, gen) for _ in range(copies_for(q_bytes, l2) - 1)]
    w16_bytes = k * n * 2
    w16 = [torch.randn(n, k, device=dev, dtype=torch.float16, generator=gen) * 0.02
           for _ in range(copies_for(w16_bytes, l2, cap=8))]
    tiny = []
    tiny_err = None
    try:
        for _ in range(copies_for(k * n // 2, l2)):
            wu8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev, generator=gen)
            packed = torch.ops.aten._convert_weight_to_int4pack(wu8, 8)
            sc = torch.rand(k // GROUP, n, 2, device=dev, generator=gen).to(torch.bfloat16) * 0.01
            tiny.append((packed, sc))
    except Exception as exc:  # older/newer torch with another packing API: reported, not fatal
        tiny_err = f"{type(exc).__name__}: {exc}"
        tiny = []

    rows = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.float16, generator=gen)
        xb = x.bfloat16()
        ours = [lambda x, L=L: torch.ops.gptqkit.quantized_matmul(x, L.qweight, L.sz, L.chunk_group, L.perm, None,
                                                                  4, k, n) for L in lays]
        fp16 = [lambda x, W=W: F.linear(x, W) for W in w16]
        t_ours = time_graph(ours, x, args.calls, args.reps)
        t_fp16 = time_graph(fp16, x, args.calls, args.reps)
        t_tiny = None
        if tiny:
            tfn = [lambda x, P=P: torch.ops.aten._weight_int4pack_mm(x, P[0], GROUP, P[1]) for P in tiny]
            try:
                t_tiny = time_graph(tfn, xb, args.calls, args.reps)
            except Exception as exc:  # pragma: no cover
                tiny_err = f"{type(exc).__name__}: {exc}"
        row = {"K": k, "N": n, "M": m, "kernel": matmul_kernel(x, lay0), "gptqkit_us": t_ours, "fp16_us": t_fp16,
               "tinygemm_us": t_tiny, "speedup_vs_fp16": t_fp16 / t_ours,
               "speedup_vs_tinygemm": (t_tiny / t_ours) if t_tiny else None}
        if m <= 8 and row["kernel"] != "gemv":
            # The GEMV kernel the tensor-core kernel replaces at these rows:
            # where GPTQKIT_GPU_MMA_MIN_ROWS should be.
            with env_vars(GPTQKIT_GPU_MMA_MIN_ROWS=9):
                row["gemv_us"] = time_graph(ours, x, args.calls, args.reps)
        if m <= 16 and row["kernel"] in ("mma", "skinny"):
            # The other small-M tensor-core kernel: where GPTQKIT_GPU_SKINNY_MAX_ROWS should be.
            key = "mma_small_us" if row["kernel"] == "skinny" else "skinny_us"
            with env_vars(GPTQKIT_GPU_SKINNY_MAX_ROWS=0 if row["kernel"] == "skinny" else 16):
                row[key] = time_graph(ours, x, args.calls, args.reps)
        if m <= 64 and row["kernel"] in ("mma", "skinny"):
            # Split-K sums added by the GEMM kernel itself or by a second kernel, whichever the
            # routing did not pick: where GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS should be.
            inkernel = m <= inkernel_reduce_max_rows()
            key = "separate_reduce_us" if inkernel else "inkernel_reduce_us"
            with env_vars(GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS=0 if inkernel else 64):
                row[key] = time_graph(ours, x, args.calls, args.reps)
        if m <= 64 and row["kernel"] in ("mma", "skinny"):
            # Programmatic dependent launches or ordinary ones, whichever the routing did not
            # pick: where GPTQKIT_GPU_PDL should be (the graph's calls follow each other).
            overlapped = overlapped_launches()
            key = "ordinary_launch_us" if overlapped else "pdl_us"
            with env_vars(GPTQKIT_GPU_PDL=0 if overlapped else 1):
                row[key] = time_graph(ours, x, args.calls, args.reps)
        if args.tune and row["kernel"] in ("mma", "skinny"):
            # The split-K plan's target occupancy (GPTQKIT_GPU_MMA_BLOCKS_PER_SM).
            for bps in TUNE_BLOCKS_PER_SM:
                with env_vars(GPTQKIT_GPU_MMA_BLOCKS_PER_SM=bps):
                    row[f"blocks_per_sm_{bps}_us"] = time_graph(ours, x, args.calls, args.reps)
        if m > 8:
            # The same kernels without the op's workspace: no split-K (and the
            # tiled kernel for act-order layers, whose x gather needs scratch),
            # to show what splitting K buys at each M.
            row["unsplit_us"] = time_graph([lambda x, L=L: unsplit_call(x, L, k, n) for L in lays], x, args.calls,
                                           args.reps)
        if 32 <= m < args.paths_from and row["kernel"] == "mma":
            # The wgmma kernel below its default threshold (Hopper): where GPTQKIT_GPU_WGMMA_MIN_ROWS
            # should be, e.g. for M = 64 (issue 6 asks 1.5x fp16 there).
            with env_vars(GPTQKIT_GPU_WGMMA_MIN_ROWS=m):
                if matmul_kernel(x, lay0) == "wgmma":
                    row["wgmma_us"] = time_graph(ours, x, args.calls, args.reps)
        if m >= args.paths_from:
            # Both large-M paths, whatever the default crossover picks: where
            # GPTQKIT_GPU_DENSE_MIN_ROWS should be.
            with env_vars(GPTQKIT_GPU_DENSE_MIN_ROWS=1 << 30):
                row["kernel_us"] = time_graph(ours, x, args.calls, args.reps)
                if matmul_kernel(x, lay0) == "wgmma":  # and the mma.sync kernel it replaces on Hopper
                    with env_vars(GPTQKIT_GPU_WGMMA_MIN_ROWS=0):
                        row["mma_us"] = time_graph(ours, x, args.calls, args.reps)
            with env_vars(GPTQKIT_GPU_DENSE_MIN_ROWS=1):
                row["dense_us"] = time_graph(ours, x, args.calls, args.reps)
        if m == 1:
            act = 2 * (k + n)
            row["gptqkit_GBps"] = (q_bytes + act) / t_ours / 1e3
            row["fp16_GBps"] = (w16_bytes + act) / t_fp16 / 1e3
        rows.append(row)
        print(f"K={k:6d} N={n:6d} M={m:5d}  gptqkit ({row['kernel']}) {t_ours:9.2f} us  fp16 {t_fp16:9.2f} us  "
              f"tinygemm {t_tiny if t_tiny else float('nan'):9.2f} us  x{row['speedup_vs_fp16']:.2f} vs fp16"
              + (f"  {row['gptqkit_GBps']:.0f} GB/s" if m == 1 else "")
              + (f"  [GEMV kernel {row['gemv_us']:.2f} us]" if "gemv_us" in row else "")
              + (f"  [skinny kernel {row['skinny_us']:.2f} us]" if "skinny_us" in row else "")
              + (f"  [mma kernel {row['mma_small_us']:.2f} us]" if "mma_small_us" in row else "")
              + (f"  [in-kernel reduce {row['inkernel_reduce_us']:.2f} us]" if "inkernel_reduce_us" in row else "")
              + (f"  [separate reduce {row['separate_reduce_us']:.2f} us]" if "separate_reduce_us" in row else "")
              + (f"  [PDL {row['pdl_us']:.2f} us]" if "pdl_us" in row else "")
              + (f"  [ordinary launches {row['ordinary_launch_us']:.2f} us]" if "ordinary_launch_us" in row else "")
              + "".join(f"  [{bps} blocks/SM {row[f'blocks_per_sm_{bps}_us']:.2f} us]" for bps in TUNE_BLOCKS_PER_SM
                        if f"blocks_per_sm_{bps}_us" in row)
              + (f"  [no workspace {row['unsplit_us']:.2f} us]" if "unsplit_us" in row else "")
              + (f"  [native kernel {row['kernel_us']:.2f} us, dequantize + cuBLAS {row['dense_us']:.2f} us]"
                 if "kernel_us" in row else "")
              + (f"  [mma.sync instead of wgmma {row['mma_us']:.2f} us]" if "mma_us" in row else "")
              + (f"  [wgmma instead of mma.sync {row['wgmma_us']:.2f} us]" if "wgmma_us" in row else ""), flush=True)
    del lays, w16, tiny
    torch.cuda.empty_cache()
    return rows, tiny_err


def matmul_kernel(x, lay):
    from gptqkit import ops

    return ops.matmul_kernel(x, lay)


def inkernel_reduce_max_rows():
    from gptqkit import ops

    return ops.inkernel_reduce_max_rows()


def overlapped_launches():
    from gptqkit import ops

    return ops.overlapped_launches()


def unsplit_call(x, lay, k, n):
    """The native matmul without a workspace (what a C++ caller gets that passes none)."""
    from gptqkit._native import _C

    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _C.gpu_quantized_matmul(x, lay.qweight, lay.sz, lay.chunk_group, lay.perm, None, y, 4, k, n,
                            torch.cuda.current_stream(x.device).cuda_stream, None)
    return y


def check_correctness(gen):
    """One small act-order layer through the public path against dequantize + fp64 matmul."""
    dev = torch.device("cuda")
    lay = make_layout(1024, 768, True, dev, gen)
    w = torch.ops.gptqkit.dequantize_layout(lay.qweight, lay.sz, lay.chunk_group, lay.perm, 4, 1024, 768).double()
    for m in (1, 7, 16, 40, 200, 300):
        x = torch.randn(m, 1024, device=dev, dtype=torch.float16, generator=gen)
        # The default routing, mma.sync where wgmma would run, the skinny kernel where it can, and the
        # split-K sums added in the GEMM kernels.
        for wgmma_rows, skinny_rows, reduce_rows, pdl in ((128, 0, 0, 0), (0, 0, 0, 0), (128, 16, 0, 0),
                                                           (128, 16, 64, 1), (128, 0, 64, 1)):
            with env_vars(GPTQKIT_GPU_WGMMA_MIN_ROWS=wgmma_rows, GPTQKIT_GPU_SKINNY_MAX_ROWS=skinny_rows,
                          GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS=reduce_rows, GPTQKIT_GPU_PDL=pdl):
                kernel = matmul_kernel(x, lay)
                y = torch.ops.gptqkit.quantized_matmul(x, lay.qweight, lay.sz, lay.chunk_group, lay.perm, None, 4,
                                                       1024, 768)
            ref = x.double() @ w.T
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            if err > 1e-2:
                raise SystemExit(f"correctness check failed at M={m} ({kernel}): relative error {err:.3g}")


def write_table(rows, path, meta):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}; CUDA graphs, best of {meta['reps']} replays of "
             f"{meta['calls']} calls; weights rotated over > 2x L2 ({meta['l2_mib']:.0f} MiB); int4 g128"
             f"{' act-order' if meta['act_order'] else ''}; fp16 activations (tinygemm: bf16)."
             + ("".join(f" {k}={v}." for k, v in meta.get("routing_env", {}).items())), ""]
    lines.append("| K x N | M | kernel | fp16 (us) | tinygemm (us) | gptqkit (us) | vs fp16 | vs tinygemm | M=1 GB/s "
                 "| GEMV kernel (us) | skinny / mma kernel (us) | in-kernel / separate reduce (us) "
                 "| PDL / ordinary launches (us) "
                 "| no workspace (us) | native kernel (us) | mma.sync / wgmma (us) | dequantize + cuBLAS (us) |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tiny = f"{r['tinygemm_us']:.1f}" if r["tinygemm_us"] else "n/a"
        vt = f"{r['speedup_vs_tinygemm']:.2f}x" if r["speedup_vs_tinygemm"] else "n/a"
        bw = f"{r['gptqkit_GBps']:.0f}" if "gptqkit_GBps" in r else ""
        unsplit = f"{r['unsplit_us']:.1f}" if "unsplit_us" in r else ""
        gemv = f"{r['gemv_us']:.1f}" if "gemv_us" in r else ""
        small = r.get("skinny_us", r.get("mma_small_us"))
        small = f"{small:.1f}" if small is not None else ""
        reduce = r.get("inkernel_reduce_us", r.get("separate_reduce_us"))
        reduce = f"{reduce:.1f}" if reduce is not None else ""
        launches = r.get("pdl_us", r.get("ordinary_launch_us"))
        launches = f"{launches:.1f}" if launches is not None else ""
        other_tc = r.get("mma_us", r.get("wgmma_us"))  # the tensor-core kernel the routing did not pick
        paths = " | ".join(f"{v:.1f}" if v is not None else ""
                           for v in (r.get("kernel_us"), other_tc, r.get("dense_us")))
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {r['fp16_us']:.1f} | {tiny} | "
                     f"{r['gptqkit_us']:.1f} | "
                     f"{r['speedup_vs_fp16']:.2f}x | {vt} | {bw} | {gemv} | {small} | {reduce} | {launches} | {unsplit} | {paths} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"table written to {path}")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for (k, n) in sorted({(r["K"], r["N"]) for r in rows}):
        rs = [r for r in rows if (r["K"], r["N"]) == (k, n)]
        ax.plot([r["M"] for r in rs], [r["speedup_vs_fp16"] for r in rs], marker="o", label=f"{k}x{n}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("speed-up over torch fp16 matmul")
    ax.set_title("gptqkit int4 g128 GEMM (CUDA graphs)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def _shape(text: str):
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KxN (e.g. 4096x12288), got {text!r}") from None
    if k <= 0 or n <= 0:
        raise argparse.ArgumentTypeError(f"expected positive K and N, got {text!r}")
    return k, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape (4096x4096), M in 1, 16, 256")
    p.add_argument("--shapes", nargs="+", type=_shape, metavar="KxN",
                   help="other K x N shapes (e.g. fused q/k/v and gate/up: 4096x12288 4096x22016)")
    p.add_argument("--ms", nargs="+", type=int, metavar="M", help="other row counts (default: the issue's list)")
    p.add_argument("--act-order", action="store_true", help="time layers with an act-order permutation")
    p.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=20, help="graph replays (best is kept)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "gpu_gemm.md"))
    p.add_argument("--plot", default=os.path.join("benchmarks", "results", "gpu_gemm.png"))
    p.add_argument("--json", default=None, help="also write the raw rows as JSON")
    p.add_argument("--tune", action="store_true",
                   help=f"also time the mma kernel's split-K plan at {TUNE_BLOCKS_PER_SM} blocks per SM")
    p.add_argument("--paths-from", type=int, default=128,
                   help="from this M, also time the native kernels and dequantize + cuBLAS separately (default 128)")
    args = p.parse_args(argv)

    from gptqkit.ops import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"bench_gpu_gemm: {reason}; nothing to do.")
        return 0
    import gptqkit.ops  # noqa: F401  (registers torch.ops.gptqkit.*)

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    check_correctness(gen)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    shapes = args.shapes or ([(4096, 4096)] if args.quick else SHAPES)
    ms = args.ms or ([1, 16, 256] if args.quick else MS)
    rows, notes = [], []
    for k, n in shapes:
        r, err = bench_shape(k, n, ms, args, gen, l2)
        rows += r
        if err:
            notes.append(f"tinygemm unavailable for {k}x{n}: {err}")
    meta = {"gpu": props.name, "torch": torch.__version__, "reps": args.reps, "calls": args.calls,
            "l2_mib": l2 / 2 ** 20, "act_order": args.act_order,
            "routing_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GPTQKIT_GPU_")}}
    write_table(rows, args.out, meta)
    for note in notes:
        print(note)
    plot(rows, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
