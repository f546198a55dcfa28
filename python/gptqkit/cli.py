"""The ``gptqkit`` command line: ``quantize``, ``eval-ppl`` and ``info``.

Run ``gptqkit --help`` (or ``python -m gptqkit --help``) and ``gptqkit
COMMAND --help`` for what each command does, with examples. From Python::

    from gptqkit.cli import main
    status = main(["info", "out/"])          # returns the exit status

Exit status: 0 on success, 2 for bad usage (an invalid option value, a model
folder, calibration file or checkpoint that does not exist), 1 when the work
itself fails (an unreadable or corrupt checkpoint, a model that cannot be
quantized, ...). Expected errors print one line ``gptqkit: error: ...`` to
stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from gptqkit.source_formats import DEQUANTIZED_ON_LOAD, dequantizing_kwargs
from gptqkit.source_formats import describe as describe_source_format

__all__ = ["main", "build_parser", "find_data_file"]

PROG = "gptqkit"
WIKITEXT_VALID = "wiki.valid.tokens"
WIKITEXT_TEST = "wiki.test.raw"
DATA_ENV = "GPTQKIT_DATA"
DEFAULT_EVAL_WINDOWS = 40
DEFAULT_EVAL_SEQLEN = 512
DTYPES = ("float32", "float16", "bfloat16", "auto")


# =========================================================================== errors

class CLIError(Exception):
    """An expected failure: printed as one line, exit status ``status``."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class UsageError(CLIError):
    """Bad usage: an invalid option or argument (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(message, status=2)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``gptqkit: error: ... (see 'gptqkit quantize --help')``."""

    def error(self, message):  # noqa: D102 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' and epilogs' layout; wider option column."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=min(100, _terminal_width()))


def _terminal_width() -> int:
    try:
        import shutil
        return max(60, shutil.get_terminal_size((100, 24)).columns)
    except Exception:  # pragma: no cover
        return 100


def _one_line(message: Any) -> str:
    return " ".join(str(message).split()) or "(no message)"


# =========================================================================== data files

def _repo_root() -> Path:
    # python/gptqkit/cli.py -> the repository (an editable install or a checkout)
    return Path(__file__).resolve().parents[2]


def data_search_paths(filename: str) -> List[Path]:
    """Where :func:`find_data_file` looks for a WikiText-2 file, in order.

    ``$GPTQKIT_DATA/wikitext-2/FILE`` and ``$GPTQKIT_DATA/FILE`` when the
    variable is set, then ``../shared/data/wikitext-2/FILE`` relative to the
    repository holding gptqkit and relative to the current directory.
    """
    paths: List[Path] = []
    env = os.environ.get(DATA_ENV)
    if env:
        base = Path(os.path.expanduser(env))
        paths += [base / "wikitext-2" / filename, base / filename]
    for root in (_repo_root(), Path.cwd()):
        paths.append((root / ".." / "shared" / "data" / "wikitext-2" / filename).resolve())
    out: List[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def find_data_file(filename: str) -> Optional[str]:
    """The first existing ``filename`` among :func:`data_search_paths`, or ``None``."""
    for p in data_search_paths(filename):
        if p.is_file():
            return str(p)
    return None


# =========================================================================== small helpers

def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def _folder_size(folder: str) -> tuple:
    """``(bytes, files)`` of every regular file under ``folder``."""
    total, count = 0, 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
                count += 1
    return total, count


def _weights_size(folder: str) -> Optional[int]:
    """Bytes of a model folder's weight files (safetensors, or pickled .bin), or ``None``."""
    if not os.path.isdir(folder):
        return None
    names = os.listdir(folder)
    for ext in (".safetensors", ".bin", ".pt", ".pth"):
        files = [n for n in names if n.endswith(ext) and os.path.isfile(os.path.join(folder, n))]
        if files:
            return sum(os.path.getsize(os.path.join(folder, n)) for n in files)
    return None


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_json_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}: invalid JSON ({exc})") from None


