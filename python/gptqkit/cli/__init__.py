"""The ``gptqkit`` command line: ``quantize``, ``eval-ppl``, ``info`` and ``generate``, one module each.

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
import sys
import traceback
import warnings
from typing import Any, List, Optional, Sequence

from gptqkit.cli import evaluate, generate, info, quantize
from gptqkit.cli._common import (
    PROG, CLIError, UsageError, _HelpFormatter, _Parser, _one_line, data_search_paths, find_data_file,
)

__all__ = ["main", "build_parser", "find_data_file", "data_search_paths", "CLIError", "UsageError"]

COMMANDS = (quantize, evaluate, info, generate)

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
  generate   continue a prompt with a checkpoint (or the original model), tokens/s

typical session:
  gptqkit quantize HuggingFaceTB/SmolLM2-135M out/smollm2-gptq --bits 4 --group-size 128
  gptqkit info out/smollm2-gptq
  gptqkit eval-ppl out/smollm2-gptq --compare HuggingFaceTB/SmolLM2-135M
  gptqkit generate out/smollm2-gptq "The capital of France is"

Run 'gptqkit COMMAND --help' for each command's options. Exit status: 0 ok,
2 bad usage (invalid option, missing file or folder), 1 the work failed.
Expected errors are one line; --verbose shows the traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The ``gptqkit`` argument parser (sub-commands quantize, eval-ppl, info, generate)."""
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
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


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
            args, extras = parser.parse_known_args(argv)
            adopt = getattr(args, "adopt_extras", None)
            if extras and not (adopt is not None and adopt(args, extras)):
                parser.error(f"unrecognized arguments: {' '.join(extras)}")
        except SystemExit as exc:  # --help, --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else 2
        verbose = bool(getattr(args, "verbose", False))
        if getattr(args, "func", None) is None:
            parser.print_usage(sys.stderr)
            raise UsageError("choose a command: quantize, eval-ppl, info or generate (see 'gptqkit --help')")
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
