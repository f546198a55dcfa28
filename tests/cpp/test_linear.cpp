// Tests for quantized_linear (gptqkit/linear.h): the result must equal
// x · dequantize(...)ᵀ + bias computed with a naive triple loop, for every
// bit width, both zero formats, act-order g_idx, 16-bit inputs, several
// tiles; and every malformed argument must be rejected with its name.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gptqkit/linear.h"
#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"
#include "packed_layer_fixture.h"

namespace {

using gptqkit_test::from_bits16;
using gptqkit_test::random_vector;
using gptqkit_test::RandomPackedLayer;
using gptqkit_test::to_bits16;

using gptqkit::DType;
using gptqkit::make_view;
using gptqkit::packed_words;
using gptqkit::Status;
using gptqkit::StatusCode;
using gptqkit::TensorView;
using gptqkit::ZeroFormat;

// A random packed layer plus its dense oracle weight from dequantize().
struct Layer : RandomPackedLayer {
  using RandomPackedLayer::RandomPackedLayer;

  Status run(const TensorView& x, const TensorView* bias, const TensorView& y) {
    return gptqkit::quantized_linear(x, qweight_view(), qzeros_view(), scales_view(), g_idx_view(), bias, bits,
                                     format, y);
  }

  // Naive y = x W^T + b in double.
  std::vector<double> reference(const std::vector<float>& x, int64_t m, const std::vector<float>* bias) const {
    std::vector<double> y(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = bias ? (*bias)[j] : 0.0;
        for (int64_t kk = 0; kk < k; ++kk) acc += static_cast<double>(x[i * k + kk]) * dense[j * k + kk];
        y[i * n + j] = acc;
      }
    return y;
  }
};

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double rel) {
  ASSERT_EQ(got.size(), want.size());
  double scale = 1e-6;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], rel * scale) << "at flat index " << i;
}

void expect_invalid(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message '" << s.message() << "' lacks '" << needle << "'";
}

struct Case {
  int bits;
  ZeroFormat format;
  bool act_order;
  bool with_bias;
};

class LinearMatchesReference : public ::testing::TestWithParam<Case> {};

TEST_P(LinearMatchesReference, Float32) {
  const Case c = GetParam();
  const int64_t m = 7, n = 45, k = 100;  // N, K not multiples of 32; partial last group
  Layer layer(n, k, 32, c.bits, c.format, c.act_order, 11u + c.bits);
  auto x = random_vector(static_cast<size_t>(m * k), 5);
  auto b = random_vector(static_cast<size_t>(n), 6);
  std::vector<float> y(static_cast<size_t>(m * n), -777.0f);
  const TensorView bv = make_view(b.data(), DType::kFloat32, n);
  const Status s = layer.run(make_view(x.data(), DType::kFloat32, m, k), c.with_bias ? &bv : nullptr,
                             make_view(y.data(), DType::kFloat32, m, n));
  ASSERT_TRUE(s.ok()) << s.message();
  expect_close(y, layer.reference(x, m, c.with_bias ? &b : nullptr), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    AllLayouts, LinearMatchesReference,
    ::testing::Values(Case{2, ZeroFormat::kV1, false, true}, Case{3, ZeroFormat::kV1, false, false},
                      Case{4, ZeroFormat::kV1, false, true}, Case{8, ZeroFormat::kV1, false, false},
                      Case{2, ZeroFormat::kV2, true, false}, Case{3, ZeroFormat::kV2, true, true},
                      Case{4, ZeroFormat::kV2, true, false}, Case{8, ZeroFormat::kV2, true, true},
                      Case{4, ZeroFormat::kV1, true, true}, Case{3, ZeroFormat::kV1, true, false}));

TEST(Linear, SixteenBitInputsAndOutputs) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    const int64_t m = 4, n = 40, k = 96;
    Layer layer(n, k, 32, 4, ZeroFormat::kV1, true, 3);
    auto xf = random_vector(static_cast<size_t>(m * k), 8);
    auto bf = random_vector(static_cast<size_t>(n), 9);
    std::vector<uint16_t> x16(xf.size()), b16(bf.size()), y16(static_cast<size_t>(m * n));
    for (size_t i = 0; i < xf.size(); ++i) {
      x16[i] = to_bits16(xf[i], dtype);
      xf[i] = from_bits16(x16[i], dtype);  // the reference sees the rounded input
    }
    for (size_t i = 0; i < bf.size(); ++i) {
      b16[i] = to_bits16(bf[i], dtype);
      bf[i] = from_bits16(b16[i], dtype);
    }
    const TensorView bv = make_view(b16.data(), dtype, n);
    const Status s = layer.run(make_view(x16.data(), dtype, m, k), &bv, make_view(y16.data(), dtype, m, n));
    ASSERT_TRUE(s.ok()) << s.message();
    std::vector<float> y(y16.size());
    for (size_t i = 0; i < y.size(); ++i) y[i] = from_bits16(y16[i], dtype);
    // One rounding of the output: half an ulp relative (bf16: 2^-8, fp16: 2^-11).
    expect_close(y, layer.reference(xf, m, &bf), dtype == DType::kBFloat16 ? 8e-3 : 1e-3);
  }
}

