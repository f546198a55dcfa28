// Tests for the CPU GEMM (gptqkit/cpu_gemm.h): prepare_cpu_weight + cpu_gemm
// must equal x · dequantize(...)ᵀ (+ bias), the dequantize oracle multiplied
// in float64, for every bit width, group sizes -1/32/128, act-order on and off,
// M in {1, 2, 3, 7, 16, 64, 257}, K and N that are not multiples of 8/32/128,
// float32/bfloat16/float16 inputs, both routes (fused kernel, dequantize +
// BLAS) and every kernel variant this CPU can run. Malformed arguments must
// be rejected with their names, before any memory is read.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gptqkit/cpu_gemm.h"
#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"
#include "packed_layer_fixture.h"

namespace {

using gptqkit_test::from_bits16;
using gptqkit_test::random_vector;
using gptqkit_test::RandomPackedLayer;
using gptqkit_test::to_bits16;

using gptqkit::CpuGemmOptions;
using gptqkit::CpuKernel;
using gptqkit::DType;
using gptqkit::make_view;
using gptqkit::packed_words;
using gptqkit::PreparedWeight;
using gptqkit::Status;
using gptqkit::StatusCode;
using gptqkit::TensorView;
using gptqkit::ZeroFormat;

std::vector<CpuKernel> runnable_kernels() {
  std::vector<CpuKernel> out;
  for (CpuKernel k : {CpuKernel::kGeneric, CpuKernel::kAvx2, CpuKernel::kAvx512})
    if (gptqkit::cpu_kernel_supported(k)) out.push_back(k);
  return out;
}

// A random packed layer with its dense oracle weight and its prepared form.
struct Layer : RandomPackedLayer {
  PreparedWeight prepared;

  Layer(int64_t n_, int64_t k_, int64_t group_size, int bits_, bool act_order, uint32_t seed,
        ZeroFormat format_ = ZeroFormat::kV1)
      : RandomPackedLayer(n_, k_, group_size, bits_, format_, act_order, seed) {
    const Status s = gptqkit::prepare_cpu_weight(qweight_view(), qzeros_view(), scales_view(), g_idx_view(), bits,
                                                 format, &prepared);
    EXPECT_TRUE(s.ok()) << s.message();
  }

