// Every invalid input gets a Status naming the argument; nothing crashes and
// nothing is read out of bounds (run under ASan in CI's sanitizer build).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gptqkit/hessian.h"
#include "gptqkit/solver.h"

using namespace gptqkit;

namespace {

struct Fixture {
  int64_t n = 8, k = 32, g = 1;
  std::vector<float> w, h;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> zeros, g_idx;
  std::vector<int64_t> perm;
  QuantizeOptions o;
  Fixture() : w(n * k, 0.5f), h(k * k, 0.0f), codes(n * k), scales(n), zeros(n), g_idx(k), perm(k) {
    for (int64_t i = 0; i < k; ++i) h[i * k + i] = 1.0f;
    o.group_size = -1;
  }
  QuantizeOutputs out() {
    return {make_view(codes.data(), DType::kUInt8, n, k), make_view(scales.data(), DType::kFloat32, g, n),
            make_view(zeros.data(), DType::kInt32, g, n), make_view(g_idx.data(), DType::kInt32, k),
            make_view(perm.data(), DType::kInt64, k)};
  }
  Status run(TensorView wv, TensorView hv) { return quantize_weight(wv, hv, o, out(), nullptr); }
  Status run() { return run(make_view(w.data(), DType::kFloat32, n, k), make_view(h.data(), DType::kFloat32, k, k)); }
};

void expect_invalid(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message '" << s.message() << "' lacks '" << needle << "'";
}

}  // namespace

TEST(Errors, ValidBaselineSucceeds) {
  Fixture f;
  EXPECT_TRUE(f.run().ok());
}

TEST(Errors, ShapeMismatchBetweenWeightAndHessian) {
  Fixture f;
  std::vector<float> h2(16 * 16, 0.0f);
  expect_invalid(f.run(make_view(f.w.data(), DType::kFloat32, f.n, f.k), make_view(h2.data(), DType::kFloat32, 16, 16)),
                 "hessian");
}

TEST(Errors, WrongDtypes) {
  Fixture f;
  expect_invalid(f.run(make_view(f.w.data(), DType::kInt32, f.n, f.k), make_view(f.h.data(), DType::kFloat32, f.k, f.k)),
                 "weight: expected dtype");
  expect_invalid(f.run(make_view(f.w.data(), DType::kFloat32, f.n, f.k), make_view(f.h.data(), DType::kFloat16, f.k, f.k)),
                 "hessian: expected dtype");
}

TEST(Errors, BadOptions) {
  Fixture f;
  f.o.bits = 5;
  expect_invalid(f.run(), "bits");
  f.o.bits = 4;
  f.o.group_size = 0;
  expect_invalid(f.run(), "group_size");
  f.o.group_size = -2;
  expect_invalid(f.run(), "group_size");
  f.o.group_size = -1;
  f.o.block_size = 0;
  expect_invalid(f.run(), "block_size");
  f.o.block_size = 128;
  f.o.damp_percent = std::numeric_limits<double>::quiet_NaN();
  expect_invalid(f.run(), "damp_percent");
}

TEST(Errors, NonFiniteInputs) {
  Fixture f;
  f.w[17] = std::numeric_limits<float>::quiet_NaN();
  expect_invalid(f.run(), "weight: contains NaN or Inf");
  f.w[17] = 0.0f;
  f.h[3] = std::numeric_limits<float>::infinity();
  expect_invalid(f.run(), "hessian: contains NaN or Inf");
}

TEST(Errors, NonContiguousAndWrongRank) {
  Fixture f;
  TensorView wt = make_view(f.w.data(), DType::kFloat32, f.k, f.n);  // a transposed view
  wt.shape[0] = f.n; wt.shape[1] = f.k;
  wt.strides[0] = 1; wt.strides[1] = f.n;
  expect_invalid(f.run(wt, make_view(f.h.data(), DType::kFloat32, f.k, f.k)), "contiguous");
  expect_invalid(f.run(make_view(f.w.data(), DType::kFloat32, f.n * f.k), make_view(f.h.data(), DType::kFloat32, f.k, f.k)),
                 "weight");
  TensorView null_w = make_view(nullptr, DType::kFloat32, f.n, f.k);
  expect_invalid(f.run(null_w, make_view(f.h.data(), DType::kFloat32, f.k, f.k)), "null");
}

