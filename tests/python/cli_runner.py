"""The gptqkit command line run in-process, its output captured (for tests and module fixtures,
where pytest's capsys is not available)."""

from __future__ import annotations

import contextlib
import io


def run_cli(argv) -> tuple:
    """``(exit status, stdout, stderr)`` of ``gptqkit.cli.main(argv)``; arguments may be paths."""
    from gptqkit import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()
