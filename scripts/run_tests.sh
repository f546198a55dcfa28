#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs):
#   1. C++ core on its own: configure, build, ctest (needs a BLAS and GoogleTest,
#      e.g. apt install libopenblas-dev libgtest-dev)
#   2. install the library and build a consumer with find_package(gptqkit)
#   3. the Python suite (pytest) against the installed package
# Run from the repository root inside the environment scripts/setup.sh made.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)

echo "== C++ library + ctest"
cmake -S . -B build/ctest -G Ninja -DCMAKE_BUILD_TYPE=Release -DGPTQKIT_BUILD_TESTS=ON \
      -DCMAKE_INSTALL_PREFIX="$PWD/build/install" >/dev/null
cmake --build build/ctest -j "$jobs"
ctest --test-dir build/ctest --output-on-failure -j "$jobs"

echo "== find_package(gptqkit) consumer"
cmake --install build/ctest >/dev/null
cmake -S tests/consumer -B build/consumer -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build/install" >/dev/null
cmake --build build/consumer
./build/consumer/consumer

echo "== pytest"
python -m pytest "$@"
