// CPU forward pass of a quantized linear layer: the output rows are split
// among gptqkit's workers; each dequantizes a tile of its rows into float32
// scratch and multiplies it with a single-threaded sgemm, tile after tile.
//
// The codes are decoded straight from qweight (strided by N, no copy), 32
// values of K (one chunk of `bits` words, docs/format.md) at a time, into a
// row-major [tile, K] float32 buffer, which BLAS reads as the column-major
// [K, tile] matrix A; with x row-major [M, K] = column-major [K, M] as B,
//   C (column-major [tile, M]) = Aᵀ · B
// is exactly the tile's columns of the row-major y [M, N] (ldc = N).
#include "gptqkit/linear.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "bitstream.h"
#include "checks.h"
#include "half.h"
#include "parallel.h"

namespace gptqkit {
namespace {

using bitstream::decode_chunk;

using bitstream::kChunk;
// Upper bound of the float32 scratch of all workers together (weight tiles,
// plus output tiles when y is 16-bit): 4 Mi floats = 16 MiB.
constexpr int64_t kScratchFloats = int64_t{1} << 22;

inline float load_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

inline void store_float(void* base, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_fp16(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

// The layer's constant data, shared by every tile.
struct Layer {
  const uint32_t* qweight;  // [w_dim, n_dim]
  const int32_t* g_idx;     // [k_dim]
  const int32_t* chunk_group;  // per chunk of K: its group if uniform, else -1
  const float* scale_t;     // [n_dim, g_dim]
  const float* zero_t;      // [n_dim, g_dim]
  int64_t n_dim, k_dim, w_dim, g_dim;
};

// Dense rows [n_begin, n_end) of W into out (row n at out + (n - n_out0) * K).
// Rows are handled kRowBlock at a time with the chunk loop outside: the
// words of one chunk for adjacent rows share cache lines of qweight [W, N],
// whereas walking one row through all of K would stride N words per read.
template <int BITS>
void dequantize_rows(const Layer& L, int64_t n_out0, int64_t n_begin, int64_t n_end, float* out) {
  constexpr int64_t kRowBlock = 16;
  const int64_t chunks = (L.k_dim + kChunk - 1) / kChunk;
  uint32_t words[BITS];
  uint32_t values[kChunk];
  for (int64_t block = n_begin; block < n_end; block += kRowBlock) {
    const int64_t block_end = std::min(n_end, block + kRowBlock);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk;
      const int64_t len = std::min(kChunk, L.k_dim - k0);
      const int64_t w0 = c * BITS;
      const int64_t wlen = std::min<int64_t>(BITS, L.w_dim - w0);
      const int32_t g = L.chunk_group[c];
      for (int64_t n = block; n < block_end; ++n) {
        for (int64_t j = 0; j < wlen; ++j) words[j] = L.qweight[(w0 + j) * L.n_dim + n];
        for (int64_t j = wlen; j < BITS; ++j) words[j] = 0;
        decode_chunk<BITS>(words, values);
        const float* s = L.scale_t + n * L.g_dim;
        const float* z = L.zero_t + n * L.g_dim;
        float* dst = out + (n - n_out0) * L.k_dim + k0;
        if (g >= 0) {
          const float sg = s[g];
          const float zg = z[g];
          for (int64_t i = 0; i < len; ++i) dst[i] = sg * (static_cast<float>(values[i]) - zg);
        } else {  // act-order: groups vary inside the chunk
          const int32_t* gi = L.g_idx + k0;
          for (int64_t i = 0; i < len; ++i) dst[i] = s[gi[i]] * (static_cast<float>(values[i]) - z[gi[i]]);
        }
      }
    }
  }
}

// Rows [n0, n1) of W into out, on the calling thread.
void dequantize_range(const Layer& L, int bits, int64_t n0, int64_t n1, float* out) {
  switch (bits) {
    case 2: dequantize_rows<2>(L, n0, n0, n1, out); break;
    case 3: dequantize_rows<3>(L, n0, n0, n1, out); break;
    case 4: dequantize_rows<4>(L, n0, n0, n1, out); break;
    default: dequantize_rows<8>(L, n0, n0, n1, out); break;
  }
}

Status validate(const TensorView& x, const TensorView& qweight, const TensorView& qzeros,
                const TensorView& scales, const TensorView& g_idx, const TensorView* bias, int bits,
                ZeroFormat format, const TensorView& y) {
  const std::initializer_list<DType> floats = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  GPTQKIT_RETURN_IF_ERROR(checks::packed_layer(qweight, qzeros, scales, g_idx, bits, format, floats));

  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(x, "x"));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(x, "x", floats));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(x, "x", 2));
  if (bias != nullptr) {
    GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(*bias, "bias"));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(*bias, "bias", floats));
    GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(*bias, "bias", 1));
  }
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(y, "y"));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(y, "y", 2));
  if (y.dtype != x.dtype)
    return Status::InvalidArgument(std::string("y: expected the dtype of x (") + dtype_name(x.dtype) + "), got " +
                                   dtype_name(y.dtype));

  // Extents: K from g_idx, N from qweight, M from x.
  const int64_t k_dim = g_idx.shape[0];
  const int64_t n_dim = qweight.shape[1];
  const int64_t m_dim = x.shape[0];
  const std::string dims = "K = g_idx.shape[0] = " + std::to_string(k_dim) + ", N = qweight.shape[1] = " +
                           std::to_string(n_dim);
  GPTQKIT_RETURN_IF_ERROR(checks::with_reason(checks::shape_is(x, "x", {-1, k_dim}), "[M, K] with " + dims));
  if (bias != nullptr)
    GPTQKIT_RETURN_IF_ERROR(checks::with_reason(checks::shape_is(*bias, "bias", {n_dim}), "[N] with " + dims));
  GPTQKIT_RETURN_IF_ERROR(checks::with_reason(checks::shape_is(y, "y", {m_dim, n_dim}),
                                              "[M, N] with M = x.shape[0] = " + std::to_string(m_dim) + ", " + dims));
  if (m_dim > INT_MAX || n_dim > INT_MAX || k_dim > INT_MAX)
    return Status::InvalidArgument("x: extents M = " + std::to_string(m_dim) + ", N = " + std::to_string(n_dim) +
                                   ", K = " + std::to_string(k_dim) + " exceed the BLAS integer range");

  // The output is written while the inputs are read.
  const TensorView* inputs[] = {&x, &qweight, &qzeros, &scales, &g_idx, bias};
  const char* names[] = {"x", "qweight", "qzeros", "scales", "g_idx", "bias"};
  for (int i = 0; i < 6; ++i)
    if (inputs[i] != nullptr && checks::overlaps(y, *inputs[i]))
      return Status::InvalidArgument(std::string("y: overlaps the memory of ") + names[i] +
                                     "; pass a separate output array");
  return Status::Ok();
}

}  // namespace

