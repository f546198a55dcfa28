#!/usr/bin/env bash
# Sets up a fresh machine for gptqkit: a virtual environment in .venv with
# PyTorch (CPU), transformers and gptqkit itself (built from this checkout by
# pip: scikit-build-core + CMake; its BLAS comes from the scipy-openblas32
# wheel, so no system packages are needed for the Python package), and
# .venv-interop with the third-party GPTQ loader the interoperability tests use.
# With root (or sudo) it also installs the system packages the C++ test suite
# uses (OpenBLAS, GoogleTest); without, it says so and goes on.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends libopenblas-dev libgtest-dev g++ >/dev/null
  else
    echo "setup: no root; skipping apt packages (libopenblas-dev libgtest-dev are needed only for the C++ tests)"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch pinned: this exact version resolves to a CPU wheel on the CI machines;
# any torch >= 2.1 works with gptqkit.
python -m pip install -q "torch==${GPTQKIT_TORCH_VERSION:-2.13.0}"
python -m pip install -q -r requirements-dev.txt
python -m pip install -q .
python -c "import gptqkit; print('gptqkit', gptqkit.__version__, 'ready (BLAS:', gptqkit._C.blas + ')')"

# The third-party GPTQ loader (transformers -> optimum -> GPTQModel) for
# tests/python/test_interop.py, in its own environment: .venv-interop sees
# .venv's packages through a .pth file and adds only requirements-interop.txt.
python -m venv .venv-interop  # on .venv's base interpreter
venv_site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
interop_site="$(.venv-interop/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$venv_site" >"$interop_site/gptqkit-dev-venv.pth"
.venv-interop/bin/python -m pip install -q --no-deps -r requirements-interop.txt