  // y = x W^T + b in double, and sum_k |x w| + |b| (the scale of the rounding error) per output.
  void reference(const std::vector<float>& x, int64_t m, const std::vector<float>* bias, std::vector<double>* y,
                 std::vector<double>* mag) const {
    y->assign(static_cast<size_t>(m * n), 0.0);
    mag->assign(static_cast<size_t>(m * n), 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = bias ? (*bias)[j] : 0.0, abs = bias ? std::fabs((*bias)[j]) : 0.0;
        for (int64_t kk = 0; kk < k; ++kk) {
          const double p = static_cast<double>(x[i * k + kk]) * dense[j * k + kk];
          acc += p;
          abs += std::fabs(p);
        }
        (*y)[i * n + j] = acc;
        (*mag)[i * n + j] = abs;
      }
  }
};

// Runs cpu_gemm on x (rounded to `dtype`) with every runnable variant and
// both routes, and checks against the float64 reference: float32
// accumulation error (relative to sum |x w|) plus one rounding of a 16-bit
// output.
void check_layer(Layer& layer, int64_t m, DType dtype, bool with_bias, uint32_t seed) {
  const int64_t n = layer.n, k = layer.k;
  auto x = random_vector(static_cast<size_t>(m * k), seed);
  auto b = random_vector(static_cast<size_t>(n), seed + 1);
  std::vector<uint16_t> x16, b16;
  if (dtype != DType::kFloat32) {
    x16.resize(x.size());
    b16.resize(b.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = from_bits16(x16[i] = to_bits16(x[i], dtype), dtype);
    for (size_t i = 0; i < b.size(); ++i) b[i] = from_bits16(b16[i] = to_bits16(b[i], dtype), dtype);
  }
  std::vector<double> want, mag;
  layer.reference(x, m, with_bias ? &b : nullptr, &want, &mag);
  void* xd = dtype == DType::kFloat32 ? static_cast<void*>(x.data()) : static_cast<void*>(x16.data());
  void* bd = dtype == DType::kFloat32 ? static_cast<void*>(b.data()) : static_cast<void*>(b16.data());
  const TensorView xv = make_view(xd, dtype, m, k);
  const TensorView bv = make_view(bd, dtype, n);
  const double out_rel = dtype == DType::kBFloat16 ? 1.0 / 256 : dtype == DType::kFloat16 ? 1.0 / 2048 : 0.0;

  for (CpuKernel kernel : runnable_kernels()) {
    for (int64_t blas_min_rows : {int64_t{1} << 40, int64_t{0}}) {
      SCOPED_TRACE(std::string("kernel ") + gptqkit::cpu_kernel_name(kernel) +
                   (blas_min_rows == 0 ? ", dequantize + BLAS" : ", fused") + ", dtype " + gptqkit::dtype_name(dtype) +
                   ", bits " + std::to_string(layer.bits) + ", M " + std::to_string(m));
      CpuGemmOptions opt;
      opt.kernel = kernel;
      opt.blas_min_rows = blas_min_rows;
      std::vector<float> y32(static_cast<size_t>(m * n), -777.0f);
      std::vector<uint16_t> y16(static_cast<size_t>(m * n), 0x7e00);
      void* yd = dtype == DType::kFloat32 ? static_cast<void*>(y32.data()) : static_cast<void*>(y16.data());
      const Status s = gptqkit::cpu_gemm(xv, layer.prepared, with_bias ? &bv : nullptr, make_view(yd, dtype, m, n), opt);
      ASSERT_TRUE(s.ok()) << s.message();
      for (int64_t i = 0; i < m * n; ++i) {
        const double got = dtype == DType::kFloat32 ? y32[i] : from_bits16(y16[i], dtype);
        const double tol = 2e-6 * mag[i] + out_rel * std::fabs(want[i]) + (dtype == DType::kFloat16 ? 0x1p-24 : 1e-30);
        ASSERT_NEAR(got, want[i], tol) << "at row " << i / n << ", column " << i % n;
      }
    }
  }
}

struct Case {
  int bits;
  int64_t group_size;
  bool act_order;
};

class CpuGemmMatchesOracle : public ::testing::TestWithParam<Case> {};

TEST_P(CpuGemmMatchesOracle, OddShapesAllRowCounts) {
  const Case c = GetParam();
  Layer layer(77, 200, c.group_size, c.bits, c.act_order, 100u + c.bits * 7u + static_cast<uint32_t>(c.group_size));
  EXPECT_EQ(layer.prepared.in_features(), 200);
  EXPECT_EQ(layer.prepared.out_features(), 77);
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  int i = 0;
  for (int64_t m : {1, 2, 3, 7, 16, 64, 257}) {
    // float32 for every M; the 16-bit inputs on alternating M keep the run short.
    check_layer(layer, m, DType::kFloat32, m % 2 == 1, static_cast<uint32_t>(m));
    check_layer(layer, m, dtypes[1 + (i++ % 2)], m % 2 == 0, static_cast<uint32_t>(m) + 50u);
  }
}

TEST_P(CpuGemmMatchesOracle, LongK) {
  const Case c = GetParam();
  Layer layer(64, 4096, c.group_size, c.bits, c.act_order, 7u + c.bits);
  for (int64_t m : {1, 3, 16}) check_layer(layer, m, DType::kFloat32, true, static_cast<uint32_t>(m) + 9u);
  check_layer(layer, 2, DType::kBFloat16, false, 3u);
}

std::vector<Case> all_cases() {
  std::vector<Case> out;
  for (int bits : {2, 3, 4, 8})
    for (int64_t gs : {int64_t{-1}, int64_t{32}, int64_t{128}})
      for (bool act : {false, true})
        if (!(gs == -1 && act)) out.push_back(Case{bits, gs, act});  // act-order is moot with one group
  return out;
}

INSTANTIATE_TEST_SUITE_P(AllLayouts, CpuGemmMatchesOracle, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "bits" + std::to_string(info.param.bits) + "_g" +
                                  (info.param.group_size < 0 ? std::string("all")
                                                             : std::to_string(info.param.group_size)) +
                                  (info.param.act_order ? "_act" : "");
                         });

TEST(CpuGemm, GroupSizesThatSplitWordsAndV2Zeros) {
  // Group sizes that are not multiples of any word (padding inside the
  // layout), tiny K and N, v2 zeros including 0.
  for (int bits : {2, 3, 4, 8}) {
    for (int64_t gs : {int64_t{5}, int64_t{12}, int64_t{33}}) {
      Layer layer(19, 70, gs, bits, gs == 12, 40u + bits, ZeroFormat::kV2);
      EXPECT_EQ(layer.prepared.reordered(), true);
      check_layer(layer, 5, DType::kFloat32, true, 2u);
    }
    Layer tiny(1, 1, -1, bits, false, 3u);
    check_layer(tiny, 3, DType::kFloat32, true, 4u);
  }
}

TEST(CpuGemm, ChosenKernelAndNames) {
  const std::string name = gptqkit::cpu_kernel_name();
  EXPECT_TRUE(name == "generic" || name == "avx2" || name == "avx512") << name;
  EXPECT_TRUE(gptqkit::cpu_kernel_supported(CpuKernel::kGeneric));
  EXPECT_TRUE(gptqkit::cpu_kernel_built(CpuKernel::kGeneric));
  for (CpuKernel k : {CpuKernel::kAvx2, CpuKernel::kAvx512})
    if (gptqkit::cpu_kernel_supported(k)) EXPECT_TRUE(gptqkit::cpu_kernel_built(k));
  if (gptqkit::cpu_kernel_supported(CpuKernel::kAvx512) && std::getenv("GPTQKIT_CPU_KERNEL") == nullptr)
    EXPECT_EQ(name, "avx512");
}

TEST(CpuGemm, UnsupportedKernelIsRefused) {
  Layer layer(16, 32, 32, 4, false, 1u);
  std::vector<float> x(32, 1.0f), y(16);
  for (CpuKernel k : {CpuKernel::kAvx2, CpuKernel::kAvx512}) {
    if (gptqkit::cpu_kernel_supported(k)) continue;
    CpuGemmOptions opt;
    opt.kernel = k;
    const Status s = gptqkit::cpu_gemm(make_view(x.data(), DType::kFloat32, 1, 32), layer.prepared, nullptr,
                                       make_view(y.data(), DType::kFloat32, 1, 16), opt);
    EXPECT_EQ(s.code(), StatusCode::kUnsupported) << s.message();
    EXPECT_NE(s.message().find("options.kernel"), std::string::npos) << s.message();
  }
}

TEST(CpuGemm, EmptyExtentsAndMoves) {
  Layer layer(16, 32, 32, 4, false, 2u);
  std::vector<float> x(1), y(1, 5.0f);
  EXPECT_TRUE(gptqkit::cpu_gemm(make_view(x.data(), DType::kFloat32, 0, 32), layer.prepared, nullptr,
                                make_view(y.data(), DType::kFloat32, 0, 16))
                  .ok());
  PreparedWeight moved = std::move(layer.prepared);
  EXPECT_TRUE(layer.prepared.empty());
  EXPECT_FALSE(moved.empty());
  EXPECT_EQ(moved.bits(), 4);
  EXPECT_EQ(moved.groups(), 1);
  EXPECT_GT(moved.size_bytes(), 0);
  // About the size of the packed weight, not dense: 16 x 32 4-bit codes = 256 bytes + metadata.
  EXPECT_LT(moved.size_bytes(), 2048);
}

void expect_invalid(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message '" << s.message() << "' lacks '" << needle << "'";
}

TEST(CpuGemm, PrepareRejectsBadArguments) {
  Layer layer(16, 64, 32, 4, false, 3u);
  PreparedWeight out;
  auto prep = [&](const TensorView& q, const TensorView& z, const TensorView& s, const TensorView& g, int bits) {
    return gptqkit::prepare_cpu_weight(q, z, s, g, bits, ZeroFormat::kV1, &out);
  };
  const TensorView q = layer.qweight_view(), z = layer.qzeros_view(), s = layer.scales_view(), g = layer.g_idx_view();
  expect_invalid(prep(q, z, s, g, 5), "bits");
  expect_invalid(prep(q, z, s, g, 8), "qweight: expected shape [16, 16]");
  TensorView qf = q;
  qf.dtype = DType::kFloat32;
  expect_invalid(prep(qf, z, s, g, 4), "qweight: expected dtype int32");
  TensorView sbad = s;
  sbad.dtype = DType::kInt32;
  expect_invalid(prep(q, z, sbad, g, 4), "scales: expected dtype");
  expect_invalid(prep(q, z, make_view(layer.scales.data(), DType::kFloat32, 2, 15), g, 4), "scales: expected shape");
  expect_invalid(prep(q, make_view(layer.qzeros.data(), DType::kInt32, 1, 1), s, g, 4), "qzeros: expected shape");
  expect_invalid(prep(q, z, s, make_view(layer.g_idx.data(), DType::kInt32, 50), 4), "qweight: expected shape [7, 16]");
  auto gbad = layer.g_idx;
  gbad[5] = 9;
  expect_invalid(prep(q, z, s, make_view(gbad.data(), DType::kInt32, 64), 4), "g_idx[5] = 9 is out of range");
  TensorView gnull = g;
  gnull.data = nullptr;
  expect_invalid(prep(q, z, s, gnull, 4), "g_idx: null data pointer");
  TensorView qt = q;
  std::swap(qt.strides[0], qt.strides[1]);
  expect_invalid(prep(qt, z, s, g, 4), "qweight: expected a C-contiguous");
  EXPECT_TRUE(out.empty());  // untouched by every failure
  expect_invalid(gptqkit::prepare_cpu_weight(q, z, s, g, 4, static_cast<ZeroFormat>(7), &out), "format");
  expect_invalid(gptqkit::prepare_cpu_weight(q, z, s, g, 4, ZeroFormat::kV1, nullptr), "out");
}

TEST(CpuGemm, GemmRejectsBadArguments) {
  Layer layer(16, 64, 32, 4, false, 4u);
  std::vector<float> x(3 * 64), y(3 * 16), b(16);
  std::vector<uint16_t> y16(3 * 16);
  std::vector<int32_t> xi(3 * 64);
  const TensorView xv = make_view(x.data(), DType::kFloat32, 3, 64);
  const TensorView yv = make_view(y.data(), DType::kFloat32, 3, 16);
  EXPECT_TRUE(gptqkit::cpu_gemm(xv, layer.prepared, nullptr, yv).ok());
  expect_invalid(gptqkit::cpu_gemm(make_view(x.data(), DType::kFloat32, 3, 63), layer.prepared, nullptr, yv),
                 "x: expected shape [*, 64]");
  expect_invalid(gptqkit::cpu_gemm(make_view(xi.data(), DType::kInt32, 3, 64), layer.prepared, nullptr, yv),
                 "x: expected dtype");
  expect_invalid(gptqkit::cpu_gemm(make_view(x.data(), DType::kFloat32, 192), layer.prepared, nullptr, yv),
                 "x: expected a 2-d array");
  expect_invalid(gptqkit::cpu_gemm(xv, layer.prepared, nullptr, make_view(y16.data(), DType::kFloat16, 3, 16)),
                 "y: expected the dtype of x");
  expect_invalid(gptqkit::cpu_gemm(xv, layer.prepared, nullptr, make_view(y.data(), DType::kFloat32, 2, 16)),
                 "y: expected shape [3, 16]");
  const TensorView b15 = make_view(b.data(), DType::kFloat32, 15);
  expect_invalid(gptqkit::cpu_gemm(xv, layer.prepared, &b15, yv), "bias: expected shape [16]");
  expect_invalid(gptqkit::cpu_gemm(xv, layer.prepared, nullptr, make_view(x.data(), DType::kFloat32, 3, 16)),
                 "y: overlaps the memory of x");
  PreparedWeight empty;
  expect_invalid(gptqkit::cpu_gemm(xv, empty, nullptr, yv), "weight: the PreparedWeight is empty");
}

}  // namespace
