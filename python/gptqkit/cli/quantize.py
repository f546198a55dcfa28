"""``gptqkit quantize``: a full-precision model into a GPTQ checkpoint folder."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Optional

from gptqkit.cli._common import (
    DEFAULT_EVAL_SEQLEN, DEFAULT_EVAL_WINDOWS, DATA_ENV, DTYPES, WIKITEXT_TEST, WIKITEXT_VALID, CLIError,
    UsageError, _HelpFormatter, _bits, _check_device, _check_input_file, _check_model_arg, _check_tokenizer_arg,
    _fmt_bytes, _fmt_seconds, _folder_size, _fraction, _group_size, _log, _nonneg_float, _nonneg_int, _one_line,
    _positive_int, _quantization_method, _size, _torch_dtype, _weights_size, _windows, data_search_paths,
    find_data_file,
)
from gptqkit.source_formats import DEQUANTIZED_ON_LOAD
from gptqkit.source_formats import describe as describe_source_format

QUANTIZE_DESCRIPTION = """\
Quantize MODEL (a local Hugging Face model folder or a hub id) with GPTQ and
write a GPTQ checkpoint to the folder OUT.

The model is loaded on the CPU; calibration windows go through it once up to
the first decoder block, then each block is quantized in turn: the inputs of
its linear layers are collected into Hessians, every layer is quantized with
GPTQ (native C++ core) and replaced by its quantized version before the next
layers' inputs are computed. At the end it prints a summary (GPTQ loss, time,
peak memory), where the checkpoint went and its size on disk.

OUT gets safetensors weights (sharded above --max-shard-size),
quantize_config.json, config.json with its quantization_config, and the
tokenizer. Saving is atomic: a previous GPTQ checkpoint at OUT is replaced
only once the new one is complete; any other non-empty folder is refused.

Interrupted runs resume: every finished block is kept in OUT.partial (next
to OUT; --resume-dir moves it) as the run goes. Run the same command again
and those blocks are restored instead of quantized, with the same result as
an uninterrupted run; a folder left by a run with other settings,
calibration data or model is refused (--no-resume deletes it and starts
over). It is removed once the checkpoint is saved.

Mixture-of-Experts models (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS, ...): the
experts transformers fuses into 3-D tensors are split into per-expert layers,
each quantized on the tokens routed to it and saved per expert
(mlp.experts.<e>.gate_proj). Experts that calibration routes no token to are
rounded to nearest; the summary lists them, and a larger --nsamples reaches
more experts. All experts' Hessians of a block's stage are held together; over
--hessian-memory (default: half the available memory) they are collected in
several passes, with the same result."""

QUANTIZE_EPILOG = f"""\
examples:
  # 4-bit, groups of 128 columns, symmetric: the common GPTQ setting
  gptqkit quantize ~/models/SmolLM2-135M out/smollm2-4bit --bits 4 --group-size 128

  # more accurate: act-order with static groups and a clipping search
  gptqkit quantize ~/models/SmolLM2-135M out/smollm2-4bit-ao \\
      --desc-act --static-groups --clip-steps 20 --eval

  # 3-bit on your own data (text, JSONL with a "text" field, or token ids)
  gptqkit quantize ~/models/SmolLM2-135M out/smollm2-3bit --bits 3 \\
      --calibration my_corpus.jsonl --nsamples 256 --seqlen 1024

calibration data (--calibration):
  a text file (.txt, .raw, .tokens, ...: blank lines dropped, the rest joined,
  tokenized, and --nsamples windows of --seqlen tokens drawn at random with
  --seed); a .jsonl/.json file of {{"text": ...}} objects (sampled the same
  way); a token-id array [n, seqlen] in .npy, .pt or .safetensors (used as is:
  the first --nsamples rows, cut to --seqlen if given); or a Hugging Face
  dataset name "name[:config[:split]]" (needs the datasets library and network).
  Default: the WikiText-2 validation set {WIKITEXT_VALID}, searched in
  ${DATA_ENV}, then ../shared/data/wikitext-2/ next to the gptqkit repository
  and next to the current directory.