def _quantization_method(folder: str) -> Optional[str]:
    """``"gptq"`` for a GPTQ checkpoint, another method name for other quantized
    models, ``None`` for a full-precision model folder."""
    if os.path.isfile(os.path.join(folder, "quantize_config.json")):
        return "gptq"
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    cfg = _read_json_file(cfg_path)
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict):
        return None
    return str(qc.get("quant_method", "gptq")).lower()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def _check_model_arg(value: str, what: str = "MODEL") -> str:
    """A local model folder (checked now) or something that may be a Hugging Face hub id."""
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{what} {value!r}: the folder has no config.json, so it is not a Hugging Face "
                             f"model folder")
        return path
    if os.path.exists(path):
        raise UsageError(f"{what} {value!r}: expected a model folder (or a Hugging Face hub id), got a file")
    looks_local = os.path.isabs(path) or value.startswith((".", "~")) or value.count("/") > 1 \
        or os.sep != "/" and os.sep in value
    if looks_local or not _HUB_ID.fullmatch(value):
        raise UsageError(f"{what} {value!r}: no such model folder")
    return value  # a hub id; transformers will try to fetch it


def _check_input_file(value: str, option: str) -> str:
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        raise UsageError(f"{option} {value!r}: is a folder; expected a file")
    if not os.path.isfile(path):
        raise UsageError(f"{option} {value!r}: no such file")
    return path


def _torch_dtype(name: str):
    import torch
    return None if name == "auto" else getattr(torch, name)


def _check_device(device: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                             f"use --device cpu")
    return device


def _log(args, message: str) -> None:
    """Progress chatter: stderr, silenced by --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- argparse types

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _size(text: str) -> int:
    from gptqkit.checkpoint import parse_size

    try:
        return parse_size(text, "SIZE")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("SIZE: ")) from None


def _group_size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v == -1 or v > 0:
        return v
    raise argparse.ArgumentTypeError(f"expected a positive number of columns or -1, got {text!r}")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _windows(text: str) -> Optional[int]:
    if text.strip().lower() == "all":
        return None
    return _positive_int(text)


def _bits(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v not in (2, 3, 4, 8):
        raise argparse.ArgumentTypeError(f"GPTQ supports 2, 3, 4 or 8 bits per weight, got {text!r}")
    return v


# =========================================================================== help texts

MAIN_DESCRIPTION = """\
gptqkit: GPTQ quantization of Hugging Face causal language models.

GPTQ rounds a model's weights to 2-8 bit integers one column at a time and
corrects the columns not yet rounded for the error made, guided by the
second-order statistics (Hessian X^T X) of each layer's inputs on a little
calibration text. The result is a checkpoint in the standard GPTQ layout
(qweight/qzeros/scales/g_idx, the layout transformers, AutoGPTQ and GPTQModel
load)."""

MAIN_EPILOG = """\
commands in one line each:
  quantize   quantize a full-precision model into a GPTQ checkpoint folder
  eval-ppl   perplexity of a model or checkpoint on a text (and KL vs a reference)
  info       what a GPTQ checkpoint holds: settings, per-layer table, sizes

typical session:
  gptqkit quantize HuggingFaceTB/SmolLM2-135M out/smollm2-gptq --bits 4 --group-size 128
  gptqkit info out/smollm2-gptq
  gptqkit eval-ppl out/smollm2-gptq --compare HuggingFaceTB/SmolLM2-135M

Run 'gptqkit COMMAND --help' for each command's options. Exit status: 0 ok,
2 bad usage (invalid option, missing file or folder), 1 the work failed.
Expected errors are one line; --verbose shows the traceback."""

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

INFO_DESCRIPTION = """\
Describe a GPTQ checkpoint without loading the model: its quantization
settings (bits, group size, act-order, symmetric, format, who made it), its
files, a table of the quantized layers (shape, bits, group size, number of
groups, whether act-order reordered the columns, bytes) and totals: bytes of
the quantized layers against the same layers in float16, the resulting bits
per weight (scales and zero points included), and the other tensors
(embeddings, norms) stored unquantized.

Mixture-of-Experts checkpoints hold one layer per expert and projection (a
128-expert, 48-block model has about 18,000); the table shows the experts of
one block's projection that share their shape and settings as one row,
model.layers.0.mlp.experts.{0-127}.down_proj (x128), with their bytes added
up. --per-expert lists every expert layer; --json always does."""

INFO_EPILOG = """\
examples:
  gptqkit info out/smollm2-4bit
  gptqkit info out/smollm2-4bit --json | python -c "import json,sys; print(json.load(sys.stdin)['bits'])"

