// Small helpers shared by the solver (gpu_*.cu) and the GEMM (gemm_*.cu)
// sources. One definition each: the library links both halves, and two
// different inline classes of one name in one namespace (as DeviceGuard
// once was) are an ODR violation the linker resolves by picking either body.
#pragma once

#include <cstdint>
#include <string>

#ifndef GPTQKIT_GPU_EMULATION  // tests/gpu_emulation/emu_compat.h stands in for it on the CPU
#include "gpu_compat.h"
#endif
#include "gptqkit/status.h"

namespace gptqkit::gpu {

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Marks the parameters of a kernel whose body is compiled out for some
// targets (tensor-core kernels on sm_75 / ROCm) as used.
template <typename... Args>
__host__ __device__ inline void unused_args(const Args&...) {}

// Makes `index` the calling thread's current device and restores the
// previous one on exit, so callers (torch) keep their device; streams belong
// to a device, so launches happen inside one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    status_ = gpuGetDevice(&previous_);
    if (status_ == gpuSuccess && previous_ != index) {
      status_ = gpuSetDevice(index);
      changed_ = status_ == gpuSuccess;
    }
  }
  ~DeviceGuard() {
    if (changed_) (void)gpuSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  Status status() const {
    return status_ == gpuSuccess
               ? Status::Ok()
               : Status::Internal(std::string("GPU error in selecting the device: ") + gpuGetErrorString(status_));
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
  gpuError_t status_ = gpuSuccess;
};

}  // namespace gptqkit::gpu
