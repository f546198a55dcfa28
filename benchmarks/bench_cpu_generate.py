"""End-to-end CPU generation: a 4-bit GPTQ model against its fp32 original, same run, batch 1.

Greedy decoding of a fixed number of new tokens (default 128) with the KV
cache, 2 threads for torch and gptqkit. Three contenders: the fp32 model, the
quantized one as loaded, and the quantized one with its sibling projections
fused (q/k/v and gate/up run as one GEMM each, ``gptqkit.nn.fuse_projections``).
Runs alternate between the models and the best of ``--repeats`` is kept (the
machine may be shared). Reports
tokens/s for the whole ``generate`` call and for decoding alone (the time of
``generate(N)`` minus ``generate(1)``, i.e. without the prompt's prefill),
and the memory of the quantized layers' weights against the same layers in
fp32 (checkpoint tensors, plus the CPU kernels' prepared copy).

Make the quantized model first, e.g.::

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    q = GPTQForCausalLM.from_pretrained(FP32_DIR, QuantizeConfig(bits=4, group_size=128), dtype=torch.float32)
    q.quantize("../shared/data/wikitext-2/wiki.valid.tokens", nsamples=16, seqlen=512)
    q.save_quantized("/tmp/smol-q4")

then::

    python benchmarks/bench_cpu_generate.py --fp32 ~/.cache/gptqkit/models/SmolLM2-135M --quantized /tmp/smol-q4
"""

from __future__ import annotations

import argparse
import os
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
os.environ.setdefault("GPTQKIT_NUM_THREADS", str(THREADS))  # read by gptqkit on every call

import torch  # noqa: E402

PROMPT = ("The history of the city begins in the early medieval period, when a small settlement grew up around "
          "the river crossing. Over the following centuries")


def linear_bytes(model):
    """(bytes of the quantized layers as stored, bytes of their prepared CPU copies, the same layers in fp32)."""
    from gptqkit.nn import QuantLinear

    stored = prepared = dense = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for t in (m.qweight, m.qzeros, m.scales, m.g_idx, m.bias):
                if t is not None:
                    stored += t.numel() * t.element_size()
            prepared += m.prepared_cpu_weight().nbytes
            dense += 4 * m.in_features * m.out_features + (4 * m.out_features if m.bias is not None else 0)
    return stored, prepared, dense


def model_bytes(model):
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue  # tied weights count once
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def generate(model, ids, new_tokens, cache):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=model.config.eos_token_id)
    if cache == "static":
        kw["cache_implementation"] = "static"
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    return time.perf_counter() - t0, out[0, ids.shape[1]:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", default=os.path.expanduser("~/.cache/gptqkit/models/SmolLM2-135M"))
    ap.add_argument("--quantized", default="/tmp/smol-q4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--threads", type=int, default=2, help="torch and gptqkit threads (default 2)")
    args = ap.parse_args(argv)
    for path in (args.fp32, args.quantized):
        if not os.path.isdir(path):
            print(f"missing model folder {path} (see this script's docstring)", file=sys.stderr)
            return 2

    torch.set_num_threads(THREADS)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gptqkit
    from gptqkit._native import _C

    tok = AutoTokenizer.from_pretrained(args.fp32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    fp32 = AutoModelForCausalLM.from_pretrained(args.fp32, dtype=torch.float32).eval()
    from gptqkit.checkpoint import load_checkpoint

    quant = load_checkpoint(args.quantized).eval()
    fused = load_checkpoint(args.quantized).eval()
    from gptqkit.nn import fuse_projections

    groups = fuse_projections(fused)
    q_dtype = next(p.dtype for p in quant.parameters())
    print(f"gptqkit {gptqkit.__version__} (CPU kernel {_C.cpu_kernel_name()}), torch {torch.__version__}, "
          f"{THREADS} threads, prompt {ids.shape[1]} tokens, {args.tokens} new tokens, greedy, {args.cache} cache, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"quantized model: {args.quantized} (non-quantized weights in {q_dtype}); fused copy: {len(groups)} "
          f"groups of sibling layers, {sum(len(g.members) for g in groups)} layers in {len(groups)} GEMMs")

    # Warm-up (also builds the prepared copies of the quantized layers).
    contenders = (("fp32", fp32), ("gptqkit int4", quant), ("gptqkit int4 fused", fused))
    for _, model in contenders:
        generate(model, ids, 4, args.cache)

    results = {name: [] for name, _ in contenders}
    short = {name: [] for name, _ in contenders}
    outputs = {}
    for _ in range(args.repeats):
        for name, model in contenders:
            t, out = generate(model, ids, args.tokens, args.cache)
            results[name].append(t)
            outputs[name] = out
            short[name].append(generate(model, ids, 1, args.cache)[0])

    print()
    print(f"| model | {args.tokens} tokens, best of {args.repeats} | tokens/s | decode only (tokens/s) |")
    print("| --- | --- | --- | --- |")
    rate = {}
    for name in results:
        t, t1 = min(results[name]), min(short[name])
        rate[name] = (args.tokens / t, (args.tokens - 1) / max(t - t1, 1e-9))
        print(f"| {name} | {t:.2f} s | {rate[name][0]:.1f} | {rate[name][1]:.1f} |")
    for name in ("gptqkit int4", "gptqkit int4 fused"):
        print(f"{name} speed-up over fp32: {rate[name][0] / rate['fp32'][0]:.2f}x overall, "
              f"{rate[name][1] / rate['fp32'][1]:.2f}x decoding")
    print(f"fusing: {rate['gptqkit int4 fused'][1] / rate['gptqkit int4'][1]:.2f}x decoding")

    stored, prepared, dense = linear_bytes(quant)
    mib = 2 ** 20
    print(f"quantized linear layers: {stored / mib:.1f} MiB as stored (qweight, qzeros, scales, g_idx, bias) + "
          f"{prepared / mib:.1f} MiB prepared CPU copy, vs {dense / mib:.1f} MiB for the same layers in fp32 "
          f"({dense / stored:.1f}x smaller as stored)")
    print(f"whole model in memory: fp32 {model_bytes(fp32) / mib:.1f} MiB, quantized {model_bytes(quant) / mib:.1f} MiB "
          f"+ {prepared / mib:.1f} MiB prepared (embeddings / lm_head stay in {q_dtype})")
    if not torch.equal(outputs["gptqkit int4"], outputs["gptqkit int4 fused"]):
        print("WARNING: the fused model's greedy tokens differ from the unfused model's")
    a, b = outputs["fp32"].tolist(), outputs["gptqkit int4"].tolist()
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"greedy outputs agree on the first {same} of {len(a)} tokens")
    print("fp32:   " + repr(tok.decode(a[:40])))
    print("int4:   " + repr(tok.decode(b[:40])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
