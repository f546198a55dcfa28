#!/usr/bin/env bash
# Compile check of the GPU backend (no GPU needed): every source in cuda/src
# must compile with warnings as errors
#   1. as CUDA with nvcc for sm_75, sm_80, sm_90a and compute_90 PTX (the
#      default targets; the library target, linked), and the tensor-core
#      conformance probe (tests/gpu_probe) for sm_80 + sm_90a;
#   2. as HIP with clang for gfx90a (the library target, linked) and gfx1100
#      (device code to ISA assembly, see below).
# Build trees: build/gpu-check-cuda, build/gpu-check-hip. Fails on any error.
#
#   bash scripts/check_gpu_build.sh            # both
#   bash scripts/check_gpu_build.sh cuda|hip   # one
#
# Needs: nvcc (CUDA >= 12) for the CUDA part; Debian's `hipcc` package (HIP
# 5.2, clang 15; HIP_PLATFORM=amd) for the HIP part. A part whose compiler is
# missing fails (set GPTQKIT_CHECK_SKIP_MISSING=1 to skip it instead).
#
# gfx1100 on Debian: HIP 5.2's device libraries have no gfx1100 ISA file
# (oclc_isa_version_1100.bc), so a gfx1100 device binary cannot be linked
# there. The device code is still compiled for gfx1100 in full (front end,
# wave32 template instances, AMDGPU back end down to assembly) with
# -nogpulib --cuda-device-only -S, which is what catches gfx1100 build errors.
# ROCm >= 5.5 users build gfx1100 normally through CMake.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
jobs="${GPTQKIT_CHECK_JOBS:-2}"
skip_missing="${GPTQKIT_CHECK_SKIP_MISSING:-0}"
nice_cmd=(nice -n 19)
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

missing() {
  if [ "$skip_missing" = 1 ]; then echo "== skipped: $1"; return 0; fi
  echo "error: $1" >&2
  exit 1
}

check_cuda() {
  local nvcc_bin
  nvcc_bin="$(command -v nvcc || true)"
  [ -n "$nvcc_bin" ] || { missing "nvcc not found (CUDA part)"; return 0; }
  echo "== CUDA: sm_75 + sm_80 + sm_90a (+ compute_90 PTX), the default targets, with $nvcc_bin"
  local t0=$SECONDS
  "${nice_cmd[@]}" cmake -S . -B build/gpu-check-cuda "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DGPTQKIT_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DCMAKE_CUDA_ARCHITECTURES="75-real;80-real;90a-real;90-virtual" \
    -DGPTQKIT_GPU_WERROR=ON -DGPTQKIT_BUILD_TESTS=OFF >/dev/null
  "${nice_cmd[@]}" cmake --build build/gpu-check-cuda --target gptqkit -j "$jobs"
  echo "== CUDA: the tensor-core conformance probe (tests/gpu_probe), sm_80 + sm_90a"
  "${nice_cmd[@]}" "$nvcc_bin" -std=c++17 --expt-relaxed-constexpr -Werror=all-warnings -Xcompiler=-Wall \
    -DGPTQKIT_CUDA_HAS_SM90A=1 -Icuda/src -Icpp/src -Icpp/include -gencode=arch=compute_80,code=sm_80 \
    -gencode=arch=compute_90a,code=sm_90a -c tests/gpu_probe/tensor_core_probe.cu \
    -o build/gpu-check-cuda/tensor_core_probe.o
  echo "== CUDA: ok ($((SECONDS - t0)) s)"
}

check_hip() {
  local clang_bin="${GPTQKIT_HIP_CLANG:-}"
  if [ -z "$clang_bin" ]; then
    for c in clang++-15 clang++ /opt/rocm/llvm/bin/clang++; do
      if command -v "$c" >/dev/null 2>&1; then clang_bin="$(command -v "$c")"; break; fi
    done
  fi
  command -v hipcc >/dev/null 2>&1 && [ -n "$clang_bin" ] || { missing "hipcc / clang not found (HIP part)"; return 0; }
  # Debian installs HIP under /usr and its device libraries here; ROCm under /opt/rocm.
  local rocm_path="${ROCM_PATH:-/usr}"
  local devlib="${GPTQKIT_HIP_DEVICE_LIBS:-}"
  if [ -z "$devlib" ]; then
    for d in /usr/lib/x86_64-linux-gnu/amdgcn/bitcode "$rocm_path/amdgcn/bitcode" "$rocm_path/lib/llvm/lib/clang/*/lib/amdgcn/bitcode"; do
      if [ -f "$d/ocml.bc" ]; then devlib="$d"; break; fi
    done
  fi
  local hip_flags="--rocm-path=$rocm_path"
  [ -n "$devlib" ] && hip_flags="$hip_flags --hip-device-lib-path=$devlib"
  echo "== HIP: gfx90a with $clang_bin (rocm path $rocm_path, device libs ${devlib:-default})"
  local t0=$SECONDS
  # CMAKE_POLICY_VERSION_MINIMUM: Debian's hip-config.cmake asks for a CMake
  # policy level that CMake 4 no longer provides.
  HIP_PLATFORM=amd "${nice_cmd[@]}" cmake -S . -B build/gpu-check-hip "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DGPTQKIT_WITH_HIP=ON -DCMAKE_HIP_COMPILER="$clang_bin" -DCMAKE_HIP_PLATFORM=amd \
    -DCMAKE_HIP_FLAGS="$hip_flags" -DCMAKE_HIP_ARCHITECTURES=gfx90a -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
    -DGPTQKIT_GPU_WERROR=ON -DGPTQKIT_BUILD_TESTS=OFF >/dev/null
  HIP_PLATFORM=amd "${nice_cmd[@]}" cmake --build build/gpu-check-hip --target gptqkit -j "$jobs"
  echo "== HIP: gfx1100 device code (wave32), to assembly"
  mkdir -p build/gpu-check-hip/gfx1100
  local pids=() srcs=() src
  for src in cuda/src/*.cu; do
    "${nice_cmd[@]}" "$clang_bin" -x hip -std=c++17 -O3 -Wall -Wno-unused-parameter -Werror \
      --rocm-path="$rocm_path" --offload-arch=gfx1100 -nogpulib --cuda-device-only -S \
      -D__HIP_PLATFORM_AMD__=1 -DGPTQKIT_GPU_HIP=1 -Icuda/src -Icpp/include -Icpp/src \
      -Ibuild/gpu-check-hip/include "$src" -o "build/gpu-check-hip/gfx1100/$(basename "$src" .cu).s" &
    pids+=($!)
    srcs+=("$src")
    if [ "${#pids[@]}" -ge "$jobs" ]; then
      wait "${pids[0]}" || { echo "error: gfx1100 compile of ${srcs[0]} failed" >&2; exit 1; }
      pids=("${pids[@]:1}")
      srcs=("${srcs[@]:1}")
    fi
  done
  local i
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "error: gfx1100 compile of ${srcs[$i]} failed" >&2; exit 1; }
  done
  echo "== HIP: ok ($((SECONDS - t0)) s)"
}

start=$SECONDS
case "$what" in
  cuda) check_cuda ;;
  hip) check_hip ;;
  all) check_cuda; check_hip ;;
  *) echo "usage: $0 [cuda|hip|all]" >&2; exit 2 ;;
esac
echo "GPU compile check passed in $((SECONDS - start)) s"