Reads checkpoints from gptqkit, AutoGPTQ and GPTQModel (gptq and gptq_v2
formats, single-file or sharded)."""


# =========================================================================== parser

def build_parser() -> argparse.ArgumentParser:
    """The ``gptqkit`` argument parser (sub-commands quantize, eval-ppl, info)."""
    from gptqkit.config import QuantizeConfig

    d = QuantizeConfig()  # the library's defaults are the CLI's
    try:
        from gptqkit import __version__
    except Exception:  # pragma: no cover
        __version__ = "unknown"

    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or status lines (results are still printed)")

    parser = _Parser(prog=PROG, description=MAIN_DESCRIPTION, epilog=MAIN_EPILOG,
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or status lines (results are still printed)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # ------------------------------------------------------------------ quantize
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

    # ------------------------------------------------------------------ eval-ppl
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

    # ------------------------------------------------------------------ info
    i = sub.add_parser("info", parents=[common], formatter_class=_HelpFormatter,
                       help="settings, per-layer table and sizes of a GPTQ checkpoint",
                       description=INFO_DESCRIPTION, epilog=INFO_EPILOG)
    i.add_argument("checkpoint", metavar="CHECKPOINT", help="a GPTQ checkpoint folder")
    i.add_argument("--json", action="store_true", help="print everything as JSON (machine-readable)")
    i.add_argument("--per-expert", action="store_true",
                   help="one table row per expert layer (default: a block's experts with the same shape and "
                        "settings share one row)")
    i.set_defaults(func=cmd_info)
    return parser


# =========================================================================== quantize

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
        tokenizer_path = _check_model_arg(args.tokenizer, "--tokenizer")
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


# =========================================================================== eval-ppl

def _load_for_eval(path_arg: str, dtype_name: str, what: str):
    """``(model, tokenizer, description)`` of a GPTQ checkpoint or a full-precision model."""
    path = _check_model_arg(path_arg, what)
    method = _quantization_method(path) if os.path.isdir(path) else None
    dtype = _torch_dtype(dtype_name)
    if method == "gptq":
        from gptqkit.model import GPTQForCausalLM

        q = GPTQForCausalLM.from_quantized(path, device="cpu", dtype=dtype)
        c = q.quantize_config
        desc = (f"GPTQ checkpoint, {c.bits}-bit, group size {c.group_size}, {'sym' if c.sym else 'asym'}"
                f"{', act-order' if c.desc_act else ''}, format {c.checkpoint_format}")
        return q.model, q.tokenizer, desc
    if method is not None and method not in DEQUANTIZED_ON_LOAD:
        raise CLIError(f"{what} {path_arg!r} is quantized with {method!r}; gptqkit evaluates GPTQ checkpoints, "
                       f"full-precision models and models transformers dequantizes on load "
                       f"({', '.join(sorted(DEQUANTIZED_ON_LOAD))})")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        extra = {}
        if method in DEQUANTIZED_ON_LOAD:
            extra = dequantizing_kwargs(getattr(AutoConfig.from_pretrained(path), "quantization_config", None))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto", **extra)
    except OSError as exc:
        if not os.path.isdir(path):
            raise CLIError(f"{what} {path_arg!r} is not a local folder and could not be loaded from the "
                           f"Hugging Face hub: {_one_line(exc)}") from exc
        raise
    model.eval()
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
    tokenizer_path = _check_model_arg(args.tokenizer, "--tokenizer") if args.tokenizer else None

    from gptqkit.evaluation import kl_divergence, perplexity

    t0 = time.perf_counter()
    _log(args, f"loading {args.model} ...")
    model, tok, desc = _load_for_eval(args.model, args.dtype, "MODEL_OR_CHECKPOINT")
    if tokenizer_path is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ref = ref_desc = None
    if args.compare is not None:
        _log(args, f"loading {args.compare} (reference) ...")
        ref, ref_tok, ref_desc = _load_for_eval(args.compare, args.dtype, "--compare")
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


# =========================================================================== info

_EXPERT_LAYER = re.compile(r"^(.*\.experts\.)(\d+)(\..+)$")
_ROW_KEYS = ("out_features", "in_features", "bits", "group_size", "groups", "act_order")


def _index_ranges(indices: List[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ",".join(parts)


def _layer_rows(layers: Dict[str, Dict[str, Any]], per_expert: bool) -> List[tuple]:
    """``(label, layer dict)`` table rows in natural order; unless ``per_expert``, the experts of one
    ``...experts.<e>.<proj>`` family with equal shape and settings become one row, bytes summed."""
    order: List[tuple] = []  # ("layer", name) or ("family", key), at the first member's place
    families: Dict[tuple, List[tuple]] = {}
    for name in sorted(layers, key=_natural_key):
        m = None if per_expert else _EXPERT_LAYER.match(name)
        if m is None:
            order.append(("layer", name))
            continue
        key = (m.group(1), m.group(3)) + tuple(layers[name].get(k) for k in _ROW_KEYS)
        if key not in families:
            families[key] = []
            order.append(("family", key))
        families[key].append((int(m.group(2)), name))
    rows = []
    for kind, ref in order:
        members = sorted(families[ref]) if kind == "family" else [(None, ref)]
        if len(members) == 1:
            rows.append((members[0][1], layers[members[0][1]]))
            continue
        merged = dict(layers[members[0][1]])
        merged["bytes"] = sum(layers[name].get("bytes") or 0 for _, name in members)
        label = f"{ref[0]}{{{_index_ranges([k for k, _ in members])}}}{ref[1]} (x{len(members)})"
        rows.append((label, merged))
    return rows


def _info_text(info: Dict[str, Any], disk: tuple, per_expert: bool = False) -> str:
    qc = info.get("quantization_config") or {}
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    lines = []
    arch = ", ".join(info.get("architectures") or []) or "?"
    lines.append(f"checkpoint:   {os.path.abspath(info['path'])}")
    lines.append(f"model:        {info.get('model_type') or '?'} ({arch})")
    if meta.get("quantizer"):
        lines.append(f"made by:      {meta['quantizer']}")
    fmt = info.get("checkpoint_format")
    lines.append(f"format:       {fmt} ({'true zero points' if fmt == 'gptq_v2' else 'v1: zero points stored minus 1'})")
    onoff = lambda v: "on" if v else "off"  # noqa: E731
    settings = [f"bits {info['bits']}", f"group size {info['group_size']}",
                "sym" if info.get("sym") else "asym", f"act-order (desc_act) {onoff(info.get('desc_act'))}"]
    for key, label in (("act_group_aware", "group-aware order"), ("static_groups", "static groups"),
                       ("true_sequential", "true-sequential")):
        v = qc.get(key, meta.get(key))
        if v is not None:
            settings.append(f"{label} {onoff(v)}")
    for key, label in (("damp_percent", "damp"), ("clip_steps", "clip steps"), ("clip_min_ratio", "clip min ratio")):
        v = qc.get(key, meta.get(key))
        if v is not None:
            settings.append(f"{label} {v}")
    gptaq = meta.get("gptaq")
    if isinstance(gptaq, dict):
        settings.append(f"asymmetric calibration (gptaq) alpha {gptaq.get('alpha')}")
    lines.append("settings:     " + textwrap.fill(", ".join(settings), width=86, subsequent_indent=" " * 14,
                                                 break_on_hyphens=False))
    if qc.get("dynamic"):
        lines.append(f"dynamic:      {json.dumps(qc['dynamic'])}")
    if qc.get("lm_head"):
        lines.append("lm_head:      quantized")
    files = info.get("files") or []
    shown = ", ".join(files[:4]) + (f", ... ({len(files)} files)" if len(files) > 4 else "")
    lines.append(f"weights:      {shown}")
    lines.append(f"on disk:      {_fmt_bytes(disk[0])} in {disk[1]} files")
    lines.append("")

    layers = info.get("layers") or {}
    if layers:
        rows = _layer_rows(layers, per_expert)
        w = max(len("layer"), max(len(n) for n, _ in rows))
        head = f"{'layer':<{w}}  {'out x in':>13}  {'bits':>4}  {'group':>5}  {'groups':>6}  {'act-order':>9}  {'bytes':>9}"
        lines.append(head)
        lines.append("-" * len(head))
        for n, L in rows:
            shape = f"{L.get('out_features')} x {L.get('in_features')}"
            lines.append(f"{n:<{w}}  {shape:>13}  {L.get('bits')!s:>4}  {L.get('group_size')!s:>5}  "
                         f"{L.get('groups')!s:>6}  {'yes' if L.get('act_order') else 'no':>9}  "
                         f"{_fmt_bytes(L.get('bytes')):>9}")
        lines.append("")
    weights = sum((L.get("in_features") or 0) * (L.get("out_features") or 0) for L in layers.values())
    qb, fb = info.get("quantized_bytes") or 0, info.get("fp16_bytes") or 0
    ratio = f", {fb / qb:.2f}x smaller" if qb else ""
    bpw = f", {qb * 8 / weights:.2f} bits per weight with scales and zeros" if weights else ""
    lines.append(f"quantized layers: {info.get('num_quantized_layers', len(layers))}, "
                 f"{_fmt_bytes(qb)} vs {_fmt_bytes(fb)} in float16{ratio}{bpw}")
    lines.append(f"other tensors:    {_fmt_bytes(info.get('other_bytes'))} (embeddings, norms, ... unquantized)")
    lines.append(f"all tensors:      {_fmt_bytes(info.get('total_bytes'))}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    path = os.path.expanduser(args.checkpoint)
    if not os.path.exists(path):
        raise UsageError(f"CHECKPOINT {args.checkpoint!r}: no such folder")
    if not os.path.isdir(path):
        raise UsageError(f"CHECKPOINT {args.checkpoint!r}: expected a checkpoint folder, got a file")
    if os.path.isfile(os.path.join(path, "config.json")) and _quantization_method(path) is None:
        raise UsageError(f"CHECKPOINT {args.checkpoint!r}: not a GPTQ checkpoint (its config.json has no "
                         f"quantization_config and there is no quantize_config.json); a full-precision model "
                         f"is quantized with 'gptqkit quantize'")
    from gptqkit.checkpoint import checkpoint_info

    info = checkpoint_info(path)
    disk = _folder_size(path)
    if args.json:
        out = dict(info)
        out["disk_bytes"], out["disk_files"] = disk
        print(json.dumps(out, indent=2, default=str))
    else:
        print(_info_text(info, disk, per_expert=args.per_expert))
    return 0


# =========================================================================== entry point

def _expected_errors() -> tuple:
    kinds: List[type] = [ValueError, OSError, RuntimeError, MemoryError]
    try:
        from gptqkit import NotPositiveDefiniteError
        kinds.append(NotPositiveDefiniteError)
    except Exception:  # pragma: no cover
        pass
    return tuple(kinds)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


class _quiet_libraries:
    """With --quiet, silences transformers' and huggingface_hub's progress bars (restored afterwards)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.undo: List[Any] = []

    def __enter__(self):
        if not self.quiet:
            return self
        try:
            from transformers.utils import logging as tlog
            if tlog.is_progress_bar_enabled():
                tlog.disable_progress_bar()
                self.undo.append(tlog.enable_progress_bar)
        except Exception:  # pragma: no cover - library missing or API changed: keep the bars
            pass
        try:
            from huggingface_hub import utils as hub
            if not hub.are_progress_bars_disabled():
                hub.disable_progress_bars()
                self.undo.append(hub.enable_progress_bars)
        except Exception:  # pragma: no cover
            pass
        return self

    def __exit__(self, *exc):
        for fn in self.undo:
            fn()
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``gptqkit`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Never raises for expected errors: they print ``gptqkit: error: ...`` (one
    line) to stderr and give status 2 (bad usage) or 1 (the work failed).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else 2
        verbose = bool(getattr(args, "verbose", False))
        if getattr(args, "func", None) is None:
            parser.print_usage(sys.stderr)
            raise UsageError("choose a command: quantize, eval-ppl or info (see 'gptqkit --help')")
        with warnings.catch_warnings(), _quiet_libraries(bool(getattr(args, "quiet", False))):
            if not verbose:
                warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except CLIError as exc:
        if verbose and not isinstance(exc, UsageError):
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: a required library is missing ({_one_line(exc)}); install torch and transformers "
              f"(pip install torch transformers)", file=sys.stderr)
        return 1
    except _expected_errors() as exc:
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: keep the traceback
        traceback.print_exc()
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {_one_line(exc)} (this is a bug in gptqkit; "
              f"please report it with the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
