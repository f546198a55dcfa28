#!/usr/bin/env bash
# Every GPU check and measurement of the GPU issues, on a machine with an
# NVIDIA GPU, in stages that each fit a 10-minute slot. Works offline: it
# builds gptqkit with GPTQKIT_WITH_CUDA=1 into the current Python without
# build isolation, so torch, pybind11, scikit-build-core, cmake, ninja and
# scipy-openblas32 must be importable there; wheels found in .whl/ are
# installed first, without the network (`prepare` downloads them, on a
# machine that has one).
#
#   bash scripts/gpu_checks.sh prepare                  # here: scipy-openblas32 wheel -> .whl/
#   PYTHON=python3.12 bash scripts/gpu_checks.sh prepare-wheel   # optional, here: the CUDA wheel
#   bash scripts/gpu_checks.sh build test               # on the GPU machine
#   bash scripts/gpu_checks.sh build sanitize
#   bash scripts/gpu_checks.sh build bench-solver bench-gemm
#   bash scripts/gpu_checks.sh build bench-generate solver-7b
#   bash scripts/gpu_checks.sh build quantize-7b
#
# Stages:
#   prepare         download the wheels the GPU image lacks into .whl/ (needs PyPI)
#   prepare-wheel   build gptqkit's CUDA wheel here into .whl/ (PYTHON=python3.12, GPTQKIT_CUDA_ARCH,
#                   default 90a); `build` installs it instead of compiling when it matches the sources
#   build           install .whl/*, build + install gptqkit for this GPU's
#                   architecture (GPTQKIT_CUDA_ARCH, default: asked from torch),
#                   skipped when the installed build matches the sources
#   test            the tensor-core conformance probe (tests/gpu_probe), then the
#                   GPU tests of the solver and the GEMM (fails if they skip)
#   sanitize        compute-sanitizer memcheck + racecheck (docs/gpu.md, docs/gpu_gemm.md)
#   bench-solver    benchmarks/bench_gpu_solver.py (issue 5's shapes)
#   solver-7b       bench_gpu_solver.py --model llama-7b (the solver over a 7B-shape model's layers)
#   quantize-7b     bench_gpu_quantize_model.py (GPTQForCausalLM.quantize of a random 7B-shape
#                   Llama on the GPU, end to end: forward passes, Hessians, solver, packing)
#   bench-gemm      benchmarks/bench_gpu_gemm.py (table, PNG plot, JSON)
#   bench-generate  benchmarks/bench_gpu_generate.py (decode tokens/s, batch 1 and 16; fp16, gptqkit, gptqkit fused)
#   bench-variants  bench_gpu_generate.py, fp16 and gptqkit fused at batch 1 and 16, under three routings:
#                   default, the skinny kernel, and skinny + in-kernel split-K sums + overlapped launches
#   bench-fused     bench_gpu_gemm.py on the fused q/k/v and gate/up shapes of the 7B model next to
#                   the separate ones (4096x4096, 4096x12288, 4096x11008, 4096x22016; M 1 to 64)
#   bench-eager     benchmarks/bench_op_dispatch.py (per-call cost of eager calls), then
#                   bench_gpu_generate.py --eager at batch 1 (no torch.compile / CUDA graphs)
#
# Each stage writes <stage>.log (and the benchmarks their tables / plots) to
# $GPTQKIT_GPU_OUT (default build/gpu-checks), prints its time, and the
# script goes on after a failed stage; it exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${GPTQKIT_GPU_OUT:-build/gpu-checks}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
failed=()

