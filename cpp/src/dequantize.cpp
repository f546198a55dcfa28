// Reference dequantization of a packed GPTQ layer to a dense float32 weight:
//   W[n, k] = scales[g_idx[k], n] * (code[n, k] - zero[g_idx[k], n]).
// The codes are decoded straight from qweight, 32 values (one chunk of `bits`
// words) at a time; see pack.cpp and docs/format.md for the layout.
#include <algorithm>
#include <exception>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bitstream.h"
#include "checks.h"
#include "gptqkit/pack.h"
#include "half.h"
#include "parallel.h"

namespace gptqkit {
namespace {

using bitstream::decode_chunk;

using bitstream::kChunk;
constexpr int64_t kColTile = 16;

// Output rows [n_begin, n_end). scale_t / zero_t are [N, G] (transposed), so
// the per-k group lookups of one output row stay within G contiguous floats.
template <int BITS>
void dequantize_rows(const uint32_t* q, int64_t n_dim, int64_t k_dim, int64_t w_dim, const int32_t* g_idx,
                     const int32_t* chunk_group, int64_t g_dim, const float* scale_t, const float* zero_t,
                     float* out, int64_t n_begin, int64_t n_end) {
  const int64_t chunks = (k_dim + kChunk - 1) / kChunk;
  uint32_t words[BITS];
  uint32_t values[kChunk];
  for (int64_t tile = n_begin; tile < n_end; tile += kColTile) {
    const int64_t tile_end = std::min(n_end, tile + kColTile);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk;
      const int64_t len = std::min(kChunk, k_dim - k0);
      const int64_t w0 = c * BITS;
      const int64_t wlen = std::min<int64_t>(BITS, w_dim - w0);
      const int32_t* gi = g_idx + k0;
      for (int64_t n = tile; n < tile_end; ++n) {
        for (int64_t j = 0; j < wlen; ++j) words[j] = q[(w0 + j) * n_dim + n];
        for (int64_t j = wlen; j < BITS; ++j) words[j] = 0;
        decode_chunk<BITS>(words, values);
        const float* s = scale_t + n * g_dim;
        const float* z = zero_t + n * g_dim;
        float* dst = out + n * k_dim + k0;
        const int32_t uniform = chunk_group[c];
        if (uniform >= 0) {  // the whole chunk in one group (no act-order): broadcast, vectorizable
          const float sg = s[uniform];
          const float zg = z[uniform];
          for (int64_t i = 0; i < len; ++i) dst[i] = sg * (static_cast<float>(values[i]) - zg);
        } else {
          for (int64_t i = 0; i < len; ++i) {
            const int32_t g = gi[i];
            dst[i] = s[g] * (static_cast<float>(values[i]) - z[g]);
          }
        }
      }
    }
  }
}

}  // namespace

Status dequantize(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                  const TensorView& g_idx, int bits, ZeroFormat format, const TensorView& weight) {
  try {
    GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
    GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(weight, "weight"));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(weight, "weight", {DType::kFloat32}));
    GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(weight, "weight", 2));
    for (const auto& [t, name] : {std::pair<const TensorView*, const char*>{&qweight, "qweight"},
                                  {&qzeros, "qzeros"}, {&scales, "scales"}, {&g_idx, "g_idx"}})
      GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(*t, name));

    // The output's [N, K] fixes the layer's extents; then the layer itself.
    const int64_t n_dim = weight.shape[0];
    const int64_t k_dim = weight.shape[1];
    const int64_t g_dim = scales.shape[0];
    const std::string nk =
        " for [N, K] = weight.shape = [" + std::to_string(n_dim) + ", " + std::to_string(k_dim) + "]";
    GPTQKIT_RETURN_IF_ERROR(checks::with_reason(
        checks::shape_is(qweight, "qweight", {packed_words(k_dim, bits), n_dim}),
        "[packed_words(K, " + std::to_string(bits) + "), N]" + nk));
    GPTQKIT_RETURN_IF_ERROR(checks::with_reason(checks::shape_is(g_idx, "g_idx", {k_dim}), "[K]" + nk));
    GPTQKIT_RETURN_IF_ERROR(checks::packed_layer(qweight, qzeros, scales, g_idx, bits, format,
                                                 {DType::kFloat16, DType::kFloat32}));
    if (n_dim == 0 || k_dim == 0) return Status::Ok();
    const int32_t* gi = static_cast<const int32_t*>(g_idx.data);
    const int64_t w_dim = packed_words(k_dim, bits);

    // True zero points [G, N] through the public unpacker, then [N, G] float
    // tables for scales and zeros.
    std::vector<int32_t> zeros(static_cast<size_t>(g_dim * n_dim));
    GPTQKIT_RETURN_IF_ERROR(
        unpack_qzeros(qzeros, bits, format, make_view(zeros.data(), DType::kInt32, g_dim, n_dim)));
    std::vector<float> scale_t(static_cast<size_t>(n_dim * g_dim));
    std::vector<float> zero_t(static_cast<size_t>(n_dim * g_dim));
    const bool half = scales.dtype == DType::kFloat16;
    const uint16_t* s16 = static_cast<const uint16_t*>(scales.data);
    const float* s32 = static_cast<const float*>(scales.data);
    parallel_for(n_dim, 256, [&](int64_t n0, int64_t n1) {
      for (int64_t g = 0; g < g_dim; ++g) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t src = g * n_dim + n;
          scale_t[n * g_dim + g] = half ? fp16_to_float(s16[src]) : s32[src];
          zero_t[n * g_dim + g] = static_cast<float>(zeros[src]);
        }
      }
    });

    // Per 32-column chunk of K: its group if all its columns share one, else -1.
    const int64_t chunks = (k_dim + kChunk - 1) / kChunk;
    std::vector<int32_t> chunk_group(static_cast<size_t>(chunks));
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk;
      const int64_t k1 = std::min(k_dim, k0 + kChunk);
      int32_t g = gi[k0];
      for (int64_t k = k0 + 1; k < k1 && g >= 0; ++k)
        if (gi[k] != g) g = -1;
      chunk_group[c] = g;
    }

    const uint32_t* q = static_cast<const uint32_t*>(qweight.data);
    float* out = static_cast<float*>(weight.data);
    auto run = [&](auto b) {
      constexpr int B = decltype(b)::value;
      parallel_for(n_dim, kColTile, [&](int64_t n0, int64_t n1) {
        dequantize_rows<B>(q, n_dim, k_dim, w_dim, gi, chunk_group.data(), g_dim, scale_t.data(), zero_t.data(), out, n0, n1);
      });
    };
    switch (bits) {
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      default: run(std::integral_constant<int, 8>{}); break;
    }
    return Status::Ok();
  } catch (const std::exception& e) {
    return Status::Internal(std::string("dequantize: ") + e.what());
  } catch (...) {
    return Status::Internal("dequantize: unknown exception");
  }
}

}  // namespace gptqkit
