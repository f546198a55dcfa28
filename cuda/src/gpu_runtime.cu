// Runtime plumbing of the GPU solver: persistent buffers,
// memory accounting, the device-side info block and the non-finite check.
#include <algorithm>
#include <atomic>

#include "gpu_solver_api.h"
#include "gpu_solver_internal.h"

namespace gptqkit::gpu {
namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

constexpr int kCheckThreads = 256;

// 16-bit values are checked on their bits (exponent all ones = inf / nan),
// as checks::all_finite does on the CPU.
template <unsigned kExpMask>
__global__ void finite_bits_kernel(const uint16_t* __restrict__ p, int64_t n, unsigned long long* first_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    if ((p[i] & kExpMask) == kExpMask) atomicMin(first_bad, static_cast<unsigned long long>(i));
}

template <typename T>
__global__ void finite_kernel(const T* __restrict__ p, int64_t n, unsigned long long* first_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    if (!isfinite(p[i])) atomicMin(first_bad, static_cast<unsigned long long>(i));
}

__global__ void info_reset_kernel(DeviceInfo* info) {
  info->bad_weight = ~0ull;
  info->bad_hessian = ~0ull;
  info->diag_sum = 0.0;
  info->dead_count = 0;
  info->chol_failed = 0;
  info->pad = 0;
  info->loss = 0.0;
}

}  // namespace

void note_alloc(int64_t bytes) {
  const int64_t now = g_current.fetch_add(bytes) + bytes;
  int64_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

void note_free(int64_t bytes) { g_current.fetch_sub(bytes); }

MemoryStats memory_stats() {
  MemoryStats s;
  s.current_bytes = g_current.load();
  s.peak_bytes = g_peak.load();
  return s;
}

void reset_peak_memory() { g_peak.store(g_current.load()); }

Status alloc_persistent(const Device& device, int64_t bytes, void** out) {
  *out = nullptr;
  if (bytes <= 0) return Status::InvalidArgument("alloc_persistent: size must be positive");
  DeviceGuard guard(device.index);
  if (!guard.status().ok()) return guard.status();
  gpuError_t e = gpuMalloc(out, static_cast<size_t>(bytes));
  if (e != gpuSuccess) {
    (void)gpuGetLastError();
    *out = nullptr;
    return Status::Internal("out of GPU memory allocating the Hessian (" + std::to_string(bytes) +
                            " bytes): " + gpuGetErrorString(e));
  }
  note_alloc(bytes);
  return Status::Ok();
}

void free_persistent(const Device& device, void* ptr, int64_t bytes) {
  if (!ptr) return;
  DeviceGuard guard(device.index);
  (void)gpuFree(ptr);
  note_free(bytes);
}

Status info_reset(DeviceInfo* info, gpuStream_t stream) {
  GPTQKIT_LAUNCH(1, 1, 0, stream, info_reset_kernel)(info);
  GPTQKIT_GPU_LAUNCHED("info_reset_kernel");
  return Status::Ok();
}

Status info_read(const DeviceInfo* info, DeviceInfo* host, gpuStream_t stream) {
  GPTQKIT_GPU_TRY(gpuMemcpyAsync(host, info, sizeof(DeviceInfo), gpuMemcpyDeviceToHost, stream), "reading results");
  GPTQKIT_GPU_TRY(gpuStreamSynchronize(stream), "waiting for the GPU");
  return Status::Ok();
}

Status launch_finite_check(const TensorView& t, unsigned long long* first_bad, gpuStream_t stream) {
  const int64_t n = t.numel();
  if (n == 0) return Status::Ok();
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, kCheckThreads), 4096));
  switch (t.dtype) {
    case DType::kFloat32:
      GPTQKIT_LAUNCH(blocks, kCheckThreads, 0, stream, finite_kernel<float>)(
          static_cast<const float*>(t.data), n, first_bad);
      break;
    case DType::kFloat64:
      GPTQKIT_LAUNCH(blocks, kCheckThreads, 0, stream, finite_kernel<double>)(
          static_cast<const double*>(t.data), n, first_bad);
      break;
    case DType::kFloat16:
      GPTQKIT_LAUNCH(blocks, kCheckThreads, 0, stream, finite_bits_kernel<0x7c00u>)(
          static_cast<const uint16_t*>(t.data), n, first_bad);
      break;
    case DType::kBFloat16:
      GPTQKIT_LAUNCH(blocks, kCheckThreads, 0, stream, finite_bits_kernel<0x7f80u>)(
          static_cast<const uint16_t*>(t.data), n, first_bad);
      break;
    default:
      return Status::Ok();
  }
  GPTQKIT_GPU_LAUNCHED("finite_kernel");
  return Status::Ok();
}

}  // namespace gptqkit::gpu
