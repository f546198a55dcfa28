// GPTQ Hessian accumulation on the GPU: H <- beta H + alpha X^T X, one
// triangle (SYRK), the running formulation of HessianAccumulator::add_batch.
//
// Two kernels, both computing the upper triangle tile by tile (a block owns
// one output tile with ti <= tj and walks over all rows of the batch, so H is
// read and written once per batch):
//  * tensor cores (NVIDIA sm_80+, 16-bit input): mma.sync m16n8k16 with fp16
//    or bf16 operands and fp32 accumulation. Products of two 16-bit values
//    are exact in fp32, so the only difference from converting to fp32 first
//    is the order of the fp32 sums (tiles of 16 rows summed inside the MMA);
//  * portable SIMT fp32 FMA for fp32 input, for HIP and for pre-sm_80 code.
#include <algorithm>
#include <cmath>

#include "checks.h"
#include "gpu_solver_api.h"
#include "gpu_solver_internal.h"
#include "hessian_tc_kernel.cuh"

namespace gptqkit::gpu {
namespace {

int64_t round_up16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// The accumulator's device state: H (fp32 [K, K]) then the first non-finite
// input index (~0 while all inputs were finite).
unsigned long long* bad_flag_of(void* state, int64_t k) {
  return reinterpret_cast<unsigned long long*>(static_cast<char*>(state) + round_up16(k * k * 4));
}

// ---- portable SIMT path -------------------------------------------------------
constexpr int kSimtTile = 64;     // output tile edge
constexpr int kSimtRows = 16;     // rows of X per shared-memory stage
constexpr int kSimtThreads = 256; // 16 x 16 threads, 4 x 4 outputs each

template <typename T>
__global__ __launch_bounds__(kSimtThreads) void syrk_simt_kernel(const T* __restrict__ x, int64_t rows, int k,
                                                                 float alpha, float beta, float* __restrict__ h) {
  __shared__ float a_s[kSimtRows][kSimtTile];
  __shared__ float b_s[kSimtRows][kSimtTile];
  int ti, tj;
  upper_tile(blockIdx.x, &ti, &tj);
  const int i0 = ti * kSimtTile, j0 = tj * kSimtTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = 0.0f;

  for (int64_t r0 = 0; r0 < rows; r0 += kSimtRows) {
    for (int e = threadIdx.x; e < kSimtRows * kSimtTile; e += kSimtThreads) {
      const int rr = e / kSimtTile, cc = e % kSimtTile;
      const int64_t r = r0 + rr;
      float av = 0.0f, bv = 0.0f;
      if (r < rows) {
        const T* row = x + r * k;
        if (i0 + cc < k) av = gpu_to_float(row[i0 + cc]);
        if (j0 + cc < k) bv = gpu_to_float(row[j0 + cc]);
      }
      a_s[rr][cc] = av;
      b_s[rr][cc] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kSimtRows; ++t) {
      float a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = a_s[t][ty + 16 * u];
        b[u] = b_s[t][tx + 16 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += a[u] * b[v];
    }
    __syncthreads();  // the next stage overwrites a_s / b_s
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = i0 + ty + 16 * u, j = j0 + tx + 16 * v;
      if (i < k && j < k && i <= j) store_h(h, static_cast<int64_t>(i) * k + j, acc[u][v], alpha, beta);
    }
}

// ---- NVIDIA tensor-core path for unaligned rows --------------------------------
// (K not a multiple of 8 or X not 16-byte aligned: no 16-byte copies; the
// aligned case takes syrk_tc_kernel of hessian_tc_kernel.cuh.)
#if !GPTQKIT_GPU_IS_HIP
constexpr int kMmaTile = 128;     // output tile edge
constexpr int kMmaThreads = 256;  // 8 warps: 2 (i) x 4 (j), each 64 x 32 outputs

// X^T tiles in shared memory, feature-major: s[c][r] = X[r0 + r, c0 + c], so
// the (k, k+1) pairs an mma fragment needs are one aligned 32-bit word.
template <bool kBf16>
__global__ __launch_bounds__(kMmaThreads) void syrk_mma_kernel(const uint16_t* __restrict__ x, int64_t rows, int k,
                                                               float alpha, float beta, float* __restrict__ h) {
#if GPTQKIT_NV_TENSOR_CORES
  constexpr int kMmaRows = 32;  // rows of X per stage (two k16 steps)
  constexpr int kMmaPad = 8;    // row stride 40 halves = 20 words: fragment loads hit 32 distinct banks
  constexpr int kMmaStride = kMmaRows + kMmaPad;
  __shared__ __align__(16) uint16_t a_s[kMmaTile][kMmaStride];
  __shared__ __align__(16) uint16_t b_s[kMmaTile][kMmaStride];
  int ti, tj;
  upper_tile(blockIdx.x, &ti, &tj);
  const int i0 = ti * kMmaTile, j0 = tj * kMmaTile;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;
  const int g = lane >> 2, tq = lane & 3;
  float acc[4][4][4];
  zero_warp_tile(acc);

  for (int64_t r0 = 0; r0 < rows; r0 += kMmaRows) {
    // Coalesced along the feature index; out-of-range elements are zeros
    // (they add nothing to the sums).
    for (int e = threadIdx.x; e < kMmaRows * kMmaTile; e += kMmaThreads) {
      const int rr = e / kMmaTile, cc = e % kMmaTile;
      const int64_t r = r0 + rr;
      uint16_t av = 0, bv = 0;
      if (r < rows) {
        const uint16_t* row = x + r * k;
        if (i0 + cc < k) av = row[i0 + cc];
        if (j0 + cc < k) bv = row[j0 + cc];
      }
      a_s[cc][rr] = av;
      b_s[cc][rr] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kMmaRows; ks += 16) {
      uint32_t bf[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const uint16_t* bp = &b_s[wn + nt * 8 + g][ks + tq * 2];
        bf[nt][0] = *reinterpret_cast<const uint32_t*>(bp);
        bf[nt][1] = *reinterpret_cast<const uint32_t*>(bp + 8);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const uint16_t* ap = &a_s[wm + mt * 16 + g][ks + tq * 2];
        const uint32_t afrag[4] = {*reinterpret_cast<const uint32_t*>(ap),
                                   *reinterpret_cast<const uint32_t*>(ap + 8 * kMmaStride),
                                   *reinterpret_cast<const uint32_t*>(ap + 8),
                                   *reinterpret_cast<const uint32_t*>(ap + 8 * kMmaStride + 8)};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<kBf16>(acc[mt][nt], afrag, bf[nt][0], bf[nt][1]);
      }
    }
    __syncthreads();
  }
  store_warp_tile(h, acc, i0 + wm, j0 + wn, lane, k, alpha, beta);
#endif  // GPTQKIT_NV_TENSOR_CORES
}

// Whether the binary the runtime picked for this device has the mma code
// (it is compiled out of device code built for architectures below sm_80).
template <bool kBf16>
bool mma_available() {
  gpuFuncAttributes attr;
  if (gpuFuncGetAttributes(&attr, syrk_mma_kernel<kBf16>) != gpuSuccess) {
    (void)gpuGetLastError();
    return false;
  }
  return attr.binaryVersion >= 80;
}
#endif  // !GPTQKIT_GPU_IS_HIP

template <typename Out>
__global__ void mirror_kernel(const float* __restrict__ h, int64_t k, Out* __restrict__ out) {
  const int64_t total = k * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / k, c = idx % k;
    out[idx] = h ? static_cast<Out>(r <= c ? h[r * k + c] : h[c * k + r]) : Out(0);
  }
}

Status check_view_on(const TensorView& t, const char* name, const Device& device) {
  if (t.ndim < 0 || t.ndim > kMaxTensorDims)
    return Status::InvalidArgument(std::string(name) + ": unsupported rank " + std::to_string(t.ndim));
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] < 0)
      return Status::InvalidArgument(std::string(name) + ": negative extent in shape " + shape_string(t));
  if (t.device.type == DeviceType::kCPU || t.device.index != device.index)
    return Status::InvalidArgument(std::string(name) + ": expected a tensor on the same GPU as the others");
  if (t.numel() > 0 && t.data == nullptr) return Status::InvalidArgument(std::string(name) + ": null data pointer");
  if (!t.is_contiguous())
    return Status::InvalidArgument(std::string(name) + ": expected a C-contiguous (row-major) array, got shape " +
                                   shape_string(t) + " with non-contiguous strides; call .contiguous() first");
  return Status::Ok();
}

}  // namespace

