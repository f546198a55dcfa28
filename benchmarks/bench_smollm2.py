"""Real-model quantization benchmark: SmolLM2-135M, GPTQ vs round-to-nearest vs fp32.

The setup of the GPTQ issue (and of ``../shared/data/README.md``): calibration
on ``nsamples`` windows of ``seqlen`` tokens from WikiText-2's validation
split (seed 0); evaluation over the first 40 windows of 512 tokens of
``wiki.test.raw`` (no BOS): perplexity, and the mean KL divergence of the
next-token distribution against the fp32 model over the same tokens.

Every configuration is quantized in a fresh worker process, so its wall time
and peak RSS (``ru_maxrss`` at the end of ``quantize``, before any
evaluation) belong to the quantization alone. The worker also scores its
in-memory model and saves a checkpoint; the parent reloads that checkpoint
and scores it against the fp32 model, and checks that the reloaded model's
perplexity is the in-memory one (save -> load changes nothing).

Round-to-nearest (``rtn``) is computed here with a few lines of torch
(symmetric min-max per group), independent of gptqkit's solver.

Usage (after ``scripts/fetch_smollm2.py``)::

    python benchmarks/bench_smollm2.py                       # default configurations
    python benchmarks/bench_smollm2.py --configs gptq,gptq-act-clip --bits 3
    python benchmarks/bench_smollm2.py --json results.json   # also write the rows

Configuration names: ``rtn``, ``gptq`` (plain GPTQ: min-max grid, natural
order), ``gptq-act`` (act-order), ``gptq-gar`` (group-aware act-order, which
keeps ``desc_act=False`` checkpoints), ``gptq-clip`` (clipping search),
``gptq-gar-clip`` and ``gptq-act-clip`` (an order plus the search;
``gptq-act-clip-gptaq`` and ``gptq-gar-clip-gptaq`` add asymmetric
calibration with ``--gptaq-alpha``), and the peer tool
``gptqmodel`` / ``gptqmodel-act`` / ``gptqmodel-gptaq`` (its GPTAQ, with
``--gptaq-alpha``): GPTQModel (the quantizer behind
transformers' GPTQ support) on the same calibration windows, bits, group size,
symmetric grid and damping, otherwise with its own defaults (its
activation-group-aware ordering on where act-order is off), in float32 on the
CPU. It runs in the reader environment scripts/setup.sh makes
(``--interop-python``, default ``.venv-interop/bin/python``); its checkpoint
is scored through gptqkit's loader, which reads GPTQModel's layers exactly
(tests/python/test_interop.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_MODEL = os.path.join(os.environ.get("GPTQKIT_CACHE", os.path.expanduser("~/.cache/gptqkit")),
                             "models", "SmolLM2-135M")
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2")
CONFIGS = {
    "gptq": dict(desc_act=False, clip_steps=0),
    "gptq-act": dict(desc_act=True, clip_steps=0),
    "gptq-gar": dict(desc_act=False, act_group_aware=True, clip_steps=0),
    "gptq-clip": dict(desc_act=False, clip_steps=16),
    "gptq-gar-clip": dict(desc_act=False, act_group_aware=True, clip_steps=16),
    "gptq-act-clip": dict(desc_act=True, clip_steps=16),
    "gptq-gar-clip-gptaq": dict(desc_act=False, act_group_aware=True, clip_steps=16, gptaq=True),
    "gptq-act-clip-gptaq": dict(desc_act=True, clip_steps=16, gptaq=True),
}
PEER_CONFIGS = {"gptqmodel": dict(desc_act=False), "gptqmodel-act": dict(desc_act=True),
                "gptqmodel-gptaq": dict(desc_act=False, gptaq=True)}
DEFAULT_INTEROP_PYTHON = os.path.join(REPO, ".venv-interop", "bin", "python")


def rtn_quantize_(model, bits: int, group_size: int) -> None:
    """Round-to-nearest in place: symmetric min-max grid per group of every block Linear."""
    import torch
    from gptqkit.discovery import find_layout, find_linear_layers, get_weight, set_weight

    maxq = 2 ** bits - 1
    layout = find_layout(model)
    for block in layout.blocks(model):
        for _, layer in find_linear_layers(block).items():
            w = get_weight(layer, torch.float64)
            n, k = w.shape
            g = k if group_size == -1 else group_size
            out = torch.empty_like(w)
            for s in range(0, k, g):
                part = w[:, s:s + g]
                xmax = torch.maximum(part.min(1).values.abs(), part.max(1).values).clamp_min(1e-12)
                scale = (2 * xmax / maxq)[:, None]
                zero = (maxq + 1) / 2
                q = torch.clamp(torch.round(part / scale) + zero, 0, maxq)
                out[:, s:s + g] = scale * (q - zero)
            set_weight(layer, out.to(layer.weight.dtype))


def worker_gptqmodel(args) -> dict:
    """The peer: GPTQModel quantizes the same windows and saves its checkpoint."""
    import gptqmodel
    import torch
    from transformers import AutoTokenizer

    from gptqkit.calibration import prepare_calibration

    torch.set_num_threads(args.threads)
    # GPTQModel 7.7 sizes its CPU pool at (cores + 1) // 2 but asks 2 workers of it for loading.
    gptqmodel._default_cpu_workers = lambda: max(2, args.threads)
    from gptqmodel import GPTQModel, QuantizeConfig

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = prepare_calibration(os.path.join(args.data, "wiki.valid.tokens"), tok, nsamples=args.nsamples,
                                  seqlen=args.seqlen, seed=0, batch_size=1)
    extra = {}
    if PEER_CONFIGS[args.config].get("gptaq"):
        from gptqmodel.quantization.config import GPTAQConfig
        extra["gptaq"] = GPTAQConfig(alpha=args.gptaq_alpha, device="cpu")
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, damp_percent=args.damp,
                         desc_act=PEER_CONFIGS[args.config]["desc_act"], **extra)
    row = {"config": args.config, "bits": args.bits, "group_size": args.group_size, "extra_cache": 0.0,
           "ppl_in_memory": None, "peer": f"gptqmodel {gptqmodel.__version__}"}
    t0 = time.perf_counter()
    model = GPTQModel.load(args.model, cfg, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.quantize(windows, batch_size=1)
    row["seconds"] = time.perf_counter() - t0
    row["load_seconds"] = load_s
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.save(args.out)
    return row


def worker(args) -> dict:
    """One configuration: quantize, measure, score in memory, save."""
    import torch

    if args.config in PEER_CONFIGS:
        return worker_gptqmodel(args)

    torch.set_num_threads(args.threads)
    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.evaluation import perplexity

    test_text = os.path.join(args.data, "wiki.test.raw")
    row = {"config": args.config, "bits": args.bits, "group_size": args.group_size, "extra_cache": args.extra_cache}
    if CONFIGS.get(args.config, {}).get("gptaq"):
        row["gptaq_alpha"] = args.gptaq_alpha
    if args.config == "rtn":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        t0 = time.perf_counter()
        with torch.no_grad():
            rtn_quantize_(model, args.bits, args.group_size)
        row["seconds"] = time.perf_counter() - t0
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["ppl_in_memory"] = perplexity(model, tok, test_text, seqlen=512, windows=40, progress=False).ppl
        model.save_pretrained(args.out)  # plain fp32 weights holding the RTN values
        tok.save_pretrained(args.out)
        return row
    opts = CONFIGS[args.config]
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, damp_percent=args.damp,
                         desc_act=opts["desc_act"], act_group_aware=opts.get("act_group_aware", False),
                         clip_steps=opts["clip_steps"], gptaq=opts.get("gptaq", False),
                         gptaq_alpha=args.gptaq_alpha)
    model = GPTQForCausalLM.from_pretrained(args.model, cfg, dtype=torch.float32)
    t0 = time.perf_counter()
    report = model.quantize(os.path.join(args.data, "wiki.valid.tokens"), nsamples=args.nsamples,
                            seqlen=args.seqlen, seed=0, progress=args.progress, extra_cache=args.extra_cache)
    row["seconds"] = time.perf_counter() - t0
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["gptq_loss"] = sum(layer.loss for layer in report.layers)
    row["ppl_in_memory"] = perplexity(model.model, model.tokenizer, test_text, seqlen=512, windows=40,
                                      progress=False).ppl
    model.save_quantized(args.out)
    return row


def evaluate(rows, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqkit import GPTQForCausalLM
    from gptqkit.evaluation import kl_divergence

    torch.set_num_threads(args.threads)
    test_text = os.path.join(args.data, "wiki.test.raw")
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    for row in rows:
        if row["config"] == "rtn":
            q = AutoModelForCausalLM.from_pretrained(row["path"], dtype=torch.float32).eval()
        else:
            q = GPTQForCausalLM.from_quantized(row["path"]).model
        k = kl_divergence(ref, q, tok, test_text, seqlen=512, windows=40, progress=False)
        row.update(kl=k.kl, ppl=k.ppl_q, ppl_fp32=k.ppl_ref)
        if row["ppl_in_memory"] is None:  # the peer's in-memory model is not scored
            row["save_load_identical"] = None
        else:
            row["save_load_identical"] = abs(k.ppl_q - row["ppl_in_memory"]) <= 1e-4 * row["ppl_in_memory"]
        del q


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="fp32 SmolLM2-135M folder (scripts/fetch_smollm2.py)")
    p.add_argument("--data", default=DATA, help="folder with wiki.valid.tokens and wiki.test.raw")
    p.add_argument("--configs", default="rtn,gptq,gptq-act-clip", help="comma-separated configuration names")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gptaq-alpha", type=float, default=0.5,
                   help="gptaq_alpha of the *-gptaq configurations (default: 0.5)")
    p.add_argument("--extra-cache", type=float, default=0.0,
                   help="quantize(extra_cache=...): memory traded for less recomputation (default: 0)")
    p.add_argument("--json", metavar="FILE", help="write the result rows as JSON")
    p.add_argument("--plot", metavar="PNG", help="also plot KL vs quantization time per configuration (matplotlib)")
    p.add_argument("--from-json", metavar="FILE",
                   help="quantize nothing: print the table (and --plot) of rows an earlier --json wrote")
    p.add_argument("--keep", metavar="DIR", help="keep the checkpoints in DIR (default: a temporary folder)")
    p.add_argument("--progress", action="store_true", help="show quantization progress bars")
    p.add_argument("--interop-python", default=DEFAULT_INTEROP_PYTHON,
                   help="Python with GPTQModel for the gptqmodel configurations (default: .venv-interop)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
        report(rows, args)
        return 0

    for path, what in ((args.model, "model folder (run scripts/fetch_smollm2.py)"),
                       (os.path.join(args.data, "wiki.test.raw"), "WikiText-2 test split")):
        if not os.path.exists(path):
            print(f"bench_smollm2: {what} not found at {path}", file=sys.stderr)
            return 2
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c != "rtn" and c not in CONFIGS and c not in PEER_CONFIGS]
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from rtn, {', '.join([*CONFIGS, *PEER_CONFIGS])}")
    if any(c in PEER_CONFIGS for c in names) and not os.path.exists(args.interop_python):
        p.error(f"the gptqmodel configurations need GPTQModel's environment at {args.interop_python} "
                f"(scripts/setup.sh makes it); or pass --interop-python")

    root = args.keep or tempfile.mkdtemp(prefix="bench_smollm2_")
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ, GPTQKIT_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    rows = []
    for name in names:
        out = os.path.join(root, f"{name}-{args.bits}bit-g{args.group_size}")
        python = args.interop_python if name in PEER_CONFIGS else sys.executable
        cmd = [python, os.path.abspath(__file__), "--worker", "--config", name, "--out", out,
               "--model", args.model, "--data", args.data, "--bits", str(args.bits),
               "--group-size", str(args.group_size), "--damp", str(args.damp), "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--threads", str(args.threads),
               "--extra-cache", str(args.extra_cache), "--gptaq-alpha", str(args.gptaq_alpha)] + (["--progress"] if args.progress else [])
        print(f"== {name}: quantizing ({args.bits}-bit, g{args.group_size}, {args.nsamples}x{args.seqlen})",
              flush=True)
        # cwd: GPTQModel writes a logs/ folder into the working directory
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=root)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], file=sys.stderr)
            print(f"bench_smollm2: configuration {name} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        row = json.loads(lines[-1][len("RESULT "):])
        row["path"] = out
        rows.append(row)
        in_memory = "" if row["ppl_in_memory"] is None else f", in-memory PPL {row['ppl_in_memory']:.3f}"
        print(f"   {row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB{in_memory}", flush=True)
    print("== scoring the saved checkpoints against fp32 (KL, perplexity)", flush=True)
    evaluate(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    report(rows, args)
    if not args.keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["save_load_identical"] is not False for r in rows) else 1


def report(rows, args) -> None:
    """Prints the results table and the ratios against the peers; plots them with ``--plot``."""
    fp32 = rows[0]["ppl_fp32"]
    print(f"\nSmolLM2-135M, WikiText-2 test (40 x 512 tokens, no BOS); fp32 perplexity {fp32:.3f}")
    print(f"calibration {args.nsamples} x {args.seqlen} tokens of wiki.valid.tokens (seed 0), "
          f"{args.threads} threads, extra_cache {args.extra_cache:g}\n")
    print("| method | bits | group | perplexity | KL vs fp32 | quantize time | peak RSS | save->load same PPL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['bits']} | {r['group_size']} | {r['ppl']:.2f} | {r['kl']:.4f} | "
              f"{r['seconds']:.0f} s | {r['peak_rss_mb']:.0f} MB | "
              f"{ {True: 'yes', False: 'NO', None: 'n/a'}[r['save_load_identical']]} |")
    peers = [r for r in rows if r["config"] in PEER_CONFIGS]
    ours = [r for r in rows if r["config"] in CONFIGS]
    for peer in peers:
        for r in ours:
            print(f"{r['config']} vs {peer['config']} ({peer['peer']}): {peer['seconds'] / r['seconds']:.2f}x faster, "
                  f"{peer['peak_rss_mb'] / r['peak_rss_mb']:.2f}x less peak RSS, "
                  f"KL {r['kl']:.4f} vs {peer['kl']:.4f}, perplexity {r['ppl']:.2f} vs {peer['ppl']:.2f}")
    if args.plot:
        plot(rows, args.plot)


#: legend text of each configuration in the plot
LABELS = {
    "rtn": "round-to-nearest",
    "gptq": "gptqkit: plain GPTQ (natural order)",
    "gptq-act": "gptqkit: act-order",
    "gptq-gar": "gptqkit: group-aware order",
    "gptq-clip": "gptqkit: clipping search",
    "gptq-gar-clip": "gptqkit defaults: group-aware order + clipping",
    "gptq-act-clip": "gptqkit: act-order + clipping",
    "gptq-gar-clip-gptaq": "gptqkit: group-aware order + clipping + asymmetric calibration",
    "gptq-act-clip-gptaq": "gptqkit: act-order + clipping + asymmetric calibration",
    "gptqmodel": "GPTQModel defaults",
    "gptqmodel-act": "GPTQModel with act-order",
    "gptqmodel-gptaq": "GPTQModel with GPTAQ",
}


def plot(rows, path: str) -> None:
    """KL divergence from fp32 against quantization time, one point per configuration."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    lo, hi = min(r["kl"] for r in rows), max(r["kl"] for r in rows)
    kl_span = hi - lo or 1.0
    ax.set_xlim(0, max(r["seconds"] for r in rows) * 1.55)
    ax.set_ylim(lo - 0.15 * kl_span, hi + 0.12 * kl_span)
    for r in rows:
        peer = r["config"] in PEER_CONFIGS
        ax.scatter(r["seconds"], r["kl"], s=70, marker="s" if peer else "o",
                   color="C1" if peer else ("C7" if r["config"] == "rtn" else "C0"), zorder=3)
    renderer = fig.canvas.get_renderer()
    taken = []  # display boxes of the labels placed so far
    # Each label takes the first of these offsets (points) where it overlaps no earlier label.
    offsets = [((8, 4), "left"), ((8, -22), "left"), ((-8, 4), "right"), ((-8, -22), "right"),
               ((8, 18), "left"), ((8, -36), "left"), ((-8, 18), "right"), ((-8, -36), "right")]
    for r in sorted(rows, key=lambda r: r["kl"], reverse=True):
        text = f"{LABELS.get(r['config'], r['config'])}\nppl {r['ppl']:.2f}, {r['peak_rss_mb']:.0f} MB"
        for offset, align in offsets:
            label = ax.annotate(text, (r["seconds"], r["kl"]), textcoords="offset points", xytext=offset,
                                ha=align, fontsize=7.5)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(t) for t in taken) and box.x0 >= ax.bbox.x0:
                break
            label.remove()
        else:
            label = ax.annotate(text, (r["seconds"], r["kl"]), textcoords="offset points", xytext=offsets[0][0],
                                fontsize=7.5)
            box = label.get_window_extent(renderer)
        taken.append(box)
    ax.set_xlabel("quantization time (s, 2-core CPU)")
    ax.set_ylabel("KL divergence from fp32 (nats/token, lower is better)")
    r0 = rows[0]
    ax.set_title(f"SmolLM2-135M, {r0['bits']}-bit, group {r0['group_size']}: accuracy vs time "
                 f"(fp32 perplexity {r0['ppl_fp32']:.2f})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
