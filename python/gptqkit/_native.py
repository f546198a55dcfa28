"""Loads the native core ``gptqkit._C``.

Wheels link the core against the OpenBLAS of the ``scipy-openblas32`` package
by soname only; importing that package first loads the library into the
process so the extension's dependency resolves to it.
"""

try:  # pragma: no cover - absent when the core was built against a system BLAS
    import scipy_openblas32  # noqa: F401
except ImportError:
    pass

from gptqkit import _C  # noqa: E402

NotPositiveDefiniteError = _C.NotPositiveDefiniteError

__all__ = ["_C", "NotPositiveDefiniteError"]
