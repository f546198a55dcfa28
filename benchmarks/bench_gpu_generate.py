"""End-to-end GPU decoding: a Llama-style model with 7B shapes, fp16 against gptqkit 4-bit, same run.

No download: the model is built from a ``LlamaConfig`` with Llama-2-7B's
shapes (hidden 4096, MLP 11008, 32 layers, 32 heads, vocabulary 32000) and
random weights. The gptqkit model replaces every linear layer of the decoder
blocks (q/k/v/o, gate/up/down; not the output head, as GPTQ checkpoints do)
by a :class:`gptqkit.nn.QuantLinear` with random 4-bit codes, group size 128,
prepared for the GPU kernels once. A third contender is that model with its
sibling layers fused (``gptqkit.nn.fuse_projections``: q/k/v and gate/up run
as one GEMM each, 4 quantized GEMM calls per block instead of 7).

Method: greedy decoding with transformers' static KV cache
(``cache_implementation="static"``) and transformers' own compilation of the
decode step (``compile_config=CompileConfig(fullgraph=True,
mode="reduce-overhead")``: the prefill runs eagerly, each decode step is the
compiled forward replayed as a CUDA graph); the gptqkit layers enter the graph
through the custom op ``torch.ops.gptqkit.quantized_matmul``. (Compiling
``model.forward`` by hand also compiles the prefill, in which the static cache
allocates its tensors lazily; CUDA-graph replays then overwrite them.) Decode tokens/s is measured
without the prompt's prefill: the time of ``generate(prompt, N)`` minus that of
``generate(prompt, 1)``, best of ``--repeats`` (after warm-up runs that
compile and capture), times the batch size.

    python benchmarks/bench_gpu_generate.py                  # batch 1 and 16, 128 new tokens
    python benchmarks/bench_gpu_generate.py --layers 4       # a quick check with fewer blocks
    python benchmarks/bench_gpu_generate.py --eager          # no torch.compile / CUDA graphs
    python benchmarks/bench_gpu_generate.py --kinds fp16 gptqkit-fused
    python benchmarks/bench_gpu_generate.py --kinds fp16 gptqkit-fused \
        --routing default GPTQKIT_GPU_SKINNY_MAX_ROWS=16,GPTQKIT_GPU_PDL=1

``--routing`` times the gptqkit contenders under several kernel-routing
settings (``GPTQKIT_GPU_*`` variables, ``docs/gpu_gemm.md``) with one model
build each: the decode step is compiled and captured again for every
setting, since a CUDA graph keeps the kernels chosen when it was captured.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

from bench_gpu_gemm import env_vars  # (benchmarks/ is on sys.path when a script in it runs)


KINDS = ("fp16", "gptqkit", "gptqkit-fused")


def llama_7b_config(layers):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def build_fp16(config):
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16 directly: no 27 GB fp32 detour
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def quantize_randomly(model, gen):
    """Every nn.Linear inside the decoder blocks -> a random 4-bit g128 QuantLinear on the GPU."""
    from gptqkit.nn import QuantLinear

    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            k, n = module.in_features, module.out_features
            layer = QuantLinear(4, 128, k, n, bias=module.bias is not None, device="cuda", dtype=torch.float16)
            layer.qweight.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, layer.qweight.shape, dtype=torch.int32,
                                              device="cuda", generator=gen))  # any word is 8 valid codes
            layer.qzeros.fill_(0x77777777)  # v1 zero point 8 for every column
            layer.scales.copy_(torch.rand(layer.scales.shape, device="cuda", generator=gen) * 0.004 + 0.001)
            layer.prepare_gpu_weight()
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], layer)
    return model


def decode_tokens_per_s(model, batch, prompt_len, new_tokens, repeats, compiled):
    from transformers import CompileConfig

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    if compiled:
        kw["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:
        kw["disable_compile"] = True

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(3 if compiled else 1):  # compile, capture, warm
        run(new_tokens)
        run(1)
    full = min(run(new_tokens) for _ in range(repeats))
    one = min(run(1) for _ in range(repeats))
    return batch * (new_tokens - 1) / (full - one)


def parse_routing(text):
    """'default' -> {}; 'A=1,B=2' -> {'A': '1', 'B': '2'} (GPTQKIT_GPU_* names only)."""
    if text == "default":
        return {}
    settings = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("GPTQKIT_GPU_"):
            raise SystemExit(f"--routing: expected 'default' or GPTQKIT_GPU_NAME=VALUE[,...], got {text!r}")
        settings[name] = value
    return settings


class routing_env(env_vars):
    """Sets routing variables for a block, then restores the environment, and makes the model's next
    compiled call compile and capture again (the graphs of the last setting keep its kernels)."""

    def __init__(self, model, settings):
        super().__init__(**settings)
        self.model = model

    def _recompile(self):
        self.model.__dict__.pop("_compiled_call", None)  # transformers' cached torch.compile of the step
        torch._dynamo.reset()

    def __enter__(self):
        super().__enter__()
        from gptqkit import ops

        try:
            ops._check_routing_env()  # a malformed value fails here, not mid-capture
        except ValueError:
            super().__exit__(None, None, None)
            raise
        self._recompile()
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._recompile()


def weight_bytes(model):
    from gptqkit.nn import QuantLinear

    total = 0
    for m in model.model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantLinear):
            lay = m.__dict__.get("_gpu_layout")
            tensors = [m.qweight, m.scales, m.qzeros, m.g_idx]
            if lay is not None:
                tensors += [t for t in (lay.sz, lay.chunk_group, lay.perm) if t is not None]
                if lay.qweight.data_ptr() != m.qweight.data_ptr():
                    tensors.append(lay.qweight)
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder blocks (32 for the 7B shape)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="contenders (default: all; fp16 is the reference of the speed-ups)")
    p.add_argument("--routing", nargs="+", default=["default"], metavar="SETTING",
                   help="kernel-routing settings for the gptqkit contenders: 'default' or comma-separated "
                        "GPTQKIT_GPU_NAME=VALUE (default: default)")
    args = p.parse_args(argv)
    variants = [(text, parse_routing(text)) for text in args.routing]

    from gptqkit.ops import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"bench_gpu_generate: {reason}; nothing to do.")
        return 0

    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    config = llama_7b_config(args.layers)
    results = {}
    labels = []
    for kind in args.kinds:
        model = build_fp16(config)
        if kind != "fp16":
            model = quantize_randomly(model, gen)
        if kind == "gptqkit-fused":
            from gptqkit.nn import fuse_projections

            groups = fuse_projections(model)
            print(f"fused {sum(len(g.members) for g in groups)} layers into {len(groups)} GEMMs", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        wb = weight_bytes(model)
        for text, settings in (variants if kind != "fp16" else [("default", {})]):
            label = kind if len(variants) == 1 or kind == "fp16" else f"{kind} [{text}]"
            labels.append(label)
            with routing_env(model, settings):
                for batch in args.batches:
                    tps = decode_tokens_per_s(model, batch, args.prompt, args.new_tokens, args.repeats,
                                              not args.eager)
                    results[(label, batch)] = tps
                    print(f"{label} batch {batch:3d}: {tps:9.1f} decode tokens/s  (decoder linear weights "
                          f"{wb / 2 ** 30:.2f} GiB)", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()

    print()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.layers} Llama-7B-shape blocks, "
          f"random weights; prompt {args.prompt}, {args.new_tokens} new tokens, greedy; "
          f"{'eager' if args.eager else 'static KV cache, decode step compiled by transformers (CompileConfig(fullgraph=True, mode=reduce-overhead): CUDA graphs)'}")
    routing = {k: v for k, v in sorted(os.environ.items()) if k.startswith("GPTQKIT_GPU_")}
    print("kernel routing: " + (", ".join(f"{k}={v}" for k, v in routing.items()) or "defaults"))
    print("\n".join(table_lines(labels, results, args.batches)))
    return 0


def table_lines(labels, results, batches):
    """Markdown table of decode tokens/s per contender (``labels``: kind, or "kind [routing]") and batch,
    with speed-ups over fp16 when it ran."""
    names = {"fp16": "fp16", "gptqkit": "gptqkit 4-bit", "gptqkit-fused": "gptqkit 4-bit fused"}

    def name(label):
        kind, _, rest = label.partition(" ")
        return names[kind] + (" " + rest if rest else "")

    others = [lab for lab in labels if lab != "fp16"] if "fp16" in labels else []
    lines = ["| batch | " + " | ".join(f"{name(lab)} tokens/s" for lab in labels)
             + "".join(f" | {name(lab)} speed-up" for lab in others) + " |",
             "|---:|" + "---:|" * (len(labels) + len(others))]
    for batch in batches:
        row = [f"{results[(lab, batch)]:.1f}" for lab in labels]
        row += [f"{results[(lab, batch)] / results[('fp16', batch)]:.2f}x" for lab in others]
        lines.append(f"| {batch} | " + " | ".join(row) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