TEST(Linear, Float16ScalesMatchFloat32Scales) {
  const int64_t m = 3, n = 33, k = 64;
  Layer layer(n, k, 16, 4, ZeroFormat::kV1, false, 21);
  std::vector<uint16_t> s16(layer.scales.size());
  for (size_t i = 0; i < s16.size(); ++i) {
    s16[i] = to_bits16(layer.scales[i], DType::kFloat16);
    layer.scales[i] = from_bits16(s16[i], DType::kFloat16);
  }
  auto x = random_vector(static_cast<size_t>(m * k), 1);
  std::vector<float> y32(static_cast<size_t>(m * n)), y16(static_cast<size_t>(m * n));
  ASSERT_TRUE(layer.run(make_view(x.data(), DType::kFloat32, m, k), nullptr,
                        make_view(y32.data(), DType::kFloat32, m, n)).ok());
  const Status s = gptqkit::quantized_linear(make_view(x.data(), DType::kFloat32, m, k), layer.qweight_view(),
                                             layer.qzeros_view(), make_view(s16.data(), DType::kFloat16, layer.g, n),
                                             layer.g_idx_view(), nullptr, 4, ZeroFormat::kV1,
                                             make_view(y16.data(), DType::kFloat32, m, n));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(y32, y16);
}

TEST(Linear, ManyTilesWithActOrderAndThreeBits) {
  // K large enough that the 16 MiB scratch holds fewer rows than N: several
  // tiles, the last one partial.
  const int64_t m = 2, n = 150, k = 1 << 16;
  Layer layer(n, k, 128, 3, ZeroFormat::kV1, true, 77);
  auto x = random_vector(static_cast<size_t>(m * k), 2);
  auto b = random_vector(static_cast<size_t>(n), 4);
  std::vector<float> y(static_cast<size_t>(m * n));
  const TensorView bv = make_view(b.data(), DType::kFloat32, n);
  const Status s = layer.run(make_view(x.data(), DType::kFloat32, m, k), &bv, make_view(y.data(), DType::kFloat32, m, n));
  ASSERT_TRUE(s.ok()) << s.message();
  expect_close(y, layer.reference(x, m, &b), 1e-5);
}

TEST(Linear, SingleRowAndPerChannelGroup) {
  const int64_t m = 1, n = 1, k = 33;
  Layer layer(n, k, -1, 8, ZeroFormat::kV2, false, 5);
  auto x = random_vector(static_cast<size_t>(k), 3);
  std::vector<float> y(1);
  ASSERT_TRUE(layer.run(make_view(x.data(), DType::kFloat32, m, k), nullptr, make_view(y.data(), DType::kFloat32, m, n)).ok());
  expect_close(y, layer.reference(x, m, nullptr), 1e-5);
}

TEST(Linear, EmptyBatchIsANoOp) {
  Layer layer(8, 32, 32, 4, ZeroFormat::kV1, false, 1);
  std::vector<float> x(1), y(1, 5.0f);
  EXPECT_TRUE(layer.run(make_view(x.data(), DType::kFloat32, 0, 32), nullptr, make_view(y.data(), DType::kFloat32, 0, 8)).ok());
  EXPECT_EQ(y[0], 5.0f);
}

// ---------------------------------------------------------------------------
// Invalid arguments: each is named in the message.

struct Bad {
  Layer layer{16, 64, 32, 4, ZeroFormat::kV1, false, 9};
  int64_t m = 3;
  std::vector<float> x = random_vector(static_cast<size_t>(3 * 64), 1);
  std::vector<float> b = std::vector<float>(16, 0.5f);
  std::vector<float> y = std::vector<float>(3 * 16);
  TensorView xv() { return make_view(x.data(), DType::kFloat32, m, 64); }
  TensorView yv() { return make_view(y.data(), DType::kFloat32, m, 16); }
};

TEST(LinearErrors, BaselineIsValid) {
  Bad f;
  const TensorView bv = make_view(f.b.data(), DType::kFloat32, 16);
  EXPECT_TRUE(f.layer.run(f.xv(), &bv, f.yv()).ok());
}

TEST(LinearErrors, InputWidthDiffersFromGIdx) {
  Bad f;
  expect_invalid(f.layer.run(make_view(f.x.data(), DType::kFloat32, 6, 32), nullptr,
                             make_view(f.y.data(), DType::kFloat32, 6, 16)),
                 "x: expected shape [*, 64]");
}