run_stage() {  # name, command...
  local name="$1"
  shift
  local t0=$SECONDS
  echo "== $name"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$out/$name.log"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

stage_prepare() {
  mkdir -p .whl
  local version
  version="$("$py" -c 'import importlib.metadata as m; print(m.version("scipy-openblas32"))' 2>/dev/null || echo 0.3.30.0.6)"
  # The GPU image's Python is 3.12 on manylinux x86-64; the wheel is pure
  # native code (py3-none), so one download serves any CPython.
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "scipy-openblas32==$version"
  ls -l .whl
}

sources_digest() {  # of everything the wheel is built from; git-independent (the GPU machine may get no .git)
  { cat CMakeLists.txt pyproject.toml
    find cpp cuda bindings third_party python -type f -not -path '*/__pycache__/*' -not -name '*.pyc' |
      LC_ALL=C sort | xargs cat; } 2>/dev/null | sha256sum | cut -c1-16
}

stage_prepare_wheel() {
  # Builds the CUDA wheel here, where compiling costs no GPU time, for the GPU
  # image's Python (3.12; PYTHON names an interpreter of that version with
  # scikit-build-core, pybind11, cmake, ninja and scipy-openblas32) and
  # GPTQKIT_CUDA_ARCH (default 90a, Hopper). cudart is linked statically and
  # torch not at all, so the wheel runs on any driver new enough for this nvcc.
  local arch="${GPTQKIT_CUDA_ARCH:-90a}"
  mkdir -p .whl && rm -f .whl/gptqkit-*.whl .whl/gptqkit-wheel.digest
  GPTQKIT_WITH_CUDA=1 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$arch ${CMAKE_ARGS:-}" \
    "$py" -m pip wheel -q --no-build-isolation --no-deps -w .whl . || return 1
  echo "$(sources_digest)-sm$arch" >.whl/gptqkit-wheel.digest
  ls -l .whl
}

stage_build() {
  local deps=()
  for w in .whl/*.whl; do [[ -e "$w" && "$(basename "$w")" != gptqkit-* ]] && deps+=("$w"); done
  if [ "${#deps[@]}" -gt 0 ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile "${deps[@]}" || return 1
  fi
  local arch="${GPTQKIT_CUDA_ARCH:-}"
  if [ -z "$arch" ]; then
    arch="$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')" || return 1
  fi
  # Hopper: the arch-specific target, which has the wgmma GEMM kernel.
  [ "$arch" = 90 ] && arch=90a
  local digest stamp="build/gpu-checks-build.stamp"
  digest="$(sources_digest)-sm$arch"
  if compgen -G ".whl/gptqkit-*.whl" >/dev/null && [ "$(cat .whl/gptqkit-wheel.digest 2>/dev/null)" = "$digest" ]; then
    echo "installing the prebuilt wheel (prepare-wheel) for sm_$arch: it matches the sources"
    "$py" -m pip install -q --no-index --no-deps --no-compile --force-reinstall .whl/gptqkit-*.whl || return 1
    mkdir -p build && echo "$digest" >"$stamp"
  elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] &&
     "$py" -c 'import gptqkit, sys; sys.exit(gptqkit.gpu_backend() != "cuda")' 2>/dev/null; then
    echo "gptqkit with CUDA for sm_$arch is installed and matches the sources"
  else
    GPTQKIT_WITH_CUDA=1 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$arch ${CMAKE_ARGS:-}" \
      CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$py" -m pip install --no-build-isolation --no-deps --no-index -q . || return 1
    mkdir -p build && echo "$digest" >"$stamp"
  fi
  "$py" - <<'EOF'
import torch, gptqkit
assert torch.cuda.is_available(), "torch sees no GPU"
assert gptqkit.gpu_backend() == "cuda", f"gptqkit has no CUDA backend (gpu_backend() = {gptqkit.gpu_backend()!r})"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(), "| gptqkit backend:", gptqkit.gpu_backend())
EOF
}

gpu_pytest() {  # pytest that fails when any GPU test was skipped
  "$py" -m pytest -q -p no:cacheprovider -rs "$@" | tee /tmp/gpu_checks_pytest.txt
  local rc=${PIPESTATUS[0]}
  if grep -q "needs a GPU" /tmp/gpu_checks_pytest.txt; then  # the skip reason of every GPU test
    echo "error: GPU tests were skipped although this machine should run them" >&2
    return 1
  fi
  return "$rc"
}

tensor_core_probe() {  # tests/gpu_probe, built with nvcc for this GPU (sm_90a on Hopper) and run
  local nvcc_bin cc flags=()
  nvcc_bin="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
  cc="$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')" || return 1
  if [ "$cc" = 90 ]; then
    flags=(-gencode=arch=compute_90a,code=sm_90a -DGPTQKIT_CUDA_HAS_SM90A=1)
  else
    flags=("-gencode=arch=compute_$cc,code=sm_$cc")
  fi
  mkdir -p build
  "$nvcc_bin" -std=c++17 --expt-relaxed-constexpr -Icuda/src -Icpp/src -Icpp/include "${flags[@]}" \
    tests/gpu_probe/tensor_core_probe.cu -o build/tensor_core_probe || return 1
  build/tensor_core_probe
}

stage_test() {
  local rc=0
  echo "-- tensor-core conformance probe: do ldmatrix / mma / wgmma match the layouts the kernels assume?"
  tensor_core_probe || rc=1
  gpu_pytest tests/python/test_gpu_solver.py tests/python/test_gpu_gemm.py --junitxml="$out/gpu-tests.xml" || rc=1
  return $rc
}

stage_sanitize() {
  local cs="compute-sanitizer"
  command -v "$cs" >/dev/null || cs="/usr/local/cuda/bin/compute-sanitizer"
  # The selections of docs/gpu.md and docs/gpu_gemm.md: every test but the
  # big option matrices, of which a few representative cases.
  local solver_sel='not test_gpu_matches_cpu or 4-128-True-False-False-0 or 3-32-False-True-True-8'
  local gemm_memcheck_sel='(gpu_matches and (1-128-False-4 or 16-32-True-4 or 255-128-False-4 or 1024-128-False-4 or 1024-128-True-4 or 33--1-False-3)) or (mma_split_k and (16-direct-float16 or 64-act_order-bfloat16)) or (wgmma_on and (65-direct-float16 or 255-act_order-bfloat16)) or (skinny_on and (1-128-False-float16 or 16-128-True-bfloat16)) or kernel_routing or workspace or backward or gpu_bad or gpu_dequantize'
  local gemm_racecheck_sel='(gpu_matches and (1-128-False-4 or 16-32-True-4 or 255-128-False-4)) or (mma_split_k and 64-act_order-bfloat16) or (wgmma_on and 65-direct-float16) or (skinny_on and 9-32-False-float16)'
  local rc=0
  # No --leak-check: in a Python + torch process what is still allocated at
  # exit is mostly the interpreter's and torch's (objects never collected);
  # the native solver's own buffers are counted exactly instead
  # (gpu_solver_memory, asserted back to zero in test_model_quantize_on_gpu_matches_cpu).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 "$cs" --tool memcheck --error-exitcode 1 \
    "$py" -m pytest -q -x -p no:cacheprovider tests/python/test_gpu_solver.py -k "$solver_sel" || rc=1
  timeout 150 "$cs" --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    "$py" -m pytest -q -x -p no:cacheprovider tests/python/test_gpu_solver.py -k "hessian or inverse or odd_shapes" || rc=1
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$cs" --tool memcheck --error-exitcode 1 \
    "$py" -m pytest -q -x -p no:cacheprovider tests/python/test_gpu_gemm.py -k "$gemm_memcheck_sel" || rc=1
  timeout 90 "$cs" --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    "$py" -m pytest -q -x -p no:cacheprovider tests/python/test_gpu_gemm.py -k "$gemm_racecheck_sel" || rc=1
  # CUDA-graph capture needs torch's caching allocator (a cudaMalloc inside a
  # capture is refused), so the graph tests run under memcheck with it on.
  # (The overlapped-launch chain test captures a graph too.)
  timeout 150 "$cs" --tool memcheck --error-exitcode 1 \
    "$py" -m pytest -q -x -p no:cacheprovider tests/python/test_gpu_gemm.py -k "graph or overlapped_launches" || rc=1
  return $rc
}

stage_bench_solver() { "$py" benchmarks/bench_gpu_solver.py; }
stage_solver_7b() { "$py" benchmarks/bench_gpu_solver.py --model llama-7b --skip-torch; }
stage_bench_gemm() {
  # GPTQKIT_BENCH_GEMM_ARGS: extra options (e.g. --tune)
  # shellcheck disable=SC2086
  "$py" benchmarks/bench_gpu_gemm.py --out "$out/gpu_gemm.md" --plot "$out/gpu_gemm.png" --json "$out/gpu_gemm.json" \
    ${GPTQKIT_BENCH_GEMM_ARGS:-}
}
stage_bench_generate() { "$py" benchmarks/bench_gpu_generate.py; }
stage_bench_variants() {
  "$py" benchmarks/bench_gpu_generate.py --kinds fp16 gptqkit-fused --repeats 2 --new-tokens 96 --routing default \
    GPTQKIT_GPU_SKINNY_MAX_ROWS=16 \
    GPTQKIT_GPU_SKINNY_MAX_ROWS=16,GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS=16,GPTQKIT_GPU_PDL=1
}
stage_bench_fused() {
  "$py" benchmarks/bench_gpu_gemm.py --shapes 4096x4096 4096x12288 4096x11008 4096x22016 --ms 1 4 16 64 \
    --out "$out/gpu_gemm_fused.md" --plot "$out/gpu_gemm_fused.png" --json "$out/gpu_gemm_fused.json"
}
stage_bench_eager() {
  "$py" benchmarks/bench_op_dispatch.py && "$py" benchmarks/bench_gpu_generate.py --eager --batches 1 --repeats 2
}
stage_quantize_7b() { "$py" benchmarks/bench_gpu_quantize_model.py; }

[ $# -gt 0 ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print } /^set /{ exit }' "$0"; exit 2; }
for stage in "$@"; do
  case "$stage" in
    prepare) run_stage prepare stage_prepare ;;
    prepare-wheel) run_stage prepare-wheel stage_prepare_wheel ;;
    build) run_stage build stage_build ;;
    test) run_stage test stage_test ;;
    sanitize) run_stage sanitize stage_sanitize ;;
    bench-solver) run_stage bench-solver stage_bench_solver ;;
    solver-7b) run_stage solver-7b stage_solver_7b ;;
    bench-gemm) run_stage bench-gemm stage_bench_gemm ;;
    bench-generate) run_stage bench-generate stage_bench_generate ;;
    bench-variants) run_stage bench-variants stage_bench_variants ;;
    bench-fused) run_stage bench-fused stage_bench_fused ;;
    bench-eager) run_stage bench-eager stage_bench_eager ;;
    quantize-7b) run_stage quantize-7b stage_quantize_7b ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
  if [ "$stage" = build ] && [ "${#failed[@]}" -gt 0 ]; then break; fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed"
