// Quantizes a small layer with gptqkit's C++ API, packs it, dequantizes the
// packed tensors and checks the round trip. Exit code 0 on success.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <gptqkit/gptqkit.h>

int main() {
  using namespace gptqkit;
  const int64_t n = 32, k = 64, tokens = 256;
  std::mt19937 gen(0);
  std::normal_distribution<float> dist;
  std::vector<float> x(tokens * k), w(n * k), h(k * k);
  for (auto& v : x) v = dist(gen);
  for (auto& v : w) v = dist(gen);

  HessianAccumulator acc(k);
  Status s = acc.add_batch(make_view(x.data(), DType::kFloat32, tokens, k));
  if (s.ok()) s = acc.hessian(make_view(h.data(), DType::kFloat32, k, k));

  QuantizeOptions opt;
  opt.bits = 4;
  opt.group_size = 32;
  const int64_t g = num_groups(k, opt.group_size);
  std::vector<uint8_t> codes(n * k);
  std::vector<float> scales(g * n), dense(n * k);
  std::vector<int32_t> zeros(g * n), g_idx(k);
  std::vector<int64_t> perm(k);
  QuantizeStats stats;
  if (s.ok())
    s = quantize_weight(make_view(w.data(), DType::kFloat32, n, k), make_view(h.data(), DType::kFloat32, k, k), opt,
                        {make_view(codes.data(), DType::kUInt8, n, k), make_view(scales.data(), DType::kFloat32, g, n),
                         make_view(zeros.data(), DType::kInt32, g, n), make_view(g_idx.data(), DType::kInt32, k),
                         make_view(perm.data(), DType::kInt64, k)},
                        &stats);
  std::vector<int32_t> qweight(packed_words(k, opt.bits) * n), qzeros(g * packed_words(n, opt.bits));
  if (s.ok()) s = pack_qweight(make_view(codes.data(), DType::kUInt8, n, k), opt.bits,
                               make_view(qweight.data(), DType::kInt32, packed_words(k, opt.bits), n));
  if (s.ok()) s = pack_qzeros(make_view(zeros.data(), DType::kInt32, g, n), opt.bits, ZeroFormat::kV1,
                              make_view(qzeros.data(), DType::kInt32, g, packed_words(n, opt.bits)));
  if (s.ok()) s = dequantize(make_view(qweight.data(), DType::kInt32, packed_words(k, opt.bits), n),
                             make_view(qzeros.data(), DType::kInt32, g, packed_words(n, opt.bits)),
                             make_view(scales.data(), DType::kFloat32, g, n), make_view(g_idx.data(), DType::kInt32, k),
                             opt.bits, ZeroFormat::kV1, make_view(dense.data(), DType::kFloat32, n, k));
  // Inference: prepare the packed layer once, then y = x · Wᵀ with the fused CPU kernel.
  PreparedWeight prepared;
  if (s.ok())
    s = prepare_cpu_weight(make_view(qweight.data(), DType::kInt32, packed_words(k, opt.bits), n),
                           make_view(qzeros.data(), DType::kInt32, g, packed_words(n, opt.bits)),
                           make_view(scales.data(), DType::kFloat32, g, n), make_view(g_idx.data(), DType::kInt32, k),
                           opt.bits, ZeroFormat::kV1, &prepared);
  std::vector<float> y(4 * n);
  if (s.ok()) s = cpu_gemm(make_view(x.data(), DType::kFloat32, 4, k), prepared, nullptr, make_view(y.data(), DType::kFloat32, 4, n));
  if (!s.ok()) {
    std::fprintf(stderr, "gptqkit error: %s\n", s.message().c_str());
    return 1;
  }
  double err = 0.0, ref = 0.0;
  for (int64_t i = 0; i < n * k; ++i) err += (w[i] - dense[i]) * (w[i] - dense[i]), ref += w[i] * w[i];
  double gemm_err = 0.0;
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t j = 0; j < n; ++j) {
      double want = 0.0;
      for (int64_t i = 0; i < k; ++i) want += static_cast<double>(x[r * k + i]) * dense[j * k + i];
      gemm_err = std::max(gemm_err, std::fabs(want - y[r * n + j]));
    }
  std::printf("gptqkit %s consumer: loss %.4f, relative weight error %.4f, cpu_gemm (%s) max error %.2g\n",
              GPTQKIT_VERSION_STRING, stats.loss, std::sqrt(err / ref), cpu_kernel_name(), gemm_err);
  return std::sqrt(err / ref) < 0.2 && gemm_err < 1e-3 ? 0 : 1;
}