TEST(Errors, WrongOutputShapes) {
  Fixture f;
  auto out = f.out();
  out.scales = make_view(f.scales.data(), DType::kFloat32, 2, f.n / 2);
  EXPECT_EQ(quantize_weight(make_view(f.w.data(), DType::kFloat32, f.n, f.k), make_view(f.h.data(), DType::kFloat32, f.k, f.k),
                            f.o, out, nullptr).code(),
            StatusCode::kInvalidArgument);
}

TEST(Errors, HessianAccumulatorRejectsBadInput) {
  HessianAccumulator acc(16);
  std::vector<float> x(10 * 15, 1.0f);
  expect_invalid(acc.add_batch(make_view(x.data(), DType::kFloat32, 10, 15)), "x: expected shape");
  std::vector<int32_t> xi(10 * 16, 1);
  expect_invalid(acc.add_batch(make_view(xi.data(), DType::kInt32, 10, 16)), "x: expected dtype");
  std::vector<float> xn(2 * 16, std::numeric_limits<float>::quiet_NaN());
  expect_invalid(acc.add_batch(make_view(xn.data(), DType::kFloat32, 2, 16)), "NaN");
  EXPECT_EQ(acc.n_samples(), 0);  // nothing was accumulated by the failed calls
  HessianAccumulator bad(0);
  std::vector<float> y(4, 1.0f);
  expect_invalid(bad.add_batch(make_view(y.data(), DType::kFloat32, 1, 4)), "in_features");
}

// The non-finite scan works in blocks (checks.cpp): a single Inf or NaN anywhere, in every
// input dtype, must be found and reported at its flat index, and the rejected batch must
// leave the accumulator as it was.
TEST(Errors, HessianAccumulatorFindsEveryNonFiniteValue) {
  const int64_t k = 64, rows = 100;  // 6400 values: several scan blocks and a partial one
  const uint16_t fp16_inf = 0x7c00u, fp16_nan = 0x7e00u, bf16_inf = 0x7f80u, bf16_nan = 0x7fc0u;
  for (const int64_t at : {int64_t{0}, int64_t{2047}, int64_t{2048}, int64_t{5000}, rows * k - 1}) {
    HessianAccumulator acc(k, AccumulateType::kFloat64);
    std::vector<float> good(static_cast<size_t>(rows * k), 0.5f);
    ASSERT_TRUE(acc.add_batch(make_view(good.data(), DType::kFloat32, rows, k)).ok());
    const std::string where = "first at flat index " + std::to_string(at) + ")";
    for (const float special : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::quiet_NaN()}) {
      std::vector<float> x(good);
      x[static_cast<size_t>(at)] = special;
      expect_invalid(acc.add_batch(make_view(x.data(), DType::kFloat32, rows, k)), where);
    }
    for (const auto& [dtype, special] : {std::pair{DType::kFloat16, fp16_inf}, std::pair{DType::kFloat16, fp16_nan},
                                         std::pair{DType::kBFloat16, bf16_inf}, std::pair{DType::kBFloat16, bf16_nan}}) {
      std::vector<uint16_t> x16(static_cast<size_t>(rows * k), 0x3800u);  // 0.5 in fp16; a finite bf16 too
      x16[static_cast<size_t>(at)] = special;
      expect_invalid(acc.add_batch(make_view(x16.data(), dtype, rows, k)), where);
    }
    EXPECT_EQ(acc.n_samples(), rows);  // only the good batch was accumulated
  }
}
