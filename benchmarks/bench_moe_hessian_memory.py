"""Peak memory of quantizing a Mixture-of-Experts block, with and without ``hessian_memory``.

All experts' gate/up layers of an MoE block form one true-sequential group,
and a group's Hessians are held together until its layers are quantized: one
``K x K`` float32 Hessian per expert (K = hidden size). That is 1 GB for 64
experts of width 2048 and 53 GB for 256 of width 7168. ``hessian_memory``
caps it: a group over the cap is collected in several passes over the
calibration data, a slice of experts per pass, with the same result.

This builds a Qwen3-MoE-shaped model with random weights (Hessian memory
does not depend on the weights' values; ``--experts``, ``--hidden``,
``--moe-intermediate``, ``--blocks``), and quantizes it in a fresh worker
process per cap (``--caps``, ``none`` = no cap), with gptqkit's defaults, on
random calibration tokens. Each row reports the quantization's peak memory
above the loaded model (peak RSS during ``quantize`` minus RSS before it), its
time, the extra passes, and a hash of every packed tensor: equal hashes mean
bit-identical checkpoints. The ratio columns compare each cap with the
uncapped run of the same invocation.

Usage::

    python benchmarks/bench_moe_hessian_memory.py                       # 64 experts, caps none,512MB,256MB
    python benchmarks/bench_moe_hessian_memory.py --experts 32 --caps none,128MB --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_model(args):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.moe_intermediate,
                         moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.blocks,
                         num_attention_heads=args.hidden // 128, num_key_value_heads=4, head_dim=128,
                         num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # a router with preferences, as trained ones have, not a uniform one
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(16)
    return model


def worker(args) -> dict:
    import torch

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.nn import QuantLinear

    torch.set_num_threads(args.threads)
    model = build_model(args)
    calibration = torch.randint(0, 1024, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1))
    q = GPTQForCausalLM(model, QuantizeConfig(bits=4, group_size=128))
    cap = None if args.config == "none" else args.config
    before = _rss_bytes()
    t0 = time.perf_counter()
    report = q.quantize(calibration, batch_size=4, progress=False, hessian_memory=cap)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    digest = hashlib.sha256()
    for name, module in sorted(q.model.named_modules(), key=lambda nm: nm[0]):
        if isinstance(module, QuantLinear):
            for t in (module.qweight, module.qzeros, module.scales, module.g_idx):
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    gate_up = 4 * args.hidden ** 2 * args.experts
    return {"cap": args.config, "experts": args.experts, "hidden": args.hidden, "blocks": args.blocks,
            "gate_up_hessians_mb": gate_up / 1e6, "quantize_peak_above_model_mb": (peak - before) / 1e6,
            "seconds": seconds, "extra_passes": report.extra_passes, "layers": len(report.layers),
            "packed_sha256": digest.hexdigest()[:16]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--caps", default="none,512MB,256MB", help="comma-separated hessian_memory values")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(worker(args), f)
        return 0

    common = [f"--experts={args.experts}", f"--top-k={args.top_k}", f"--hidden={args.hidden}",
              f"--moe-intermediate={args.moe_intermediate}", f"--blocks={args.blocks}",
              f"--nsamples={args.nsamples}", f"--seqlen={args.seqlen}", f"--threads={args.threads}"]
    rows = []
    for cap in args.caps.split(","):
        out = f"/tmp/bench_moe_hessian_memory.{os.getpid()}.json"
        subprocess.run([sys.executable, __file__, *common, f"--config={cap}", f"--worker={out}"], check=True)
        with open(out) as f:
            rows.append(json.load(f))
        os.remove(out)
        r = rows[-1]
        base = rows[0]
        print(f"cap {r['cap']:>6}: quantize peak {r['quantize_peak_above_model_mb']:7.0f} MB above the model "
              f"({r['quantize_peak_above_model_mb'] / base['quantize_peak_above_model_mb']:.2f}x of uncapped), "
              f"{r['seconds']:6.1f} s ({r['seconds'] / base['seconds']:.2f}x), {r['extra_passes']} extra passes, "
              f"gate/up Hessians {r['gate_up_hessians_mb']:.0f} MB, packed {r['packed_sha256']}"
              f"{'' if r['packed_sha256'] == base['packed_sha256'] else '  <-- DIFFERS from the first row'}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if len({r["packed_sha256"] for r in rows}) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
