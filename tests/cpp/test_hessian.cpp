#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gptqkit/hessian.h"
#include "test_util.h"

using namespace gptqkit;
using namespace gptqkit_test;

namespace {

std::vector<double> read_hessian(const HessianAccumulator& acc) {
  const int64_t k = acc.in_features();
  std::vector<double> h(static_cast<size_t>(k * k));
  EXPECT_TRUE(acc.hessian(make_view(h.data(), DType::kFloat64, k, k)).ok());
  return h;
}

uint16_t to_bf16(float f) {  // truncation is fine: the reference uses the same rounded values
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);
}

}  // namespace

TEST(Hessian, MatchesFloat64ReferenceAcrossBatches) {
  const int64_t k = 96, rows = 700;
  auto x = correlated_activations(rows, k, 1);
  for (auto acc_type : {AccumulateType::kFloat32, AccumulateType::kFloat64}) {
    HessianAccumulator acc(k, acc_type);
    // Uneven batches, including an empty one.
    const int64_t cuts[] = {0, 1, 1, 130, 512, rows};
    for (int i = 0; i + 1 < 6; ++i) {
      const int64_t r0 = cuts[i], r1 = cuts[i + 1];
      ASSERT_TRUE(acc.add_batch(make_view(x.data() + r0 * k, DType::kFloat32, r1 - r0, k)).ok());
    }
    EXPECT_EQ(acc.n_samples(), rows);
    EXPECT_LT(rel_frobenius(read_hessian(acc), naive_hessian(x, rows, k)), 1e-5);
  }
}

TEST(Hessian, LargeBatchIsChunkedCorrectly) {
  const int64_t k = 24, rows = 5000;  // above the internal 2048-row chunk
  auto x = correlated_activations(rows, k, 2);
  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    xb[i] = to_bf16(x[i]);
    uint32_t bits = static_cast<uint32_t>(xb[i]) << 16;
    std::memcpy(&x[i], &bits, 4);  // reference sees the same bf16 values
  }
  HessianAccumulator acc(k);
  ASSERT_TRUE(acc.add_batch(make_view(xb.data(), DType::kBFloat16, rows, k)).ok());
  EXPECT_LT(rel_frobenius(read_hessian(acc), naive_hessian(x, rows, k)), 1e-5);
}

TEST(Hessian, BatchOrderInvariant) {
  const int64_t k = 40, rows = 300;
  auto x = correlated_activations(rows, k, 3);
  HessianAccumulator a(k), b(k);
  for (int64_t r = 0; r < rows; r += 50) a.add_batch(make_view(x.data() + r * k, DType::kFloat32, 50, k));
  for (int64_t r = rows - 50; r >= 0; r -= 50) b.add_batch(make_view(x.data() + r * k, DType::kFloat32, 50, k));
  EXPECT_LT(rel_frobenius(read_hessian(a), read_hessian(b)), 1e-6);
}

TEST(Hessian, ThreeDimensionalInputAndReset) {
  const int64_t k = 16;
  auto x = correlated_activations(6, k, 4);
  HessianAccumulator acc(k);
  TensorView v = make_view(x.data(), DType::kFloat32, 6, k);
  v.ndim = 3;
  v.shape[0] = 2; v.shape[1] = 3; v.shape[2] = k;
  v.strides[0] = 3 * k; v.strides[1] = k; v.strides[2] = 1;
  ASSERT_TRUE(acc.add_batch(v).ok());
  EXPECT_EQ(acc.n_samples(), 6);
  EXPECT_LT(rel_frobenius(read_hessian(acc), naive_hessian(x, 6, k)), 1e-5);
  acc.reset();
  EXPECT_EQ(acc.n_samples(), 0);
  auto h = read_hessian(acc);
  EXPECT_TRUE(std::all_of(h.begin(), h.end(), [](double v) { return v == 0.0; }));
}

// Large updates are split into column panels over gptqkit's threads (hessian.cpp,
// PanelPlan): every width (panels that do not divide K, fewer panels than threads)
// and thread count must give the float64 reference.
TEST(Hessian, ThreadedPanelsMatchFloat64Reference) {
  const char* saved = std::getenv("GPTQKIT_NUM_THREADS");
  const std::string restore = saved ? saved : "";
  for (const int64_t k : {130, 300, 577}) {
    const int64_t rows = 1024;  // k * k * rows above the threshold for threading
    auto x = correlated_activations(rows, k, 7);
    const auto reference = naive_hessian(x, rows, k);
    for (const char* threads : {"1", "2", "3", "5"}) {
      setenv("GPTQKIT_NUM_THREADS", threads, 1);
      HessianAccumulator acc(k);
      ASSERT_TRUE(acc.add_batch(make_view(x.data(), DType::kFloat32, rows, k)).ok());
      EXPECT_LT(rel_frobenius(read_hessian(acc), reference), 1e-5) << "K=" << k << " threads=" << threads;
    }
  }
  if (saved) {
    setenv("GPTQKIT_NUM_THREADS", restore.c_str(), 1);
  } else {
    unsetenv("GPTQKIT_NUM_THREADS");
  }
}
