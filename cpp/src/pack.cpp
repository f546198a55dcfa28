// Packing of codes and zero points into the GPTQ int32 bit-stream layout.
// docs/format.md is the specification this file implements.
//
// Every stream is cut into chunks of 32 values; 32 values of `bits` bits fill
// exactly `bits` words, so chunk c covers values [32c, 32c + 32) and words
// [bits*c, bits*c + bits). The last chunk is zero-padded; its words past
// packed_words(count, bits) are all padding and are neither written nor read.
#include "gptqkit/pack.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>

#include "bitstream.h"
#include "checks.h"
#if defined(GPTQKIT_HAS_GPU)
#include "../../cuda/src/gpu_solver_api.h"
#endif
#include "parallel.h"

namespace gptqkit {
namespace {

using bitstream::decode_chunk;
using bitstream::encode_chunk;
using bitstream::kChunk;
constexpr int64_t kColTile = 16;   // columns handled together (one cache line of int32)

// qweight [W, N] from codes [N, K], columns [n_begin, n_end).
template <int BITS>
void pack_qweight_cols(const uint8_t* codes, int64_t n_dim, int64_t k_dim, uint32_t* q, int64_t w_dim,
                       int64_t n_begin, int64_t n_end) {
  const int64_t chunks = (k_dim + kChunk - 1) / kChunk;
  uint32_t values[kChunk];
  uint32_t words[BITS];
  for (int64_t tile = n_begin; tile < n_end; tile += kColTile) {
    const int64_t tile_end = std::min(n_end, tile + kColTile);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk;
      const int64_t len = std::min(kChunk, k_dim - k0);
      const int64_t w0 = c * BITS;
      const int64_t wlen = std::min<int64_t>(BITS, w_dim - w0);
      for (int64_t n = tile; n < tile_end; ++n) {
        const uint8_t* src = codes + n * k_dim + k0;
        for (int64_t i = 0; i < len; ++i) values[i] = src[i];
        for (int64_t i = len; i < kChunk; ++i) values[i] = 0;
        encode_chunk<BITS>(values, words);
        for (int64_t j = 0; j < wlen; ++j) q[(w0 + j) * n_dim + n] = words[j];
      }
    }
  }
}

// codes [N, K] from qweight [W, N], columns [n_begin, n_end).
template <int BITS>
void unpack_qweight_cols(const uint32_t* q, int64_t n_dim, int64_t k_dim, int64_t w_dim, uint8_t* codes,
                         int64_t n_begin, int64_t n_end) {
  const int64_t chunks = (k_dim + kChunk - 1) / kChunk;
  uint32_t values[kChunk];
  uint32_t words[BITS];
  for (int64_t tile = n_begin; tile < n_end; tile += kColTile) {
    const int64_t tile_end = std::min(n_end, tile + kColTile);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk;
      const int64_t len = std::min(kChunk, k_dim - k0);
      const int64_t w0 = c * BITS;
      const int64_t wlen = std::min<int64_t>(BITS, w_dim - w0);
      for (int64_t n = tile; n < tile_end; ++n) {
        for (int64_t j = 0; j < wlen; ++j) words[j] = q[(w0 + j) * n_dim + n];
        for (int64_t j = wlen; j < BITS; ++j) words[j] = 0;
        decode_chunk<BITS>(words, values);
        uint8_t* dst = codes + n * k_dim + k0;
        for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<uint8_t>(values[i]);
      }
    }
  }
}

// One row of `count` values (already offset, e.g. zero - 1) -> packed words.
template <int BITS>
void pack_row(const int32_t* row, int64_t count, int32_t offset, uint32_t* out, int64_t out_words) {
  uint32_t values[kChunk];
  uint32_t words[BITS];
  for (int64_t k0 = 0, w0 = 0; k0 < count; k0 += kChunk, w0 += BITS) {
    const int64_t len = std::min(kChunk, count - k0);
    for (int64_t i = 0; i < len; ++i) values[i] = static_cast<uint32_t>(row[k0 + i] - offset);
    for (int64_t i = len; i < kChunk; ++i) values[i] = 0;
    encode_chunk<BITS>(values, words);
    const int64_t wlen = std::min<int64_t>(BITS, out_words - w0);
    for (int64_t j = 0; j < wlen; ++j) out[w0 + j] = words[j];
  }
}

