"""What the ``gptqkit`` commands share: errors, the argument parser class, data-file
lookup, argument types and small formatting helpers."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, List, Optional

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
    # python/gptqkit/cli/_common.py -> the repository (an editable install or a checkout)
    return Path(__file__).resolve().parents[3]


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "config.json")


def _check_tokenizer_arg(value: str) -> str:
    """``--tokenizer``: a local folder with tokenizer files (checked now), or a hub id."""
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise UsageError(f"--tokenizer {value!r}: the folder has no tokenizer files "
                             f"({', '.join(_TOKENIZER_FILES[:4])})")
        return path
    return _check_model_arg(value, "--tokenizer")


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