Status quantized_linear(const TensorView& x, const TensorView& qweight, const TensorView& qzeros,
                        const TensorView& scales, const TensorView& g_idx, const TensorView* bias, int bits,
                        ZeroFormat format, const TensorView& y) {
  try {
    GPTQKIT_RETURN_IF_ERROR(validate(x, qweight, qzeros, scales, g_idx, bias, bits, format, y));
    const int64_t m_dim = x.shape[0];
    const int64_t k_dim = g_idx.shape[0];
    const int64_t n_dim = qweight.shape[1];
    const int64_t g_dim = scales.shape[0];
    if (m_dim == 0 || n_dim == 0) return Status::Ok();

    std::vector<float> bias_f;
    if (bias != nullptr) {
      bias_f.resize(static_cast<size_t>(n_dim));
      for (int64_t n = 0; n < n_dim; ++n) bias_f[n] = load_float(bias->data, bias->dtype, n);
    }
    if (k_dim == 0) {  // an empty sum: y = bias (or 0)
      for (int64_t m = 0; m < m_dim; ++m)
        for (int64_t n = 0; n < n_dim; ++n) store_float(y.data, y.dtype, m * n_dim + n, bias ? bias_f[n] : 0.0f);
      return Status::Ok();
    }

    // Zero points and scales as [N, G] float tables: the per-k group lookups
    // of one output row stay within G contiguous floats.
    std::vector<int32_t> zeros(static_cast<size_t>(g_dim * n_dim));
    GPTQKIT_RETURN_IF_ERROR(unpack_qzeros(qzeros, bits, format, make_view(zeros.data(), DType::kInt32, g_dim, n_dim)));
    std::vector<float> scale_t(static_cast<size_t>(n_dim * g_dim));
    std::vector<float> zero_t(static_cast<size_t>(n_dim * g_dim));
    parallel_for(n_dim, 256, [&](int64_t n0, int64_t n1) {
      for (int64_t g = 0; g < g_dim; ++g)
        for (int64_t n = n0; n < n1; ++n) {
          scale_t[n * g_dim + g] = load_float(scales.data, scales.dtype, g * n_dim + n);
          zero_t[n * g_dim + g] = static_cast<float>(zeros[g * n_dim + n]);
        }
    });

    const int32_t* gi = static_cast<const int32_t*>(g_idx.data);
    const int64_t chunks = (k_dim + kChunk - 1) / kChunk;
    std::vector<int32_t> chunk_group(static_cast<size_t>(chunks));
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k1 = std::min(k_dim, (c + 1) * kChunk);
      int32_t g = gi[c * kChunk];
      for (int64_t k = c * kChunk + 1; k < k1 && g >= 0; ++k)
        if (gi[k] != g) g = -1;
      chunk_group[c] = g;
    }
    const Layer layer{static_cast<const uint32_t*>(qweight.data), gi, chunk_group.data(), scale_t.data(),
                      zero_t.data(), n_dim, k_dim, packed_words(k_dim, bits), g_dim};

    // x as float32 (borrowed when it already is).
    const bool y_is_f32 = y.dtype == DType::kFloat32;
    std::vector<float> x32;
    const float* xf = static_cast<const float*>(x.data);
    if (x.dtype != DType::kFloat32) {
      x32.resize(static_cast<size_t>(m_dim * k_dim));
      parallel_for(m_dim * k_dim, 1 << 14, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) x32[i] = load_float(x.data, x.dtype, i);
      });
      xf = x32.data();
    }

    // Each worker takes a contiguous range of output rows and walks it in
    // tiles: dequantize the tile (its own scratch), then a single-threaded
    // sgemm. BLAS's own thread pool is kept out: alternating it with
    // gptqkit's workers makes its idle threads spin against them, which on
    // few cores costs several times the work itself.
    blas::ScopedBlasThreads one_blas_thread(1);
    const int64_t workers = std::max<int64_t>(1, num_threads());
    const int64_t per_row = k_dim + (y_is_f32 ? 0 : m_dim);
    const int64_t tile = std::max<int64_t>(16, (kScratchFloats / workers / per_row) / 16 * 16);
    const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / k_dim);  // >= 64 Ki weights per worker
    parallel_for(n_dim, grain, [&](int64_t r0, int64_t r1) {
      const int64_t rows_max = std::min(tile, r1 - r0);
      std::vector<float> w_tile(static_cast<size_t>(rows_max * k_dim));
      std::vector<float> y_tile(y_is_f32 ? 0 : static_cast<size_t>(rows_max * m_dim));
      for (int64_t n0 = r0; n0 < r1; n0 += rows_max) {
        const int64_t n1 = std::min(r1, n0 + rows_max);
        const int64_t rows = n1 - n0;
        dequantize_range(layer, bits, n0, n1, w_tile.data());
        float* c = y_is_f32 ? static_cast<float*>(y.data) + n0 : y_tile.data();
        const int64_t ldc = y_is_f32 ? n_dim : rows;
        float beta = 0.0f;
        if (bias != nullptr) {  // C starts as the bias, then C += W x
          for (int64_t m = 0; m < m_dim; ++m) std::memcpy(c + m * ldc, bias_f.data() + n0, rows * sizeof(float));
          beta = 1.0f;
        }
        blas::sgemm('T', 'N', static_cast<int>(rows), static_cast<int>(m_dim), static_cast<int>(k_dim), 1.0f,
                    w_tile.data(), static_cast<int>(k_dim), xf, static_cast<int>(k_dim), beta, c,
                    static_cast<int>(ldc));
        if (!y_is_f32)
          for (int64_t m = 0; m < m_dim; ++m)
            for (int64_t r = 0; r < rows; ++r) store_float(y.data, y.dtype, m * n_dim + n0 + r, c[m * ldc + r]);
      }
    });
    return Status::Ok();
  } catch (const std::exception& e) {
    return Status::Internal(std::string("quantized_linear: ") + e.what());
  } catch (...) {
    return Status::Internal("quantized_linear: unknown exception");
  }
}

}  // namespace gptqkit