template <int BITS>
void unpack_row(const uint32_t* in, int64_t in_words, int64_t count, int32_t offset, int32_t* row) {
  uint32_t values[kChunk];
  uint32_t words[BITS];
  for (int64_t k0 = 0, w0 = 0; k0 < count; k0 += kChunk, w0 += BITS) {
    const int64_t wlen = std::min<int64_t>(BITS, in_words - w0);
    for (int64_t j = 0; j < wlen; ++j) words[j] = in[w0 + j];
    for (int64_t j = wlen; j < BITS; ++j) words[j] = 0;
    decode_chunk<BITS>(words, values);
    const int64_t len = std::min(kChunk, count - k0);
    for (int64_t i = 0; i < len; ++i) row[k0 + i] = static_cast<int32_t>(values[i]) + offset;
  }
}

// Calls fn.template operator()<BITS>() for the runtime bits (already validated).
template <typename Fn>
void dispatch_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

Status check_matrix(const TensorView& t, const char* name, DType dtype) {
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(t, name));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(t, name, {dtype}));
  return checks::ndim_is(t, name, 2);
}

// shape_is with an explanation of where the expected shape comes from.
Status check_shape(const TensorView& t, const char* name, int64_t rows, int64_t cols, const std::string& why) {
  Status s = checks::shape_is(t, name, {rows, cols});
  if (!s.ok()) return Status::InvalidArgument(s.message() + " (" + why + ")");
  return s;
}

Status check_format(ZeroFormat format) {
  if (format == ZeroFormat::kV1 || format == ZeroFormat::kV2) return Status::Ok();
  return Status::InvalidArgument("format: expected ZeroFormat::kV1 or ZeroFormat::kV2, got value " +
                                 std::to_string(static_cast<int>(format)));
}

#if defined(GPTQKIT_HAS_GPU)
// Builds with a GPU backend pack on the GPU when the input is there (the
// output must be on the same GPU). CPU-only builds keep the CPU checks, which
// reject device memory.
bool on_gpu(const TensorView& a, const TensorView& b) {
  return a.device.type != DeviceType::kCPU || b.device.type != DeviceType::kCPU;
}

Status gpu_pair(const TensorView& in, const char* in_name, const TensorView& out, const char* out_name) {
  const TensorView& gpu = in.device.type != DeviceType::kCPU ? in : out;
  GPTQKIT_RETURN_IF_ERROR(checks::gpu_supported(gpu, &gpu == &in ? in_name : out_name));
  if (in.device.type == DeviceType::kCPU || out.device.type == DeviceType::kCPU ||
      in.device.index != out.device.index)
    return Status::InvalidArgument(std::string(out_name) + ": is on " + checks::device_string(out.device) + ", but " +
                                   in_name + " is on " + checks::device_string(in.device) +
                                   "; every tensor of one call must be on the same device");
  return Status::Ok();
}
#endif

Status internal_error(const char* fn, const std::exception* e) {
  return Status::Internal(std::string(fn) + ": " + (e ? e->what() : "unknown exception"));
}

}  // namespace

int64_t packed_words(int64_t count, int bits) {
  if (count < 0 || bits < 1 || bits > 32) return -1;
  if (count > std::numeric_limits<int64_t>::max() / 32) return -1;
  return (count * bits + 31) / 32;
}

