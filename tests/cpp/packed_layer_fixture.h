// Shared by the C++ tests of the low-bit layer paths (quantized_linear,
// cpu_gemm): 16-bit float conversions for the reference, and a random packed
// layer in the GPTQ layout with its dense oracle weight from dequantize().
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit_test {

// float -> float16/bfloat16 bits, round to nearest even (test values are normal and in range).
inline uint16_t to_bits16(float v, gptqkit::DType dtype) {
  uint32_t x;
  std::memcpy(&x, &v, sizeof x);
  if (dtype == gptqkit::DType::kBFloat16) return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs < 0x38800000u) return static_cast<uint16_t>(sign);  // flush tiny values (not produced here)
  uint32_t h = (abs - 0x38000000u) >> 13;
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float from_bits16(uint16_t h, gptqkit::DType dtype) {
  uint32_t x;
  if (dtype == gptqkit::DType::kBFloat16) {
    x = static_cast<uint32_t>(h) << 16;
  } else {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (e == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(mant), -24);  // subnormal
    x = sign | ((e + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

inline std::vector<float> random_vector(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(count);
  for (auto& x : v) x = dist(rng);
  return v;
}

// A random packed layer [N, K] in the GPTQ layout: codes, zeros (>= 1 for v1,
// which cannot store 0), scales that are float16 values (as checkpoints store
// them), g_idx in natural or shuffled (act-order) order; and its dense oracle
// weight [N, K] from gptqkit::dequantize.
struct RandomPackedLayer {
  int64_t n, k, g;
  int bits;
  gptqkit::ZeroFormat format;
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<float> scales;
  std::vector<float> dense;

  RandomPackedLayer(int64_t n_, int64_t k_, int64_t group_size, int bits_, gptqkit::ZeroFormat format_,
                    bool act_order, uint32_t seed)
      : n(n_), k(k_), bits(bits_), format(format_) {
    using gptqkit::DType;
    using gptqkit::make_view;
    std::mt19937 rng(seed);
    g = group_size > 0 ? (k + group_size - 1) / group_size : 1;
    std::vector<uint8_t> codes(static_cast<size_t>(n * k));
    std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
    for (auto& c : codes) c = static_cast<uint8_t>(code(rng));
    std::uniform_int_distribution<int> zero(format == gptqkit::ZeroFormat::kV1 ? 1 : 0, (1 << bits) - 1);
    std::vector<int32_t> zeros(static_cast<size_t>(g * n));
    for (auto& z : zeros) z = zero(rng);
    std::uniform_real_distribution<float> scale(0.001f, 0.05f);
    scales.resize(static_cast<size_t>(g * n));
    for (auto& s : scales) s = from_bits16(to_bits16(scale(rng), DType::kFloat16), DType::kFloat16);
    g_idx.resize(static_cast<size_t>(k));
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i) order[i] = i;
    if (act_order) std::shuffle(order.begin(), order.end(), rng);
    for (int64_t i = 0; i < k; ++i) g_idx[order[i]] = group_size > 0 ? static_cast<int32_t>(i / group_size) : 0;

    qweight.resize(static_cast<size_t>(gptqkit::packed_words(k, bits) * n));
    qzeros.resize(static_cast<size_t>(g * gptqkit::packed_words(n, bits)));
    EXPECT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, n, k), bits, qweight_view()).ok());
    EXPECT_TRUE(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, g, n), bits, format, qzeros_view()).ok());
    dense.resize(static_cast<size_t>(n * k));
    const gptqkit::Status s = gptqkit::dequantize(qweight_view(), qzeros_view(), scales_view(), g_idx_view(), bits,
                                                  format, make_view(dense.data(), DType::kFloat32, n, k));
    EXPECT_TRUE(s.ok()) << s.message();
  }

  gptqkit::TensorView qweight_view() {
    return gptqkit::make_view(qweight.data(), gptqkit::DType::kInt32, gptqkit::packed_words(k, bits), n);
  }
  gptqkit::TensorView qzeros_view() {
    return gptqkit::make_view(qzeros.data(), gptqkit::DType::kInt32, g, gptqkit::packed_words(n, bits));
  }
  gptqkit::TensorView scales_view() { return gptqkit::make_view(scales.data(), gptqkit::DType::kFloat32, g, n); }
  gptqkit::TensorView g_idx_view() { return gptqkit::make_view(g_idx.data(), gptqkit::DType::kInt32, k); }
};

}  // namespace gptqkit_test
