// Shared helpers for the C++ tests: deterministic random data and an SPD
// Hessian with a realistic spread of diagonal values.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gptqkit/solver.h"

namespace gptqkit_test {

// What quantize_weight wrote, copied to host vectors, and what it returned.
struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> zeros, g_idx;
  std::vector<int64_t> perm;
  gptqkit::QuantizeStats stats;
  gptqkit::Status status;
};

inline std::vector<float> random_normal(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// Activations [rows, k] with correlated channels and a few loud ones, the
// structure that makes GPTQ beat round-to-nearest.
inline std::vector<float> correlated_activations(int64_t rows, int64_t k, uint32_t seed) {
  auto base = random_normal(static_cast<size_t>(rows * k), seed);
  std::vector<float> x(base.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const float prev = c > 0 ? base[r * k + c - 1] : 0.0f;
      const float loud = (c % 17 == 0) ? 4.0f : 1.0f;
      x[r * k + c] = loud * (0.8f * base[r * k + c] + 0.6f * prev);
    }
  return x;
}

// H = (2/n) X^T X in float64, row-major [k, k].
inline std::vector<double> naive_hessian(const std::vector<float>& x, int64_t rows, int64_t k) {
  std::vector<double> h(static_cast<size_t>(k * k), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) {
      const double xi = x[r * k + i];
      for (int64_t j = 0; j < k; ++j) h[i * k + j] += xi * static_cast<double>(x[r * k + j]);
    }
  for (auto& v : h) v *= 2.0 / static_cast<double>(rows);
  return h;
}

inline double rel_frobenius(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace gptqkit_test