Status pack_qweight(const TensorView& codes, int bits, const TensorView& qweight, void* stream) {
  try {
    GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
#if defined(GPTQKIT_HAS_GPU)
    if (on_gpu(codes, qweight)) {
      GPTQKIT_RETURN_IF_ERROR(gpu_pair(codes, "codes", qweight, "qweight"));
      return gpu::pack_qweight(codes, bits, qweight, stream);
    }
#endif
    GPTQKIT_RETURN_IF_ERROR(check_matrix(codes, "codes", DType::kUInt8));
    GPTQKIT_RETURN_IF_ERROR(check_matrix(qweight, "qweight", DType::kInt32));
    const int64_t n_dim = codes.shape[0];
    const int64_t k_dim = codes.shape[1];
    const int64_t w_dim = packed_words(k_dim, bits);
    GPTQKIT_RETURN_IF_ERROR(check_shape(qweight, "qweight", w_dim, n_dim,
                                        "rows = packed_words(" + std::to_string(k_dim) + ", " +
                                            std::to_string(bits) +
                                            ") for K = codes.shape[1], columns N = codes.shape[0]"));
    const uint8_t* src = static_cast<const uint8_t*>(codes.data);
    const int64_t total = n_dim * k_dim;
    // Range check before any write: a cheap OR-reduction, then locate the culprit.
    unsigned high = 0;
    for (int64_t i = 0; i < total; ++i) high |= static_cast<unsigned>(src[i]) >> bits;
    if (high != 0) {
      int64_t i = 0;
      while ((static_cast<unsigned>(src[i]) >> bits) == 0) ++i;
      return Status::InvalidArgument("codes: value " + std::to_string(src[i]) + " at [n=" +
                                     std::to_string(i / k_dim) + ", k=" + std::to_string(i % k_dim) +
                                     "] does not fit in " + std::to_string(bits) + " bits (max " +
                                     std::to_string((1 << bits) - 1) + ")");
    }
    uint32_t* q = static_cast<uint32_t*>(qweight.data);
    dispatch_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      parallel_for(n_dim, kColTile * 4, [&](int64_t n0, int64_t n1) {
        pack_qweight_cols<B>(src, n_dim, k_dim, q, w_dim, n0, n1);
      });
    });
    return Status::Ok();
  } catch (const std::exception& e) {
    return internal_error("pack_qweight", &e);
  } catch (...) {
    return internal_error("pack_qweight", nullptr);
  }
}

Status unpack_qweight(const TensorView& qweight, int bits, const TensorView& codes) {
  try {
    GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
    GPTQKIT_RETURN_IF_ERROR(check_matrix(qweight, "qweight", DType::kInt32));
    GPTQKIT_RETURN_IF_ERROR(check_matrix(codes, "codes", DType::kUInt8));
    const int64_t n_dim = codes.shape[0];
    const int64_t k_dim = codes.shape[1];
    const int64_t w_dim = packed_words(k_dim, bits);
    GPTQKIT_RETURN_IF_ERROR(check_shape(qweight, "qweight", w_dim, n_dim,
                                        "rows = packed_words(" + std::to_string(k_dim) + ", " +
                                            std::to_string(bits) +
                                            ") for K = codes.shape[1], columns N = codes.shape[0]"));
    const uint32_t* q = static_cast<const uint32_t*>(qweight.data);
    uint8_t* dst = static_cast<uint8_t*>(codes.data);
    dispatch_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      parallel_for(n_dim, kColTile * 4, [&](int64_t n0, int64_t n1) {
        unpack_qweight_cols<B>(q, n_dim, k_dim, w_dim, dst, n0, n1);
      });
    });
    return Status::Ok();
  } catch (const std::exception& e) {
    return internal_error("unpack_qweight", &e);
  } catch (...) {
    return internal_error("unpack_qweight", nullptr);
  }
}

