"""``gptqkit eval-ppl``: perplexity of a model or GPTQ checkpoint, and KL divergence against a reference."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict

from gptqkit.cli._common import (
    DEFAULT_EVAL_SEQLEN, DEFAULT_EVAL_WINDOWS, DATA_ENV, DTYPES, WIKITEXT_TEST, CLIError, UsageError,
    _HelpFormatter, _check_input_file, _check_model_arg, _check_tokenizer_arg, _log, _one_line, _positive_int,
    _quantization_method, _torch_dtype, _windows, data_search_paths, find_data_file,
)
from gptqkit.source_formats import DEQUANTIZED_ON_LOAD, load_full_precision

EVAL_DESCRIPTION = """\
Perplexity of a model on a text, the standard GPTQ evaluation.

MODEL_OR_CHECKPOINT is a GPTQ checkpoint (config.json with a
quantization_config of quant_method "gptq", or a quantize_config.json; loaded
with gptqkit's kernels, from gptqkit, AutoGPTQ or GPTQModel) or a
full-precision model folder / hub id (loaded with transformers).

The text is read the WikiText way (lines joined with blank lines), tokenized
without BOS, cut into non-overlapping windows of --seqlen tokens, and the first
--windows of them are scored: perplexity = exp(mean next-token loss). With
--compare FP_MODEL the same windows also go through FP_MODEL (usually the
original model) and the mean KL divergence KL(p_fp || p_model) of the
next-token distributions is printed: it shows quantization damage long before
perplexity does (0 = identical predictions)."""

EVAL_EPILOG = f"""\
examples:
  gptqkit eval-ppl out/smollm2-4bit                       # {DEFAULT_EVAL_WINDOWS} windows of WikiText-2 test
  gptqkit eval-ppl out/smollm2-4bit --windows all --batch-size 4
  gptqkit eval-ppl ~/models/SmolLM2-135M                  # the fp32 baseline
  gptqkit eval-ppl out/smollm2-4bit --compare ~/models/SmolLM2-135M --json
  gptqkit eval-ppl out/model --tokens ids.npy --seqlen 256   # pre-tokenized ids

Default text: {WIKITEXT_TEST} (WikiText-2 test), searched like quantize's
calibration data (${DATA_ENV}, ../shared/data/wikitext-2/ next to the
repository or the current directory)."""


def add_parser(sub, common) -> None:
    """Registers ``eval-ppl`` on the sub-command parsers ``sub``."""
    e = sub.add_parser("eval-ppl", parents=[common], formatter_class=_HelpFormatter,
                       help="perplexity of a model or GPTQ checkpoint (and KL vs a reference)",
                       description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG)
    e.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="a GPTQ checkpoint folder, or a full-precision model folder / hub id")
    e.add_argument("--text", metavar="FILE", help=f"text to score (default: WikiText-2 {WIKITEXT_TEST})")
    e.add_argument("--tokens", metavar="FILE",
                   help="pre-tokenized ids instead of --text: .npy/.pt/.safetensors, read as one stream")
    e.add_argument("--seqlen", type=_positive_int, default=DEFAULT_EVAL_SEQLEN, metavar="T",
                   help=f"tokens per window (default: {DEFAULT_EVAL_SEQLEN})")
    e.add_argument("--windows", type=_windows, default=DEFAULT_EVAL_WINDOWS, metavar="N",
                   help=f"windows to score, from the start of the text, or 'all' (default: {DEFAULT_EVAL_WINDOWS})")
    e.add_argument("--batch-size", type=_positive_int, default=1, metavar="B",
                   help="windows per forward pass (default: 1)")
    e.add_argument("--compare", metavar="FP_MODEL",
                   help="also the mean KL divergence of next-token distributions against FP_MODEL "
                        "(e.g. the original model) and its perplexity")
    e.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or hub id (default: the model's own)")
    e.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the non-quantized weights while evaluating; auto = as stored (default: float32)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(func=cmd_eval_ppl)


def load_model(path_arg: str, dtype_name: str, what: str, device: str = "cpu", fuse: bool = False):
    """``(model, tokenizer, description)`` of a GPTQ checkpoint or a full-precision model, in eval mode
    on ``device``; ``what`` names the argument in error messages; ``fuse``: run a checkpoint's sibling
    projections as one GEMM each (gptqkit.nn.fuse_projections)."""
    path = _check_model_arg(path_arg, what)
    method = _quantization_method(path) if os.path.isdir(path) else None
    dtype = _torch_dtype(dtype_name)
    if method == "gptq":
        from gptqkit.model import GPTQForCausalLM

        q = GPTQForCausalLM.from_quantized(path, device=device, dtype=dtype, fuse=fuse)
        c = q.quantize_config
        from gptqkit.nn import fused_groups

        groups = fused_groups(q.model)
        fused = f", {sum(len(g.members) for g in groups)} layers fused into {len(groups)} GEMMs" if groups else ""
        desc = (f"GPTQ checkpoint, {c.bits}-bit, group size {c.group_size}, {'sym' if c.sym else 'asym'}"
                f"{', act-order' if c.desc_act else ''}, format {c.checkpoint_format}{fused}")
        return q.model, q.tokenizer, desc
    if method is not None and method not in DEQUANTIZED_ON_LOAD:
        raise CLIError(f"{what} {path_arg!r} is quantized with {method!r}; gptqkit evaluates GPTQ checkpoints, "
                       f"full-precision models and models transformers dequantizes on load "
                       f"({', '.join(sorted(DEQUANTIZED_ON_LOAD))})")
    from transformers import AutoTokenizer

    try:
        model = load_full_precision(path, dtype, what=f"{what} {path_arg!r}")
    except OSError as exc:
        if not os.path.isdir(path):
            raise CLIError(f"{what} {path_arg!r} is not a local folder and could not be loaded from the "
                           f"Hugging Face hub: {_one_line(exc)}") from exc
        raise
    model.to(device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    dt = str(next(model.parameters()).dtype).replace("torch.", "")
    return model, tok, f"full-precision model ({dt})"


def _load_token_stream(path: str):
    from gptqkit.calibration import load_token_array
    return load_token_array(path).reshape(-1)


def cmd_eval_ppl(args) -> int:
    # ---- checks before loading anything
    _check_model_arg(args.model, "MODEL_OR_CHECKPOINT")
    if args.compare is not None:
        _check_model_arg(args.compare, "--compare")
    if args.text is not None and args.tokens is not None:
        raise UsageError("pass --text or --tokens, not both")
    text = tokens_file = None
    if args.tokens is not None:
        tokens_file = _check_input_file(args.tokens, "--tokens")
    elif args.text is not None:
        text = _check_input_file(args.text, "--text")
    else:
        text = find_data_file(WIKITEXT_TEST)
        if text is None:
            where = ", ".join(str(p) for p in data_search_paths(WIKITEXT_TEST))
            raise UsageError(f"no evaluation text: pass --text FILE (or --tokens FILE); the default "
                             f"{WIKITEXT_TEST} was not found at {where}")
    tokenizer_path = _check_tokenizer_arg(args.tokenizer) if args.tokenizer else None

    from gptqkit.evaluation import kl_divergence, perplexity

    t0 = time.perf_counter()
    _log(args, f"loading {args.model} ...")
    model, tok, desc = load_model(args.model, args.dtype, "MODEL_OR_CHECKPOINT")
    if tokenizer_path is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ref = ref_desc = None
    if args.compare is not None:
        _log(args, f"loading {args.compare} (reference) ...")
        ref, ref_tok, ref_desc = load_model(args.compare, args.dtype, "--compare")
        if tok is None:
            tok = ref_tok
    t_load = time.perf_counter() - t0

    tokens = None
    if tokens_file is not None:
        tokens = _load_token_stream(tokens_file)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and tokens.numel() and int(tokens.max()) >= vocab:
            raise CLIError(f"--tokens {args.tokens!r}: token id {int(tokens.max())} is out of range for the "
                           f"model's vocabulary of {vocab}")
    elif tok is None:
        raise CLIError(f"{args.model!r} has no tokenizer to read --text with; pass --tokenizer PATH or "
                       f"--tokens FILE")

    kw = dict(tokens=tokens, seqlen=args.seqlen, windows=args.windows, batch_size=args.batch_size,
              progress=not args.quiet)
    t1 = time.perf_counter()
    result: Dict[str, Any] = {"model": args.model, "model_kind": desc, "source": text or tokens_file,
                              "seqlen": args.seqlen}
    if ref is None:
        r = perplexity(model, tok, text, **kw)
        result.update(perplexity=r.ppl, nll=r.nll, tokens=r.tokens, windows=r.windows)
    else:
        k = kl_divergence(ref, model, tok, text, **kw)
        result.update(perplexity=k.ppl_q, nll=math.log(k.ppl_q), tokens=k.tokens, windows=k.windows,
                      compare=args.compare, compare_kind=ref_desc, compare_perplexity=k.ppl_ref,
                      kl_divergence=k.kl, kl_divergence_max_window=k.kl_max)
    t_eval = time.perf_counter() - t1
    result.update(load_seconds=round(t_load, 3), eval_seconds=round(t_eval, 3))

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model:       {args.model} ({desc})")
    print(f"text:        {result['source']}")
    print(f"perplexity:  {result['perplexity']:.4f}")
    if ref is not None:
        print(f"KL vs ref:   {result['kl_divergence']:.5f} nats/token mean, {result['kl_divergence_max_window']:.5f} "
              f"in the worst window (reference {args.compare}: {ref_desc}, perplexity "
              f"{result['compare_perplexity']:.4f})")
    print(f"tokens:      {result['tokens']} predicted ({result['windows']} windows of {args.seqlen})")
    print(f"seconds:     {t_eval:.1f} evaluating, {t_load:.1f} loading")
    return 0