int64_t hessian_state_bytes(int64_t k) { return round_up16(k * k * 4) + 16; }

Status hessian_add_batch(const TensorView& x, void* state, int64_t k, double alpha, double beta, void* stream_ptr) {
  GPTQKIT_RETURN_IF_ERROR(check_view_on(x, "x", x.device));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(x, "x", {DType::kFloat32, DType::kFloat16, DType::kBFloat16}));
  if (k <= 0 || k > (int64_t{1} << 20) || x.ndim < 1 || x.shape[x.ndim - 1] != k)
    return Status::InvalidArgument("x: expected rows of " + std::to_string(k) + " features, got " + shape_string(x));
  if (state == nullptr) return Status::InvalidArgument("hessian state: null");
  const int64_t rows = x.numel() / k;
  if (rows == 0) return Status::Ok();
  DeviceGuard guard(x.device.index);
  GPTQKIT_RETURN_IF_ERROR(guard.status());
  gpuStream_t stream = static_cast<gpuStream_t>(stream_ptr);
  float* h = static_cast<float*>(state);
  unsigned long long* bad = bad_flag_of(state, k);
  const int ki = static_cast<int>(k);
  const float a = static_cast<float>(alpha), b = static_cast<float>(beta);

  // Non-finite activations are recorded on the device and reported when the
  // Hessian is read: checking here would synchronise the host once per batch.
  if (beta == 0.0) GPTQKIT_GPU_TRY(gpuMemsetAsync(bad, 0xff, sizeof(unsigned long long), stream), "resetting the check");
  GPTQKIT_RETURN_IF_ERROR(launch_finite_check(x, bad, stream));

