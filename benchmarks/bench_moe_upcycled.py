"""Mixture-of-Experts quantization on real weights: SmolLM2-135M upcycled into a Mixtral.

No real MoE model installs offline here, so this builds one from real weights
the way sparse upcycling does (Komatsuzaki et al., 2022): every block's MLP
becomes ``--experts`` exact copies of itself and a router (random, fixed seed)
sends each token to ``--top-k`` of them with weights that sum to one. In fp32
the MoE computes what SmolLM2 computes (the script checks the logits), with
real activations, yet quantization faces the MoE problem: each expert's
Hessian comes only from the tokens routed to it, so the copies are quantized
differently and each sees a fraction of the calibration data.

The upcycled model is saved once as a normal safetensors folder next to the
SmolLM2 one (``--upcycled``; 1.5 GB in fp32; transformers writes Mixtral's
experts under their transformers 4 names), so that each run loads it from
disk as a user would and its peak RSS is that of loading and quantizing.

Configurations, each quantized in a fresh worker process with gptqkit's
defaults (4-bit, groups of 128, group-aware order, clipping search) on
WikiText-2 validation windows, scored in memory over the first 40 windows of
512 tokens of ``wiki.test.raw``: perplexity and mean KL divergence against the
fp32 SmolLM2 (= the fp32 MoE):

* ``dense``: SmolLM2 itself, every MLP Hessian built from all tokens (the peer).
* ``moe``: the upcycled model (experts split and quantized per expert; only
  experts no token reaches are rounded to nearest).
* ``moe-rtn-starved``: the same, but every expert layer that got fewer routed
  tokens than it has input columns (a rank-deficient Hessian) is rounded to
  nearest instead: the rule gptqkit does *not* use, because this benchmark
  showed GPTQ on few tokens beats it.

``--nsamples`` takes a list: few windows starve experts of tokens (with 4
experts and top-2, 4 windows of 512 tokens give an expert about 1024, fewer
than down_proj's 1536 inputs), many do not.

Usage (after ``scripts/fetch_smollm2.py``)::

    python benchmarks/bench_moe_upcycled.py                      # nsamples 4 and 128
    python benchmarks/bench_moe_upcycled.py --nsamples 16 --configs moe,moe-gptq-only --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_MODEL = os.path.join(os.environ.get("GPTQKIT_CACHE", os.path.expanduser("~/.cache/gptqkit")),
                             "models", "SmolLM2-135M")
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2")
CONFIGS = ("dense", "moe", "moe-rtn-starved")


def upcycle(dense, experts: int, top_k: int, seed: int = 0):
    """A MixtralForCausalLM whose every MLP is ``experts`` copies of ``dense``'s, with a random router."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                        sliding_window=None, num_local_experts=experts, num_experts_per_tok=top_k,
                        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    moe = MixtralForCausalLM(cfg).to(torch.float32).eval()
    state = dense.state_dict()
    g = torch.Generator().manual_seed(seed)
    new = {}
    for key in moe.state_dict():
        if ".mlp.gate." in key:  # router logits ~ N(0, 1) for unit-scale hidden states
            new[key] = torch.randn(experts, c.hidden_size, generator=g) / c.hidden_size ** 0.5
        elif key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("experts.gate_up_proj")]
            gate_up = torch.cat([state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"]])
            new[key] = gate_up.expand(experts, *gate_up.shape).clone()
        elif key.endswith("mlp.experts.down_proj"):
            down = state[key[: -len("experts.down_proj")] + "down_proj.weight"]
            new[key] = down.expand(experts, *down.shape).clone()
        else:
            new[key] = state[key]
    moe.load_state_dict(new)
    moe.tie_weights()
    return moe


def _round_starved_experts_to_nearest() -> None:
    """Makes quantize() round to nearest every expert layer with fewer routed tokens than input columns."""
    import gptqkit.model

    original = gptqkit.model.GPTQForCausalLM._collect_hessians

    def collect(self, block, names, *args, **kwargs):
        hessians, captured, tokens = original(self, block, names, *args, **kwargs)
        for name in names:
            if ".experts." in name and tokens[name] < block.get_submodule(name).in_features:
                hessians[name] = None
        return hessians, captured, tokens

    gptqkit.model.GPTQForCausalLM._collect_hessians = collect


def build(args) -> dict:
    """Saves the upcycled model as a safetensors folder (once) and checks that it computes what SmolLM2 does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    moe = upcycle(dense, args.experts, args.top_k)
    text = open(os.path.join(args.data, "wiki.test.raw")).read()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    moe.save_pretrained(args.upcycled)
    tok.save_pretrained(args.upcycled)
    info = {"fp32_upcycled_max_logit_diff": diff, "experts": args.experts, "top_k": args.top_k}
    with open(os.path.join(args.upcycled, "upcycled.json"), "w") as f:
        json.dump(info, f)
    return info


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.evaluation import kl_divergence

    torch.set_num_threads(args.threads)
    test_text = os.path.join(args.data, "wiki.test.raw")
    row = {"config": args.config, "nsamples": args.nsamples, "seqlen": args.seqlen}
    if args.config != "dense":
        with open(os.path.join(args.upcycled, "upcycled.json")) as f:
            row.update(json.load(f))
    if args.config == "moe-rtn-starved":
        _round_starved_experts_to_nearest()
    q = GPTQForCausalLM.from_pretrained(args.model if args.config == "dense" else args.upcycled,
                                        QuantizeConfig(bits=4, group_size=128), dtype=torch.float32)
    t0 = time.perf_counter()
    report = q.quantize(os.path.join(args.data, "wiki.valid.tokens"), nsamples=args.nsamples, seqlen=args.seqlen,
                        seed=0, progress=args.progress)
    row["seconds"] = time.perf_counter() - t0
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    routed = [r for r in report.layers if ".experts." in r.name]
    if routed:
        tokens = sorted(r.tokens for r in routed)
        row.update(expert_layers=len(routed), expert_tokens_min=tokens[0], expert_tokens_median=tokens[len(tokens) // 2],
                   expert_tokens_max=tokens[-1], rtn_fallback=sum(r.rtn_fallback for r in routed))
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()  # fp32 SmolLM2 = fp32 MoE
    k = kl_divergence(ref, q.model, q.tokenizer, test_text, seqlen=512, windows=40, progress=False)
    row.update(kl=k.kl, ppl=k.ppl_q, ppl_fp32=k.ppl_ref)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="fp32 SmolLM2-135M folder (scripts/fetch_smollm2.py)")
    p.add_argument("--data", default=DATA, help="folder with wiki.valid.tokens and wiki.test.raw")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--nsamples", default="4,128", help="comma-separated calibration window counts")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--upcycled", default=None, help="folder of the upcycled model (made once; default: next to "
                   "--model, named after --experts and --top-k)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.upcycled = args.upcycled or f"{args.model.rstrip(os.sep)}-upcycled-{args.experts}x{args.top_k}"
    if args.build:
        build(args)
        return 0
    if args.worker:
        args.nsamples = int(args.nsamples)
        with open(args.worker, "w") as f:
            json.dump(worker(args), f)
        return 0
    for path in (args.model, os.path.join(args.data, "wiki.test.raw")):
        if not os.path.exists(path):
            sys.exit(f"missing {path}: run scripts/fetch_smollm2.py and keep ../shared/data beside the repository")
    common = ["--model", args.model, "--data", args.data, "--upcycled", args.upcycled, "--experts", str(args.experts),
              "--top-k", str(args.top_k), "--threads", str(args.threads)]
    if not os.path.exists(os.path.join(args.upcycled, "upcycled.json")):
        print(f"building the upcycled model in {args.upcycled} (once)", flush=True)
        subprocess.run([sys.executable, __file__, "--build", *common], check=True)
    rows = []
    for n in [int(x) for x in args.nsamples.split(",")]:
        for config in args.configs.split(","):
            if config not in CONFIGS:
                sys.exit(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
            out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_moe_{os.getpid()}_{config}_{n}.json")
            cmd = [sys.executable, __file__, "--worker", out, "--config", config, "--nsamples", str(n),
                   "--seqlen", str(args.seqlen), *common]
            if args.progress:
                cmd.append("--progress")
            subprocess.run(cmd, check=True)
            with open(out) as f:
                rows.append(json.load(f))
            os.remove(out)
            print(_line(rows[-1], rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _line(row, rows) -> str:
    dense = next((r for r in rows if r["config"] == "dense" and r["nsamples"] == row["nsamples"]), None)
    text = (f"{row['config']:>14} nsamples {row['nsamples']:>4}: ppl {row['ppl']:.2f} (fp32 {row['ppl_fp32']:.2f}), "
            f"KL {row['kl']:.3f}, {row['seconds']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB")
    if "expert_layers" in row:
        text += (f"; expert tokens min/median/max {row['expert_tokens_min']}/{row['expert_tokens_median']}/"
                 f"{row['expert_tokens_max']}, {row['rtn_fallback']} of {row['expert_layers']} expert layers "
                 f"rounded to nearest; fp32 MoE vs dense logits {row['fp32_upcycled_max_logit_diff']:.1e}")
        if dense is not None:
            text += f"; KL / dense KL {row['kl'] / dense['kl']:.2f}, time / dense {row['seconds'] / dense['seconds']:.2f}"
    return text


if __name__ == "__main__":
    sys.exit(main())
