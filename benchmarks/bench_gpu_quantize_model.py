"""End-to-end GPTQ of a whole Llama-style model with 7B shapes and random weights, on the GPU.

No download: the model is built from a ``LlamaConfig`` with Llama-2-7B's
shapes (hidden 4096, MLP 11008, 32 blocks, 32 heads, vocabulary 32000) and
random fp16 weights, kept in CPU memory as a user's model would be. Then
``GPTQForCausalLM.quantize(..., device="cuda")`` runs the real pipeline:
each block moves to the GPU, its calibration inputs are fed through it,
Hessians are accumulated and every linear layer is solved on the GPU, the
results are packed, and the block's outputs become the next block's inputs.
Calibration: ``--nsamples`` random token sequences of ``--seqlen`` tokens
(128 x 2048 = 262,144 tokens by default, as in the per-layer benchmark).

Reports minutes end to end (the ``QuantizeReport``), peak GPU memory (torch's
allocator plus gptqkit's solver scratch) and peak host RSS.

    python benchmarks/bench_gpu_quantize_model.py                 # the 7B shapes, 4-bit g128
    python benchmarks/bench_gpu_quantize_model.py --layers 4      # a quicker check
    python benchmarks/bench_gpu_quantize_model.py --device cpu --hidden 256 --intermediate 688 \\
        --layers 2 --heads 4 --nsamples 8 --seqlen 128           # the same code path, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time

import torch



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="where the blocks are quantized (default %(default)s)")
    p.add_argument("--layers", type=int, default=32, help="decoder blocks (default %(default)s)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default %(default)s)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--desc-act", action="store_true", help="act-order")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args):
    """Random fp16 Llama in CPU memory (built on the GPU when there is one: initialising 6.7e9
    values is much faster there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.seqlen), rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.cpu().eval()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the quantization run starts with an empty GPU, as a user's would
    return model


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        from gptqkit.ops import gpu_unavailable_reason

        reason = gpu_unavailable_reason()
        if reason is not None:
            print(f"bench_gpu_quantize_model: {reason}; nothing to do.")
            return 0
    import gptqkit
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    t0 = time.perf_counter()
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"gptqkit {gptqkit.__version__} (GPU backend: {gptqkit.gpu_backend()}), torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"Llama-style model: {args.layers} blocks, hidden {args.hidden}, MLP {args.intermediate}, "
          f"{params / 1e6:,.0f} M parameters, random fp16 weights (built in {time.perf_counter() - t0:.0f} s)")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, args.vocab, (args.nsamples, args.seqlen), generator=gen)
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act)
    q = GPTQForCausalLM(model, cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gptqkit._C.gpu_solver_memory(reset_peak=True)
    report = q.quantize(ids, batch_size=args.batch_size, device=args.device, progress=True)
    layers = len(report.layers)
    print(f"\nquantized {layers} layers of {args.layers} blocks on {args.device} from "
          f"{args.nsamples} x {args.seqlen} tokens ({args.bits}-bit, group {args.group_size}"
          f"{', act-order' if args.desc_act else ''}): {report.seconds / 60:.2f} min end to end")
    if torch.cuda.is_available():
        solver = gptqkit._C.gpu_solver_memory()
        print(f"peak GPU memory: torch {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB + gptqkit solver "
              f"{solver['peak_bytes'] / 2 ** 30:.2f} GiB")
    print(f"peak host RSS: {report.peak_rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