Status pack_qzeros(const TensorView& zeros, int bits, ZeroFormat format, const TensorView& qzeros, void* stream) {
  try {
    GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
    GPTQKIT_RETURN_IF_ERROR(check_format(format));
#if defined(GPTQKIT_HAS_GPU)
    if (on_gpu(zeros, qzeros)) {
      GPTQKIT_RETURN_IF_ERROR(gpu_pair(zeros, "zeros", qzeros, "qzeros"));
      return gpu::pack_qzeros(zeros, bits, format == ZeroFormat::kV1, qzeros, stream);
    }
#endif
    GPTQKIT_RETURN_IF_ERROR(check_matrix(zeros, "zeros", DType::kInt32));
    GPTQKIT_RETURN_IF_ERROR(check_matrix(qzeros, "qzeros", DType::kInt32));
    const int64_t g_dim = zeros.shape[0];
    const int64_t n_dim = zeros.shape[1];
    const int64_t w_dim = packed_words(n_dim, bits);
    GPTQKIT_RETURN_IF_ERROR(check_shape(qzeros, "qzeros", g_dim, w_dim,
                                        "rows G = zeros.shape[0], columns = packed_words(" +
                                            std::to_string(n_dim) + ", " + std::to_string(bits) +
                                            ") for N = zeros.shape[1]"));
    const int32_t* z = static_cast<const int32_t*>(zeros.data);
    const bool v1 = format == ZeroFormat::kV1;
    const int32_t lo = v1 ? 1 : 0;
    const int32_t hi = v1 ? (1 << bits) : (1 << bits) - 1;
    for (int64_t i = 0; i < g_dim * n_dim; ++i) {
      if (z[i] >= lo && z[i] <= hi) continue;
      const std::string where = "[g=" + std::to_string(i / n_dim) + ", n=" + std::to_string(i % n_dim) + "]";
      if (v1 && z[i] == 0)
        return Status::InvalidArgument(
            "zeros: zero point 0 at " + where +
            " cannot be stored in the v1 format, which stores zero - 1 in " + std::to_string(bits) +
            " unsigned bits; use ZeroFormat::kV2 (checkpoint_format \"gptq_v2\")");
      return Status::InvalidArgument("zeros: value " + std::to_string(z[i]) + " at " + where +
                                     " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) +
                                     "], the range of " + std::to_string(bits) + "-bit " +
                                     (v1 ? "v1" : "v2") + " zero points");
    }
    uint32_t* q = static_cast<uint32_t*>(qzeros.data);
    dispatch_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      for (int64_t g = 0; g < g_dim; ++g) pack_row<B>(z + g * n_dim, n_dim, lo, q + g * w_dim, w_dim);
    });
    return Status::Ok();
  } catch (const std::exception& e) {
    return internal_error("pack_qzeros", &e);
  } catch (...) {
    return internal_error("pack_qzeros", nullptr);
  }
}

Status unpack_qzeros(const TensorView& qzeros, int bits, ZeroFormat format, const TensorView& zeros) {
  try {
    GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
    GPTQKIT_RETURN_IF_ERROR(check_format(format));
    GPTQKIT_RETURN_IF_ERROR(check_matrix(qzeros, "qzeros", DType::kInt32));
    GPTQKIT_RETURN_IF_ERROR(check_matrix(zeros, "zeros", DType::kInt32));
    const int64_t g_dim = zeros.shape[0];
    const int64_t n_dim = zeros.shape[1];
    const int64_t w_dim = packed_words(n_dim, bits);
    GPTQKIT_RETURN_IF_ERROR(check_shape(qzeros, "qzeros", g_dim, w_dim,
                                        "rows G = zeros.shape[0], columns = packed_words(" +
                                            std::to_string(n_dim) + ", " + std::to_string(bits) +
                                            ") for N = zeros.shape[1]"));
    const uint32_t* q = static_cast<const uint32_t*>(qzeros.data);
    int32_t* z = static_cast<int32_t*>(zeros.data);
    const int32_t offset = format == ZeroFormat::kV1 ? 1 : 0;
    dispatch_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      for (int64_t g = 0; g < g_dim; ++g) unpack_row<B>(q + g * w_dim, w_dim, n_dim, offset, z + g * n_dim);
    });
    return Status::Ok();
  } catch (const std::exception& e) {
    return internal_error("unpack_qzeros", &e);
  } catch (...) {
    return internal_error("unpack_qzeros", nullptr);
  }
}

}  // namespace gptqkit
