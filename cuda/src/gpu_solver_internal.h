// Shared pieces of the GPU solver sources (gpu_hessian.cu, gpu_cholesky.cu,
// gpu_solver.cu, gpu_runtime.cu): error plumbing, device selection,
// stream-ordered scratch memory and the quantization grid as device code.
#pragma once

#include <cstdint>
#include <string>

#ifndef GPTQKIT_GPU_EMULATION  // tests/gpu_emulation/emu_compat.h stands in for it on the CPU
#include "gpu_compat.h"
#endif
#include "gptqkit/solver.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"
#include "gpu_util.h"

namespace gptqkit::gpu {

inline Status runtime_error(gpuError_t e, const char* what) {
  return Status::Internal(std::string("GPU error in ") + what + ": " + gpuGetErrorString(e));
}

#define GPTQKIT_GPU_TRY(expr, what)                                            \
  do {                                                                         \
    gpuError_t _gptqkit_e = (expr);                                            \
    if (_gptqkit_e != gpuSuccess) return ::gptqkit::gpu::runtime_error(_gptqkit_e, what); \
  } while (0)

// Right after a kernel launch: a bad configuration surfaces here, not later.
#define GPTQKIT_GPU_LAUNCHED(what) GPTQKIT_GPU_TRY(gpuGetLastError(), what)

void note_alloc(int64_t bytes);
void note_free(int64_t bytes);

// Stream-ordered scratch: allocated and freed on the caller's stream, so no
// allocation or free synchronises the device, and an early return (error)
// frees what was allocated after the work already queued.
class Scratch {
 public:
  explicit Scratch(gpuStream_t stream) : stream_(stream) {}
  ~Scratch() { release(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <typename T>
  Status alloc(T** out, int64_t count, const char* what) {
    *out = nullptr;
    const size_t bytes = static_cast<size_t>(count > 0 ? count : 1) * sizeof(T);
    void* p = nullptr;
    gpuError_t e = gpuMallocAsync(&p, bytes, stream_);
    if (e != gpuSuccess) {
      (void)gpuGetLastError();  // clear the sticky-free error state of the runtime
      return Status::Internal(std::string("out of GPU memory allocating ") + what + " (" +
                              std::to_string(bytes) + " bytes): " + gpuGetErrorString(e));
    }
    if (count_ == kMax) {
      (void)gpuFreeAsync(p, stream_);
      return Status::Internal("too many scratch buffers");
    }
    ptrs_[count_] = p;
    bytes_[count_] = static_cast<int64_t>(bytes);
    ++count_;
    note_alloc(static_cast<int64_t>(bytes));
    *out = static_cast<T*>(p);
    return Status::Ok();
  }

  // Frees one buffer early (peak memory): must be the most recent live one
  // or any; order does not matter to the stream-ordered allocator.
  void free(void* p) {
    for (int i = 0; i < count_; ++i)
      if (ptrs_[i] == p) {
        (void)gpuFreeAsync(p, stream_);
        note_free(bytes_[i]);
        ptrs_[i] = nullptr;
        bytes_[i] = 0;
      }
  }

  void release() {
    for (int i = 0; i < count_; ++i)
      if (ptrs_[i]) {
        (void)gpuFreeAsync(ptrs_[i], stream_);
        note_free(bytes_[i]);
        ptrs_[i] = nullptr;
      }
    count_ = 0;
  }

 private:
  static constexpr int kMax = 24;
  gpuStream_t stream_;
  void* ptrs_[kMax] = {};
  int64_t bytes_[kMax] = {};
  int count_ = 0;
};

// Results of checks done on the device, read back with one copy at the few
// points where the host must decide (validation, each Cholesky attempt, the
// final loss): those are the only host synchronisations of the solver.
struct DeviceInfo {
  unsigned long long bad_weight;   // first non-finite flat index, ~0 if none
  unsigned long long bad_hessian;
  double diag_sum;                 // sum of diag(H), dead inputs counted as 1
  long long dead_count;            // inputs with H_ii == 0
  int chol_failed;                 // 0, or the order of the failing leading minor
  int pad;
  double loss;                     // sum over rows of the GPTQ loss (before / 2)
};

// Initialises info on the device (bad_* = ~0, the rest 0).
Status info_reset(DeviceInfo* info, gpuStream_t stream);
Status info_read(const DeviceInfo* info, DeviceInfo* host, gpuStream_t stream);

// Damped H^-1 factor on the device (gpu_cholesky.cu). hessian: [K, K] fp32 or
// fp64 (row-major) on the device; perm / dead may be null (identity / none).
// mean_diag: mean of diag(H) with dead inputs as 1, already checked > 0.
// Writes U (fp32 [K, K], upper, H^-1 = U^T U) in processing order, with the
// CPU path's retry policy and messages; stats gets the damping used.
Status factor_inverse_upper(const void* hessian, bool hessian_fp64, int64_t k, const int64_t* perm,
                            const uint8_t* dead, double mean_diag, double damp_percent, int max_retries,
                            float* upper, QuantizeStats* stats, DeviceInfo* info, gpuStream_t stream);

// Non-finite check of a device array (sets *first_bad to the least bad flat index).
Status launch_finite_check(const TensorView& t, unsigned long long* first_bad, gpuStream_t stream);

// ---- the quantization grid of cpp/src/quantizer.cpp, on the device --------
// Same operations in the same order (no fused multiply-add where the CPU
// rounds twice), so a grid and a code agree bit for bit with the CPU path
// given the same input values.

struct GpuGrid {
  float scale;
  int32_t zero;
};

struct GpuGridSearch {
  int steps;
  float min_ratio;
  float norm;
  bool fp16_scales;
  int min_zero;
};

__device__ __forceinline__ float gpu_round_scale_fp16(float scale) {
  const float rounded = __half2float(__float2half_rn(scale));
  return rounded > 0.0f ? rounded : 5.9604644775390625e-08f;  // smallest positive float16
}

__device__ __forceinline__ int32_t gpu_quantize_code(float x, const GpuGrid& g, int maxq) {
  float q = rintf(x / g.scale) + static_cast<float>(g.zero);
  q = q < 0.0f ? 0.0f : (q > static_cast<float>(maxq) ? static_cast<float>(maxq) : q);
  return static_cast<int32_t>(q);
}

// __fmul_rn: the product is rounded on its own, as on the CPU; a plain `*`
// would be fused by the compiler into the subtraction that usually follows
// (x - q), which rounds once and changes errors and codes.
__device__ __forceinline__ float gpu_dequantize_code(int32_t code, const GpuGrid& g) {
  return __fmul_rn(g.scale, static_cast<float>(code - g.zero));
}

__device__ __forceinline__ GpuGrid gpu_grid_for_range(float xmin, float xmax, int maxq, bool sym, bool fp16_scales,
                                                      int min_zero) {
  GpuGrid g;
  g.scale = (xmax - xmin) / static_cast<float>(maxq);
  if (fp16_scales) g.scale = gpu_round_scale_fp16(g.scale);
  g.zero = sym ? (maxq + 1) / 2 : static_cast<int32_t>(rintf(-xmin / g.scale));
  if (!sym && g.zero < min_zero) {
    g.zero = min_zero;
    g.scale = fmaxf(xmax / static_cast<float>(maxq - min_zero), -xmin / static_cast<float>(min_zero));
    if (fp16_scales) g.scale = gpu_round_scale_fp16(g.scale);
  }
  g.zero = g.zero < 0 ? 0 : (g.zero > maxq ? maxq : g.zero);
  return g;
}

// Weighted grid error of one warp's segment; every lane gets the same sum
// (the xor butterfly adds the same pairs on every lane).
template <typename Load>
__device__ double gpu_warp_grid_error(Load load, const float* weight, int64_t count, int maxq, const GpuGrid& g,
                                      float norm) {
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  double err = 0.0;
  for (int64_t j = lane; j < count; j += kWarpSize) {
    const float x = load(j);
    const float d = fabsf(gpu_dequantize_code(gpu_quantize_code(x, g, maxq), g) - x);
    const float e = norm == 2.0f ? __fmul_rn(d, d) : powf(d, norm);
    err = weight ? __dadd_rn(err, __dmul_rn(static_cast<double>(weight[j]), static_cast<double>(e)))
                 : __dadd_rn(err, static_cast<double>(e));
  }
  return gpu_warp_sum(err);
}

// search_grid of quantizer.cpp for one (row, group) segment, computed by a
// whole warp (every lane gets the same grid). load(j) returns element j.
template <typename Load>
__device__ GpuGrid gpu_warp_search_grid(Load load, const float* weight, int64_t count, int maxq, bool sym,
                                        const GpuGridSearch& s) {
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  float xmin = 0.0f, xmax = 0.0f;
  for (int64_t j = lane; j < count; j += kWarpSize) {
    const float x = load(j);
    xmin = fminf(xmin, x);
    xmax = fmaxf(xmax, x);
  }
  xmin = -gpu_warp_max(-xmin);
  xmax = gpu_warp_max(xmax);
  if (sym) {
    xmax = fmaxf(-xmin, xmax);
    if (xmin < 0.0f) xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  GpuGrid best = gpu_grid_for_range(xmin, xmax, maxq, sym, s.fp16_scales, s.min_zero);
  if (s.steps <= 0) return best;
  double best_err = gpu_warp_grid_error(load, weight, count, maxq, best, s.norm);
  for (int i = 1; i <= s.steps; ++i) {
    const float p = 1.0f - __fdiv_rn(__fmul_rn(1.0f - s.min_ratio, static_cast<float>(i)), static_cast<float>(s.steps));
    // Rounded products (no fusing into xmax - xmin), as the CPU computes them.
    const GpuGrid g =
        gpu_grid_for_range(__fmul_rn(p, xmin), __fmul_rn(p, xmax), maxq, sym, s.fp16_scales, s.min_zero);
    const double err = gpu_warp_grid_error(load, weight, count, maxq, g, s.norm);
    if (err < best_err) {
      best_err = err;
      best = g;
    }
  }
  return best;
}

}  // namespace gptqkit::gpu