what the GPTQ options do:
  --bits            bits per weight; 4 is the usual trade-off, 3 and 2 lose more.
  --group-size      input columns that share one scale and zero point; smaller
                    groups are more accurate but store more scales (-1: one
                    grid per output row).
  --desc-act        "act-order": quantize columns in order of decreasing
                    Hessian diagonal (most important inputs first), so that
                    later columns absorb their error. Usually better accuracy;
                    the checkpoint stores a non-trivial g_idx.
  --act-group-aware group-aware act-order: the same idea inside each group
                    (columns by decreasing Hessian diagonal), and whole groups
                    ordered by their largest diagonal entry. Groups stay whole,
                    so g_idx stays sequential (an ordinary desc_act=False
                    checkpoint) with much of act-order's gain. On by default
                    wherever it applies (without --desc-act, with
                    --group-size > 0); --no-act-group-aware quantizes columns
                    in their natural order (the GPTQ paper's algorithm).
  --static-groups   compute every group's scale/zero from the unquantized
                    weights before the sweep; with --desc-act it keeps the
                    groups contiguous (g_idx sequential), which loaders handle
                    faster than act-order's scattered groups.
  --asym            asymmetric grid (own zero point per group) instead of a
                    symmetric one centred on zero.
  --damp            damping added to the Hessian's diagonal, as a fraction of
                    its mean, for a numerically stable inverse; raised
                    automatically when a Hessian is not positive definite.
  --block-size      width of GPTQ's lazy batch of columns (speed only).
  --no-true-sequential
                    take all of a block's layer inputs from the unquantized
                    block, instead of quantizing q/k/v, then o, then gate/up,
                    then down, each seeing the already quantized ones.
  --clip-steps N    search N shrunk clipping ranges for every group's grid
                    (down to --clip-min-ratio of min-max) and keep the one with
                    the least Hessian-weighted error; 0 = plain min-max.
                    Default 16: 4-11 % more time (two runs) for a third less KL
                    divergence from the original model (SmolLM2-135M, 4-bit).
  --gptaq           asymmetric calibration (GPTAQ): fit every layer to the
                    unquantized model's output rather than to its own inputs'
                    quantized-model values, so each layer also makes up for the
                    error of the layers before it. SmolLM2-135M, 4-bit, act-order
                    + clipping, 128 windows: KL divergence from the original
                    0.204 -> 0.120, perplexity 34.96 -> 32.10 (fp32 29.01), for
                    1.8x the quantization time and ~40 % more peak memory
                    (GPTQModel's GPTAQ, same run: KL 0.217, 1.8x slower).
                    --gptaq-alpha 0.5 is the default (32 windows: 0.25 / 0.5 /
                    0.75 gave KL 0.151 / 0.133 / 0.145). Same checkpoint format.
  --format          gptq: v1 zero points, what every GPTQ loader reads;
                    gptq_v2: true zero points (GPTQModel's v2).
"""


def add_parser(sub, common) -> None:
    """Registers ``quantize`` on the sub-command parsers ``sub``."""
    from gptqkit.config import QuantizeConfig

    d = QuantizeConfig()  # the library's defaults are the CLI's
    q = sub.add_parser("quantize", parents=[common], formatter_class=_HelpFormatter,
                       help="quantize a model with GPTQ into a checkpoint folder",
                       description=QUANTIZE_DESCRIPTION, epilog=QUANTIZE_EPILOG)
    q.add_argument("model", metavar="MODEL", help="full-precision model: a local folder or a Hugging Face hub id")
    q.add_argument("out", metavar="OUT", help="folder to write the GPTQ checkpoint to (new, empty, or an "
                                              "existing GPTQ checkpoint to replace)")
    g = q.add_argument_group("quantization (GPTQ)")
    g.add_argument("--bits", type=_bits, default=d.bits, metavar="{2,3,4,8}",
                   help=f"bits per weight (default: {d.bits})")
    g.add_argument("--group-size", type=_group_size, default=d.group_size, metavar="N",
                   help=f"input columns sharing one scale/zero point; -1 = one per output row "
                        f"(default: {d.group_size})")
    g.add_argument("--desc-act", action="store_true", default=d.desc_act,
                   help="act-order: quantize columns by decreasing Hessian diagonal (usually more accurate)")
    g.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=d.act_group_aware,
                   help="group-aware act-order: columns by decreasing Hessian diagonal within each group, groups "
                        "by their largest; the checkpoint stays desc_act=False (default: on wherever it "
                        "applies, i.e. without --desc-act and with --group-size > 0; --no-act-group-aware "
                        "keeps the paper's natural order)")
    g.add_argument("--static-groups", action="store_true", default=d.static_groups,
                   help="fix every group's grid before the sweep (contiguous groups with --desc-act)")
    g.add_argument("--asym", action="store_true", default=not d.sym,
                   help="asymmetric grid with its own zero point (default: symmetric)")
    g.add_argument("--damp", type=_fraction, default=d.damp_percent, metavar="F",
                   help=f"Hessian damping, a fraction of its mean diagonal, raised automatically if needed "
                        f"(default: {d.damp_percent})")
    g.add_argument("--block-size", type=_positive_int, default=d.block_size, metavar="N",
                   help=f"lazy-batch width of the column sweep, speed only (default: {d.block_size})")
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   default=d.true_sequential,
                   help="feed all of a block's layers from the unquantized block (default: true-sequential, "
                        "each layer group sees the already quantized ones)")
    g.add_argument("--clip-steps", type=_nonneg_int, default=d.clip_steps, metavar="N",
                   help=f"clipping search: try N shrunk grid ranges per group and keep the least-error one; "
                        f"0 = plain min-max (default: {d.clip_steps})")
    g.add_argument("--clip-min-ratio", type=_fraction, default=d.clip_min_ratio, metavar="R",
                   help=f"smallest range the clipping search tries, as a fraction of min-max "
                        f"(default: {d.clip_min_ratio})")
    g.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=d.gptaq,
                   help=f"asymmetric calibration: fit each layer to the unquantized model's output, so it also "
                        f"compensates the error of the layers before it (more accurate; about one more forward "
                        f"pass per layer group and one more activation cache) (default: "
                        f"{'on' if d.gptaq else 'off'})")
    g.add_argument("--gptaq-alpha", type=_fraction, default=d.gptaq_alpha, metavar="A",
                   help=f"share of asymmetric calibration's target shift to apply, in (0, 1] "
                        f"(default: {d.gptaq_alpha})")
    g.add_argument("--format", dest="checkpoint_format", choices=("gptq", "gptq_v2"), default=d.checkpoint_format,
                   help=f"checkpoint zero-point format: gptq (v1, read by every GPTQ loader) or gptq_v2 "
                        f"(default: {d.checkpoint_format})")

    c = q.add_argument_group("calibration")
    c.add_argument("--calibration", metavar="FILE|NAME",
                   help=f"calibration data: text/JSONL file, .npy/.pt/.safetensors token ids [n, seqlen], or a "
                        f"datasets name (default: WikiText-2 {WIKITEXT_VALID}, see below)")
    c.add_argument("--nsamples", type=_positive_int, default=None, metavar="N",
                   help="calibration sequences (default: 128 windows of text; all rows of a token array)")
    c.add_argument("--seqlen", type=_positive_int, default=None, metavar="T",
                   help="tokens per calibration window (default: 512 for text; token arrays as stored)")
    c.add_argument("--seed", type=int, default=0, help="seed of the window sampling (default: 0)")
    c.add_argument("--batch-size", type=_positive_int, default=1, metavar="B",
                   help="calibration sequences per forward pass (default: 1)")

    r = q.add_argument_group("model, device and output")
    r.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to load the model in: float32 calibrates most accurately; the non-quantized "
                        "tensors (embeddings, norms) are saved in it; auto = the model's own (default: float32)")
    r.add_argument("--device", default="cpu", metavar="{cpu,cuda}",
                   help="where each block runs while it is quantized; weights stay on the CPU (default: cpu)")
    r.add_argument("--extra-cache", type=_nonneg_float, default=0.0, metavar="F",
                   help="memory for skipping recomputation, in units of one calibration activation cache "
                        "(nsamples x seqlen x hidden size floats): keeps the inputs of wide last layers "
                        "(the MLP's down_proj) instead of recomputing them. 0 = lowest peak memory; "
                        "~2.7 for Llama-style MLPs caches them all, ~20%% less arithmetic (on a 2-core CPU "
                        "no measurable wall-time gain) (default: 0)")
    r.add_argument("--hessian-memory", type=_size, metavar="SIZE",
                   help="most memory the Hessians of one group of layers may take, e.g. 8GB: all experts' "
                        "gate/up layers of an MoE block form one group, one K x K float32 Hessian per expert; "
                        "a group over it is collected in several passes over the calibration data (same "
                        "result, more time) (default: half the memory available on --device)")
    r.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer folder or hub id, when MODEL has none (default: MODEL's)")
    r.add_argument("--resume-dir", metavar="DIR",
                   help="where finished blocks are kept while the run goes, so that an interrupted run resumes "
                        "(default: OUT.partial, next to OUT; deleted once the checkpoint is saved)")
    r.add_argument("--no-resume", action="store_true",
                   help="delete the blocks an interrupted run left in the resume folder and start over")
    r.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="split the safetensors weights into shards of at most SIZE, e.g. 500MB, 2GB, 1GiB "
                        "(default: 2GB)")
    r.add_argument("--eval", action="store_true",
                   help=f"afterwards, perplexity of the quantized model on WikiText-2 test ({WIKITEXT_TEST}), "
                        f"{DEFAULT_EVAL_WINDOWS} windows of {DEFAULT_EVAL_SEQLEN} tokens")
    r.add_argument("--eval-text", metavar="FILE", help=f"text for --eval (default: {WIKITEXT_TEST})")
    r.add_argument("--eval-windows", type=_windows, default=DEFAULT_EVAL_WINDOWS, metavar="N",
                   help=f"windows for --eval, or 'all' (default: {DEFAULT_EVAL_WINDOWS})")
    q.set_defaults(func=cmd_quantize)


def _resolve_calibration(arg: Optional[str]) -> tuple:
    """``(what to pass to quantize, how to describe it)``; usage errors for missing files."""
    if arg is None:
        found = find_data_file(WIKITEXT_VALID)
        if found is None:
            where = ", ".join(str(p) for p in data_search_paths(WIKITEXT_VALID))
            raise UsageError(f"no calibration data: pass --calibration FILE|NAME (a text or JSONL file, a "
                             f".npy/.pt/.safetensors token array, or a datasets name); the default WikiText-2 "
                             f"file was not found at {where}")
        return found, f"{found} (WikiText-2 validation, the default)"
    path = os.path.expanduser(arg)
    if os.path.isdir(path):
        raise UsageError(f"--calibration {arg!r}: is a folder; expected a file or a dataset name")
    if os.path.isfile(path):
        return path, path
    from gptqkit.calibration import _looks_like_path
    if _looks_like_path(path):
        raise UsageError(f"--calibration {arg!r}: no such file")
    import importlib.util
    if importlib.util.find_spec("datasets") is None:
        raise UsageError(f"--calibration {arg!r}: no such file, and dataset names need the `datasets` library "
                         f"(pip install datasets); pass a local text/JSONL file or token array instead")
    return arg, f"{arg} (Hugging Face dataset)"


def _check_out_folder(out: str, model: str) -> str:
    out_path = os.path.realpath(os.path.expanduser(out))
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise UsageError(f"OUT {out!r}: exists and is not a folder")
    if os.path.isdir(model) and os.path.realpath(model) == out_path:
        raise UsageError("OUT is the model folder itself; choose a new folder for the checkpoint")
    if os.path.isdir(out_path) and os.listdir(out_path):
        if _quantization_method(out_path) != "gptq":
            raise UsageError(f"OUT {out!r}: is a non-empty folder that is not a GPTQ checkpoint; saving replaces "
                             f"the whole folder, so choose a new or empty one")
        return "replace"
    return "new"


def _check_resume_dir(resume_dir: Optional[str], out: str) -> str:
    """The resume folder (default ``OUT.partial``): not inside OUT (saving replaces OUT
    whole), and either absent, empty or a gptqkit resume store (never someone's folder)."""
    from gptqkit.resume import MANIFEST_FILE

    out_path = os.path.realpath(os.path.expanduser(out))
    path = os.path.realpath(os.path.expanduser(resume_dir)) if resume_dir else out_path.rstrip(os.sep) + ".partial"
    what = "--resume-dir" if resume_dir else f"the resume folder {path}"
    if os.path.commonpath([path, out_path]) == out_path:
        raise UsageError(f"{what}: must not be OUT or inside it (saving replaces OUT as a whole)")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{what}: exists and is not a folder")
        if os.listdir(path) and not os.path.exists(os.path.join(path, MANIFEST_FILE)):
            raise UsageError(f"{what}: is a non-empty folder that gptqkit did not write; choose another "
                             f"with --resume-dir")
    return path


def cmd_quantize(args) -> int:
    from gptqkit.checkpoint import parse_size
    from gptqkit.config import QuantizeConfig

    # ---- everything that can be checked before loading the model
    try:
        qcfg = QuantizeConfig(
            bits=args.bits, group_size=args.group_size, damp_percent=args.damp, desc_act=args.desc_act,
            static_groups=args.static_groups, act_group_aware=args.act_group_aware, sym=not args.asym,
            true_sequential=args.true_sequential,
            block_size=args.block_size, checkpoint_format=args.checkpoint_format, clip_steps=args.clip_steps,
            clip_min_ratio=args.clip_min_ratio, gptaq=args.gptaq, gptaq_alpha=args.gptaq_alpha,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        parse_size(args.max_shard_size)
    except ValueError as exc:
        raise UsageError(str(exc).replace("max_shard_size:", "--max-shard-size:", 1)) from None
    model_path = _check_model_arg(args.model)
    stored_method = _quantization_method(model_path) if os.path.isdir(model_path) else None
    if stored_method is not None and stored_method not in DEQUANTIZED_ON_LOAD:
        raise UsageError(f"MODEL {args.model!r} is already quantized ({stored_method}); quantize needs the "
                         f"full-precision model, or one stored in a format transformers dequantizes on "
                         f"load ({', '.join(sorted(DEQUANTIZED_ON_LOAD))})")
    out_state = _check_out_folder(args.out, model_path)
    resume_dir = _check_resume_dir(args.resume_dir, args.out)
    calibration, calib_desc = _resolve_calibration(args.calibration)
    tokenizer_path = None
    if args.tokenizer is not None:
        tokenizer_path = _check_tokenizer_arg(args.tokenizer)
    device = _check_device(args.device)
    eval_text = None
    if args.eval:
        if args.eval_text is not None:
            eval_text = _check_input_file(args.eval_text, "--eval-text")
        else:
            eval_text = find_data_file(WIKITEXT_TEST)
    elif args.eval_text is not None:
        raise UsageError("--eval-text needs --eval")

    from gptqkit.model import GPTQForCausalLM

    t0 = time.perf_counter()
    _log(args, f"loading {args.model} ({args.dtype}) ...")
    if stored_method is not None:
        _log(args, describe_source_format(stored_method))
    try:
        model = GPTQForCausalLM.from_pretrained(model_path, qcfg, dtype=_torch_dtype(args.dtype))
    except OSError as exc:
        if not os.path.isdir(model_path):
            raise CLIError(f"MODEL {args.model!r} is not a local folder and could not be loaded from the "
                           f"Hugging Face hub: {_one_line(exc)}") from exc
        raise
    if tokenizer_path is not None:
        from transformers import AutoTokenizer
        model.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    t_load = time.perf_counter() - t0
    from gptqkit.calibration import TOKEN_ARRAY_EXTS
    if model.tokenizer is None and os.path.splitext(str(calibration))[1].lower() not in TOKEN_ARRAY_EXTS:
        raise CLIError(f"MODEL {args.model!r} has no tokenizer to read the calibration text with; pass "
                       f"--tokenizer PATH, or token ids as --calibration FILE.npy|.pt|.safetensors")

    _log(args, f"calibration: {calib_desc}")
    if args.no_resume and os.path.isdir(resume_dir):
        _log(args, f"--no-resume: deleting the blocks of an interrupted run in {resume_dir}")
        shutil.rmtree(resume_dir)
    elif os.path.isdir(resume_dir):
        _log(args, f"found the blocks of an interrupted run in {resume_dir}: resuming (--no-resume starts over)")
    progress = not args.quiet
    t1 = time.perf_counter()
    report = model.quantize(calibration, batch_size=args.batch_size, nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed, device=device, progress=progress, extra_cache=args.extra_cache,
                            resume_dir=resume_dir, hessian_memory=args.hessian_memory)
    t_quant = time.perf_counter() - t1
    if not progress:  # with progress on, quantize() prints the summary itself
        print(report.summary())

    if out_state == "replace":
        _log(args, f"replacing the existing GPTQ checkpoint at {args.out}")
    t2 = time.perf_counter()
    saved = model.save_quantized(os.path.expanduser(args.out), max_shard_size=args.max_shard_size)
    t_save = time.perf_counter() - t2
    shutil.rmtree(resume_dir, ignore_errors=True)  # the checkpoint is complete: the blocks are not needed

    size, nfiles = _folder_size(saved)
    settings = (f"{qcfg.bits}-bit, group size {qcfg.group_size}, {'sym' if qcfg.sym else 'asym'}"
                f"{', act-order' if qcfg.desc_act else ''}{', group-aware order' if qcfg.group_aware_order else ''}"
                f"{', static groups' if qcfg.static_groups else ''}"
                f"{f', asymmetric calibration (alpha {qcfg.gptaq_alpha:g})' if qcfg.gptaq else ''}"
                f", format {qcfg.checkpoint_format}")
    print(f"saved GPTQ checkpoint to {saved} ({settings})")
    original = _weights_size(model_path) if os.path.isdir(model_path) else None
    extra = ""
    if original:
        extra = f"; the original weights: {_fmt_bytes(original)}, {original / max(size, 1):.1f}x larger"
    print(f"size on disk: {_fmt_bytes(size)} in {nfiles} files{extra}")
    print(f"time: {_fmt_seconds(time.perf_counter() - t0)} (load {_fmt_seconds(t_load)}, quantize "
          f"{_fmt_seconds(t_quant)}, save {_fmt_seconds(t_save)})")

    if args.eval:
        if eval_text is None:
            where = ", ".join(str(p) for p in data_search_paths(WIKITEXT_TEST))
            print(f"--eval skipped: {WIKITEXT_TEST} not found at {where} (pass --eval-text FILE)")
            return 0
        if model.tokenizer is None:
            raise CLIError("--eval needs a tokenizer, and MODEL has none (pass --tokenizer PATH)")
        from gptqkit.calibration import model_max_length
        from gptqkit.evaluation import perplexity

        seqlen = DEFAULT_EVAL_SEQLEN
        limit = model_max_length(getattr(model.model, "config", None))
        if limit is not None and limit < seqlen:
            seqlen = limit
        t3 = time.perf_counter()
        res = perplexity(model.model, model.tokenizer, eval_text, seqlen=seqlen, windows=args.eval_windows,
                         progress=progress)
        print(f"perplexity: {res.ppl:.4f} on {os.path.basename(eval_text)} ({res.windows} windows of {res.seqlen} "
              f"tokens, {res.tokens} predicted) in {_fmt_seconds(time.perf_counter() - t3)}")
    return 0

