// Packing of codes and zero points to the GPTQ int32 bit stream on the GPU
// (cpp/src/pack.cpp and docs/format.md are the specification). Values of
// `bits` bits are packed LSB first as one continuous stream; 32 values fill
// exactly `bits` words, so one thread encodes one chunk of 32 values,
// including the 3-bit case where values straddle words.
#include <algorithm>
#include <string>
#include <type_traits>

#include "checks.h"
#include "gptqkit/pack.h"
#include "gpu_solver_api.h"
#include "gpu_solver_internal.h"

namespace gptqkit::gpu {
namespace {

constexpr int kChunk = 32;
constexpr int kThreads = 256;

// Word w of a chunk holds stream bits [32w, 32w + 32); value i occupies bits
// [i*BITS, i*BITS + BITS). Values are < 2^BITS (checked before packing).
template <int BITS>
__device__ __forceinline__ uint32_t chunk_word(const uint32_t (&v)[kChunk], int w) {
  uint32_t x = 0;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int lo = i * BITS - 32 * w;  // position of value i's lowest bit in word w
    if (lo <= -BITS || lo >= 32) continue;
    x |= lo >= 0 ? v[i] << lo : v[i] >> -lo;
  }
  return x;
}

// Packs `rows` rows of `count` values (value i of row r at src[r * count + i],
// minus `offset`) into words: word w of row r goes to
// q[r * row_stride + w * word_stride], for w < w_dim. One thread per (row,
// chunk); kRowsFastest puts consecutive rows on consecutive threads, which
// coalesces the stores when words of one row are far apart (qweight).
//   qweight [W, N] from codes [N, K]: rows N, count K, row_stride 1, word_stride N
//   qzeros [G, Wn] from zeros [G, N]: rows G, count N, row_stride Wn, word_stride 1
template <int BITS, bool kRowsFastest, typename T>
__global__ void pack_rows_kernel(const T* __restrict__ src, int64_t rows, int64_t count, int32_t offset, int64_t w_dim,
                                 int64_t row_stride, int64_t word_stride, uint32_t* __restrict__ q) {
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  const int64_t total = chunks * rows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t r = kRowsFastest ? t % rows : t / chunks, c = kRowsFastest ? t / rows : t % chunks;
    const int64_t i0 = c * kChunk;
    const int64_t len = min(static_cast<int64_t>(kChunk), count - i0);
    const T* row = src + r * count + i0;
    uint32_t v[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = i < len ? static_cast<uint32_t>(static_cast<int32_t>(row[i]) - offset) : 0u;
    const int64_t w0 = c * BITS;
#pragma unroll
    for (int j = 0; j < BITS; ++j)
      if (w0 + j < w_dim) q[r * row_stride + (w0 + j) * word_stride] = chunk_word<BITS>(v, j);
  }
}

// First index whose value lies outside [lo, hi] (atomicMin; ~0 if none).
template <typename T>
__global__ void range_check_kernel(const T* __restrict__ p, int64_t n, int32_t lo, int32_t hi,
                                   unsigned long long* first_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t v = static_cast<int32_t>(p[i]);
    if (v < lo || v > hi) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

unsigned blocks_for(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kThreads), 65535)));
}

Status check_matrix(const TensorView& t, const char* name, DType dtype, const Device& dev) {
  if (t.ndim != 2)
    return Status::InvalidArgument(std::string(name) + ": expected a 2-d array, got shape " + shape_string(t));
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] < 0)
      return Status::InvalidArgument(std::string(name) + ": negative extent in shape " + shape_string(t));
  if (t.device.type == DeviceType::kCPU || t.device.index != dev.index)
    return Status::InvalidArgument(std::string(name) + ": every tensor of one call must be on the same device");
  if (t.numel() > 0 && t.data == nullptr) return Status::InvalidArgument(std::string(name) + ": null data pointer");
  if (!t.is_contiguous())
    return Status::InvalidArgument(std::string(name) + ": expected a C-contiguous (row-major) array, got shape " +
                                   shape_string(t) + " with non-contiguous strides; call .contiguous() first");
  return checks::dtype_is(t, name, {dtype});
}

// Runs the range check and reads its result (one synchronisation: the error
// must be known before anything is written, as on the CPU).
template <typename T>
Status first_out_of_range(const T* p, int64_t n, int32_t lo, int32_t hi, gpuStream_t stream, int64_t* index,
                          int32_t* value) {
  *index = -1;
  if (n == 0) return Status::Ok();
  Scratch scratch(stream);
  unsigned long long* bad = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&bad, 1, "the range check"));
  GPTQKIT_GPU_TRY(gpuMemsetAsync(bad, 0xff, sizeof(unsigned long long), stream), "range check");
  GPTQKIT_LAUNCH(blocks_for(n), kThreads, 0, stream, range_check_kernel<T>)(p, n, lo, hi, bad);
  GPTQKIT_GPU_LAUNCHED("range_check_kernel");
  unsigned long long host = 0;
  GPTQKIT_GPU_TRY(gpuMemcpyAsync(&host, bad, sizeof host, gpuMemcpyDeviceToHost, stream), "range check");
  GPTQKIT_GPU_TRY(gpuStreamSynchronize(stream), "waiting for the GPU");
  if (host == ~0ull) return Status::Ok();
  *index = static_cast<int64_t>(host);
  T v{};
  GPTQKIT_GPU_TRY(gpuMemcpyAsync(&v, p + host, sizeof(T), gpuMemcpyDeviceToHost, stream), "range check");
  GPTQKIT_GPU_TRY(gpuStreamSynchronize(stream), "waiting for the GPU");
  *value = static_cast<int32_t>(v);
  return Status::Ok();
}