TEST(LinearErrors, OutputShapeAndDtype) {
  Bad f;
  expect_invalid(f.layer.run(f.xv(), nullptr, make_view(f.y.data(), DType::kFloat32, 2, 16)), "y: expected shape [3, 16]");
  expect_invalid(f.layer.run(f.xv(), nullptr, make_view(f.y.data(), DType::kFloat16, 3, 16)), "y: expected the dtype of x");
}

TEST(LinearErrors, UnsupportedInputDtype) {
  Bad f;
  expect_invalid(f.layer.run(make_view(f.x.data(), DType::kInt32, 3, 64), nullptr, f.yv()), "x: expected dtype");
}

TEST(LinearErrors, QweightRowsForOtherBits) {
  Bad f;
  // 4-bit rows given to an 8-bit call: packed_words(64, 8) = 16 != 8.
  const Status s = gptqkit::quantized_linear(f.xv(), f.layer.qweight_view(), f.layer.qzeros_view(),
                                             f.layer.scales_view(), f.layer.g_idx_view(), nullptr, 8,
                                             ZeroFormat::kV1, f.yv());
  expect_invalid(s, "qweight: expected shape [16, 16]");
}

TEST(LinearErrors, BadBitsAndFormat) {
  Bad f;
  expect_invalid(gptqkit::quantized_linear(f.xv(), f.layer.qweight_view(), f.layer.qzeros_view(), f.layer.scales_view(),
                                           f.layer.g_idx_view(), nullptr, 5, ZeroFormat::kV1, f.yv()),
                 "bits");
  expect_invalid(gptqkit::quantized_linear(f.xv(), f.layer.qweight_view(), f.layer.qzeros_view(), f.layer.scales_view(),
                                           f.layer.g_idx_view(), nullptr, 4, static_cast<ZeroFormat>(7), f.yv()),
                 "format");
}

TEST(LinearErrors, QzerosAndScalesShapes) {
  Bad f;
  std::vector<int32_t> qz(3 * 2);
  expect_invalid(gptqkit::quantized_linear(f.xv(), f.layer.qweight_view(), make_view(qz.data(), DType::kInt32, 3, 2),
                                           f.layer.scales_view(), f.layer.g_idx_view(), nullptr, 4, ZeroFormat::kV1,
                                           f.yv()),
                 "qzeros: expected shape [2, 2]");
  std::vector<float> sc(2 * 15);
  expect_invalid(gptqkit::quantized_linear(f.xv(), f.layer.qweight_view(), f.layer.qzeros_view(),
                                           make_view(sc.data(), DType::kFloat32, 2, 15), f.layer.g_idx_view(), nullptr,
                                           4, ZeroFormat::kV1, f.yv()),
                 "scales: expected shape [*, 16]");
  std::vector<int32_t> sci(2 * 16);
  expect_invalid(gptqkit::quantized_linear(f.xv(), f.layer.qweight_view(), f.layer.qzeros_view(),
                                           make_view(sci.data(), DType::kInt32, 2, 16), f.layer.g_idx_view(), nullptr,
                                           4, ZeroFormat::kV1, f.yv()),
                 "scales: expected dtype");
}

TEST(LinearErrors, GIdxOutOfRange) {
  Bad f;
  f.layer.g_idx[10] = 2;  // G = 2
  expect_invalid(f.layer.run(f.xv(), nullptr, f.yv()), "g_idx[10] = 2 is out of range [0, 2)");
  f.layer.g_idx[10] = -1;
  expect_invalid(f.layer.run(f.xv(), nullptr, f.yv()), "g_idx[10] = -1");
}

TEST(LinearErrors, BiasShapeAndDtype) {
  Bad f;
  const TensorView short_bias = make_view(f.b.data(), DType::kFloat32, 15);
  expect_invalid(f.layer.run(f.xv(), &short_bias, f.yv()), "bias: expected shape [16]");
  std::vector<int32_t> ib(16);
  const TensorView int_bias = make_view(ib.data(), DType::kInt32, 16);
  expect_invalid(f.layer.run(f.xv(), &int_bias, f.yv()), "bias: expected dtype");
}

TEST(LinearErrors, NonContiguousAndDevice) {
  Bad f;
  TensorView x = f.xv();
  x.strides[0] = 1;
  x.strides[1] = 3;
  expect_invalid(f.layer.run(x, nullptr, f.yv()), "x: expected a C-contiguous");
  TensorView y = f.yv();
  y.device.type = gptqkit::DeviceType::kCUDA;
  expect_invalid(f.layer.run(f.xv(), nullptr, y), "y: expected a CPU tensor");
}

TEST(LinearErrors, OutputAliasingInput) {
  Bad f;
  std::vector<float> buf(3 * 64);
  const TensorView x = make_view(buf.data(), DType::kFloat32, 3, 64);
  const TensorView y = make_view(buf.data() + 8, DType::kFloat32, 3, 16);
  expect_invalid(f.layer.run(x, nullptr, y), "y: overlaps the memory of x");
}

}  // namespace