#if !GPTQKIT_GPU_IS_HIP
  if (x.dtype != DType::kFloat32) {
    const bool bf16 = x.dtype == DType::kBFloat16;
    if (bf16 ? mma_available<true>() : mma_available<false>()) {
      const uint16_t* xp = static_cast<const uint16_t*>(x.data);
      if (k % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0) {
        const unsigned blocks = static_cast<unsigned>(syrk_tc_blocks(k));
        if (bf16)
          GPTQKIT_LAUNCH(blocks, kTcThreads, kTcSmemBytes, stream, syrk_tc_kernel<true>)(xp, rows, ki, a, b, h);
        else
          GPTQKIT_LAUNCH(blocks, kTcThreads, kTcSmemBytes, stream, syrk_tc_kernel<false>)(xp, rows, ki, a, b, h);
        GPTQKIT_GPU_LAUNCHED("syrk_tc_kernel");
        return Status::Ok();
      }
      const int64_t nt = ceil_div(k, kMmaTile);
      const int64_t tiles = nt * (nt + 1) / 2;
      if (bf16)
        GPTQKIT_LAUNCH(static_cast<unsigned>(tiles), kMmaThreads, 0, stream, syrk_mma_kernel<true>)(
            xp, rows, ki, a, b, h);
      else
        GPTQKIT_LAUNCH(static_cast<unsigned>(tiles), kMmaThreads, 0, stream, syrk_mma_kernel<false>)(
            xp, rows, ki, a, b, h);
      GPTQKIT_GPU_LAUNCHED("syrk_mma_kernel");
      return Status::Ok();
    }
  }
#endif
  const int64_t nt = ceil_div(k, kSimtTile);
  const unsigned tiles = static_cast<unsigned>(nt * (nt + 1) / 2);
  switch (x.dtype) {
    case DType::kFloat32:
      GPTQKIT_LAUNCH(tiles, kSimtThreads, 0, stream, syrk_simt_kernel<float>)(
          static_cast<const float*>(x.data), rows, ki, a, b, h);
      break;
    case DType::kFloat16:
      GPTQKIT_LAUNCH(tiles, kSimtThreads, 0, stream, syrk_simt_kernel<gpu_half>)(
          static_cast<const gpu_half*>(x.data), rows, ki, a, b, h);
      break;
    default:
      GPTQKIT_LAUNCH(tiles, kSimtThreads, 0, stream, syrk_simt_kernel<gpu_bfloat16>)(
          static_cast<const gpu_bfloat16*>(x.data), rows, ki, a, b, h);
      break;
  }
  GPTQKIT_GPU_LAUNCHED("syrk_simt_kernel");
  return Status::Ok();
}

Status hessian_write(const void* state, int64_t k, const TensorView& out, void* stream_ptr) {
  GPTQKIT_RETURN_IF_ERROR(check_view_on(out, "out", out.device));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(out, "out", {DType::kFloat32, DType::kFloat64}));
  GPTQKIT_RETURN_IF_ERROR(checks::shape_is(out, "out", {k, k}));
  if (k == 0) return Status::Ok();
  DeviceGuard guard(out.device.index);
  GPTQKIT_RETURN_IF_ERROR(guard.status());
  gpuStream_t stream = static_cast<gpuStream_t>(stream_ptr);
  const float* h = static_cast<const float*>(state);
  if (state) {
    // The one synchronisation of the accumulator: the deferred input check.
    unsigned long long bad = 0;
    GPTQKIT_GPU_TRY(gpuMemcpyAsync(&bad, bad_flag_of(const_cast<void*>(state), k), sizeof bad, gpuMemcpyDeviceToHost,
                                   stream),
                    "reading the input check");
    GPTQKIT_GPU_TRY(gpuStreamSynchronize(stream), "waiting for the GPU");
    if (bad != ~0ull)
      return Status::InvalidArgument("x: a batch added on the GPU contained NaN or Inf (first at flat index " +
                                     std::to_string(bad) + " of its batch); the Hessian is invalid, call reset()");
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(k * k, 256), 65535));
  if (out.dtype == DType::kFloat64)
    GPTQKIT_LAUNCH(blocks, 256, 0, stream, mirror_kernel<double>)(h, k, static_cast<double*>(out.data));
  else
    GPTQKIT_LAUNCH(blocks, 256, 0, stream, mirror_kernel<float>)(h, k, static_cast<float*>(out.data));
  GPTQKIT_GPU_LAUNCHED("mirror_kernel");
  return Status::Ok();
}

}  // namespace gptqkit::gpu