template <typename Fn>
void by_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace

Status pack_qweight(const TensorView& codes, int bits, const TensorView& qweight, void* stream_ptr) {
  GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
  const Device dev = codes.device;
  GPTQKIT_RETURN_IF_ERROR(check_matrix(codes, "codes", DType::kUInt8, dev));
  GPTQKIT_RETURN_IF_ERROR(check_matrix(qweight, "qweight", DType::kInt32, dev));
  const int64_t n_dim = codes.shape[0], k_dim = codes.shape[1];
  const int64_t w_dim = packed_words(k_dim, bits);
  Status s = checks::shape_is(qweight, "qweight", {w_dim, n_dim});
  if (!s.ok())
    return Status::InvalidArgument(s.message() + " (rows = packed_words(" + std::to_string(k_dim) + ", " +
                                   std::to_string(bits) + ") for K = codes.shape[1], columns N = codes.shape[0])");
  if (n_dim == 0 || k_dim == 0) return Status::Ok();
  DeviceGuard guard(dev.index);
  GPTQKIT_RETURN_IF_ERROR(guard.status());
  gpuStream_t stream = static_cast<gpuStream_t>(stream_ptr);
  const uint8_t* src = static_cast<const uint8_t*>(codes.data);
  int64_t bad = -1;
  int32_t value = 0;
  GPTQKIT_RETURN_IF_ERROR(first_out_of_range(src, n_dim * k_dim, 0, (1 << bits) - 1, stream, &bad, &value));
  if (bad >= 0)
    return Status::InvalidArgument("codes: value " + std::to_string(value) + " at [n=" + std::to_string(bad / k_dim) +
                                   ", k=" + std::to_string(bad % k_dim) + "] does not fit in " + std::to_string(bits) +
                                   " bits (max " + std::to_string((1 << bits) - 1) + ")");
  uint32_t* q = static_cast<uint32_t*>(qweight.data);
  const int64_t chunks = ceil_div(k_dim, kChunk);
  by_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    GPTQKIT_LAUNCH(blocks_for(chunks * n_dim), kThreads, 0, stream, pack_rows_kernel<B, true, uint8_t>)(
        src, n_dim, k_dim, 0, w_dim, 1, n_dim, q);
  });
  GPTQKIT_GPU_LAUNCHED("pack_rows_kernel (qweight)");
  return Status::Ok();
}

Status pack_qzeros(const TensorView& zeros, int bits, bool v1, const TensorView& qzeros, void* stream_ptr) {
  GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
  const Device dev = zeros.device;
  GPTQKIT_RETURN_IF_ERROR(check_matrix(zeros, "zeros", DType::kInt32, dev));
  GPTQKIT_RETURN_IF_ERROR(check_matrix(qzeros, "qzeros", DType::kInt32, dev));
  const int64_t g_dim = zeros.shape[0], n_dim = zeros.shape[1];
  const int64_t w_dim = packed_words(n_dim, bits);
  Status s = checks::shape_is(qzeros, "qzeros", {g_dim, w_dim});
  if (!s.ok())
    return Status::InvalidArgument(s.message() + " (rows G = zeros.shape[0], columns = packed_words(" +
                                   std::to_string(n_dim) + ", " + std::to_string(bits) + ") for N = zeros.shape[1])");
  if (g_dim == 0 || n_dim == 0) return Status::Ok();
  DeviceGuard guard(dev.index);
  GPTQKIT_RETURN_IF_ERROR(guard.status());
  gpuStream_t stream = static_cast<gpuStream_t>(stream_ptr);
  const int32_t* z = static_cast<const int32_t*>(zeros.data);
  const int32_t lo = v1 ? 1 : 0;
  const int32_t hi = v1 ? (1 << bits) : (1 << bits) - 1;
  int64_t bad = -1;
  int32_t value = 0;
  GPTQKIT_RETURN_IF_ERROR(first_out_of_range(z, g_dim * n_dim, lo, hi, stream, &bad, &value));
  if (bad >= 0) {
    const std::string where = "[g=" + std::to_string(bad / n_dim) + ", n=" + std::to_string(bad % n_dim) + "]";
    if (v1 && value == 0)
      return Status::InvalidArgument("zeros: zero point 0 at " + where +
                                     " cannot be stored in the v1 format, which stores zero - 1 in " +
                                     std::to_string(bits) +
                                     " unsigned bits; use ZeroFormat::kV2 (checkpoint_format \"gptq_v2\")");
    return Status::InvalidArgument("zeros: value " + std::to_string(value) + " at " + where + " is outside [" +
                                   std::to_string(lo) + ", " + std::to_string(hi) + "], the range of " +
                                   std::to_string(bits) + "-bit " + (v1 ? "v1" : "v2") + " zero points");
  }
  uint32_t* q = static_cast<uint32_t*>(qzeros.data);
  const int64_t chunks = ceil_div(n_dim, kChunk);
  by_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    GPTQKIT_LAUNCH(blocks_for(chunks * g_dim), kThreads, 0, stream, pack_rows_kernel<B, false, int32_t>)(
        z, g_dim, n_dim, lo, w_dim, w_dim, 1, q);
  });
  GPTQKIT_GPU_LAUNCHED("pack_rows_kernel (qzeros)");
  return Status::Ok();
}

}  // namespace gptqkit::gpu
