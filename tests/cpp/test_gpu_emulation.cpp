// The GPU backend, run on the CPU: every source of cuda/src (kernels and host
// code, unmodified) compiled as C++ against the fiber emulation of
// tests/gpu_emulation, with the core's routing to it (the public API on GPU
// tensors), and compared with the CPU paths on the same inputs. Built twice (CMake): with
// 32-wide warps and the NVIDIA tensor-core paths (the mma Hessian), and with
// 64-wide wavefronts and the portable paths (what HIP builds for CDNA).
//
// What this shows: the kernels' indexing, barriers, warp collectives,
// fragment layouts and the host orchestration (allocation, retries, the
// lazy-block loop, error paths) compute what the CPU path computes, and no
// kernel touches memory past the end of a device buffer (guard pages). What
// it cannot show: speed, or compiler and hardware behaviour beyond the
// emulated semantics; the GPU tests (tests/python/test_gpu_solver.py) do.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "emu_device.h"
#include "gptqkit/gpu_gemm.h"
#include "gptqkit/hessian.h"
#include "gptqkit/pack.h"
#include "gptqkit/solver.h"
#include "gpu_solver_api.h"
#include "half.h"
#include "packed_layer_fixture.h"
#include "test_util.h"

namespace {

using gptqkit::DType;
using gptqkit::DeviceType;
using gptqkit::QuantizeOptions;
using gptqkit::QuantizeOutputs;
using gptqkit::QuantizeStats;
using gptqkit::Status;
using gptqkit::TensorView;
using gptqkit_test::correlated_activations;
using gptqkit_test::naive_hessian;
using gptqkit_test::random_normal;

constexpr gptqkit::Device kGpu{DeviceType::kCUDA, 0};

// An array in emulated device memory, filled from / read back to the host.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n), p_(static_cast<T*>(emu_device::alloc(n * sizeof(T)))) {}
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    std::memcpy(p_, host.data(), host.size() * sizeof(T));
  }
  ~DeviceArray() { emu_device::free(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* data() { return p_; }
  std::vector<T> host() const { return std::vector<T>(p_, p_ + n_); }
  TensorView view(DType dtype, int64_t rows, int64_t cols) {
    TensorView v = gptqkit::make_view(p_, dtype, rows, cols);
    v.device = kGpu;
    return v;
  }
  TensorView view(DType dtype, int64_t length) {
    TensorView v = gptqkit::make_view(p_, dtype, length);
    v.device = kGpu;
    return v;
  }

 private:
  size_t n_;
  T* p_;
};

std::vector<float> as_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

// 16-bit copies of x (round to nearest even) and their exact float values.
std::vector<uint16_t> to_16bit(const std::vector<float>& x, DType dtype, std::vector<float>* rounded) {
  std::vector<uint16_t> out(x.size());
  rounded->resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if (dtype == DType::kFloat16) {
      out[i] = gptqkit::float_to_fp16(x[i]);
      (*rounded)[i] = gptqkit::fp16_to_float(out[i]);
    } else {
      out[i] = gptqkit::float_to_bf16(x[i]);
      (*rounded)[i] = gptqkit::bf16_to_float(out[i]);
    }
  }
  return out;
}

std::string target() {
  return "warp " + std::to_string(emu_device::warp_size()) +
         (emu_device::tensor_cores() ? ", tensor cores" : ", portable path");
}

// ---------------------------------------------------------------- Hessian
class EmuHessian : public ::testing::TestWithParam<std::tuple<DType, int64_t>> {};

TEST_P(EmuHessian, TwoBatchesMatchFloat64Reference) {
  const auto [dtype, k] = GetParam();
  const int64_t rows1 = 150, rows2 = 97;  // not multiples of the 16 / 32-row stages
  std::vector<float> x1 = correlated_activations(rows1, k, 11), x2 = correlated_activations(rows2, k, 12);
  void* state = nullptr;
  ASSERT_TRUE(gptqkit::gpu::alloc_persistent(kGpu, gptqkit::gpu::hessian_state_bytes(k), &state).ok());
  std::vector<float> r1 = x1, r2 = x2;
  auto add = [&](const std::vector<float>& x, int64_t rows, double alpha, double beta, std::vector<float>* used) {
    if (dtype == DType::kFloat32) {
      DeviceArray<float> d(x);
      return gptqkit::gpu::hessian_add_batch(d.view(dtype, rows, k), state, k, alpha, beta, nullptr);
    }
    DeviceArray<uint16_t> d(to_16bit(x, dtype, used));
    return gptqkit::gpu::hessian_add_batch(d.view(dtype, rows, k), state, k, alpha, beta, nullptr);
  };
  // The accumulator's running average: H = 2/n1 X1'X1, then H * n1/n + 2/n X2'X2.
  const double n = static_cast<double>(rows1 + rows2);
  ASSERT_TRUE(add(x1, rows1, 2.0 / rows1, 0.0, &r1).ok());
  ASSERT_TRUE(add(x2, rows2, 2.0 / n, rows1 / n, &r2).ok());
  DeviceArray<double> out(static_cast<size_t>(k * k));
  DeviceArray<float> out32(static_cast<size_t>(k * k));
  ASSERT_TRUE(gptqkit::gpu::hessian_write(state, k, out.view(DType::kFloat64, k, k), nullptr).ok());
  ASSERT_TRUE(gptqkit::gpu::hessian_write(state, k, out32.view(DType::kFloat32, k, k), nullptr).ok());
  gptqkit::gpu::free_persistent(kGpu, state, gptqkit::gpu::hessian_state_bytes(k));

  std::vector<double> ref = naive_hessian(r1, rows1, k), ref2 = naive_hessian(r2, rows2, k);
  for (size_t i = 0; i < ref.size(); ++i) ref[i] = ref[i] * rows1 / n + ref2[i] * rows2 / n;
  const std::vector<double> h = out.host();
  const std::vector<float> h32 = out32.host();
  EXPECT_LT(gptqkit_test::rel_frobenius(h, ref), 1e-5) << target();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      ASSERT_EQ(h[i * k + j], h[j * k + i]) << "not symmetric at " << i << ", " << j;
      ASSERT_EQ(static_cast<float>(h[i * k + j]), h32[i * k + j]);
    }
}

INSTANTIATE_TEST_SUITE_P(Emulated, EmuHessian,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                                            // 77: unaligned rows (the older mma kernel);
                                            // 200, 256, 264: the pipelined kernel, whole and partial tiles
                                            ::testing::Values<int64_t>(1, 77, 200, 256, 264)));

TEST(EmuHessianErrors, NonFiniteInputIsReportedWhenRead) {
  const int64_t k = 40, rows = 20;
  std::vector<float> x = random_normal(static_cast<size_t>(rows * k), 3);
  x[5 * k + 7] = NAN;
  void* state = nullptr;
  ASSERT_TRUE(gptqkit::gpu::alloc_persistent(kGpu, gptqkit::gpu::hessian_state_bytes(k), &state).ok());
  DeviceArray<float> d(x);
  EXPECT_TRUE(gptqkit::gpu::hessian_add_batch(d.view(DType::kFloat32, rows, k), state, k, 0.1, 0.0, nullptr).ok());
  DeviceArray<float> out(static_cast<size_t>(k * k));
  const Status s = gptqkit::gpu::hessian_write(state, k, out.view(DType::kFloat32, k, k), nullptr);
  gptqkit::gpu::free_persistent(kGpu, state, gptqkit::gpu::hessian_state_bytes(k));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("flat index " + std::to_string(5 * k + 7)), std::string::npos) << s.message();
}

// ---------------------------------------------------------------- Cholesky
// H of K features from correlated activations (fp32, as the accumulator gives it).
std::vector<float> test_hessian(int64_t k, uint32_t seed, int64_t rows = 0) {
  if (rows == 0) rows = 2 * k + 16;
  return as_float(naive_hessian(correlated_activations(rows, k, seed), rows, k));
}

// The CPU path's damped factor of H^-1 (damp 1 %, up to 8 retries).
std::vector<float> cpu_inverse_factor(std::vector<float>& h, int64_t k, QuantizeStats* stats) {
  std::vector<float> u(static_cast<size_t>(k * k));
  const Status s = gptqkit::inverse_hessian_upper_factor(gptqkit::make_view(h.data(), DType::kFloat32, k, k), 0.01, 8,
                                                         gptqkit::make_view(u.data(), DType::kFloat32, k, k), stats);
  EXPECT_TRUE(s.ok()) << s.message();
  return u;
}

class EmuCholesky : public ::testing::TestWithParam<int64_t> {};

TEST_P(EmuCholesky, InverseFactorMatchesCpu) {
  const int64_t k = GetParam();
  std::vector<float> h = test_hessian(k, 21);
  QuantizeStats cpu_stats, gpu_stats;
  const std::vector<float> u_cpu = cpu_inverse_factor(h, k, &cpu_stats);
  DeviceArray<float> hd(h), ud(static_cast<size_t>(k * k));
  const Status s = gptqkit::gpu::inverse_hessian_upper_factor(hd.view(DType::kFloat32, k, k), 0.01, 8,
                                                              ud.view(DType::kFloat32, k, k), &gpu_stats, nullptr);
  ASSERT_TRUE(s.ok()) << s.message();
  const std::vector<float> u = ud.host();
  float scale = 0.0f;
  for (float v : u_cpu) scale = std::max(scale, std::fabs(v));
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      ASSERT_NEAR(u[i * k + j], u_cpu[i * k + j], 1e-5f * scale) << "U[" << i << ", " << j << "], " << target();
  EXPECT_EQ(gpu_stats.damp_attempts, cpu_stats.damp_attempts);
  EXPECT_EQ(gpu_stats.damp_lambda, cpu_stats.damp_lambda);
}

// 1 and 63..65 straddle one 64 x 64 tile; 200 and 300 have partial last tiles.
INSTANTIATE_TEST_SUITE_P(Emulated, EmuCholesky, ::testing::Values<int64_t>(1, 63, 64, 65, 200, 300));

TEST(EmuCholeskyRetry, SameDampingLadderAsCpu) {
  // Rank-deficient H (fewer samples than features) minus a little: the first
  // damping fails, a later one succeeds, on both paths at the same attempt.
  const int64_t k = 96;
  std::vector<float> h = test_hessian(k, 5, 40);
  double mean = 0.0;
  for (int64_t i = 0; i < k; ++i) mean += h[i * k + i];
  mean /= static_cast<double>(k);
  for (int64_t i = 0; i < k; ++i) h[i * k + i] -= static_cast<float>(0.02 * mean);
  QuantizeStats cpu_stats, gpu_stats;
  const std::vector<float> u_cpu = cpu_inverse_factor(h, k, &cpu_stats);
  ASSERT_GT(cpu_stats.damp_attempts, 1);
  DeviceArray<float> hd(h), ud(static_cast<size_t>(k * k));
  ASSERT_TRUE(gptqkit::gpu::inverse_hessian_upper_factor(hd.view(DType::kFloat32, k, k), 0.01, 8,
                                                         ud.view(DType::kFloat32, k, k), &gpu_stats, nullptr)
                  .ok());
  EXPECT_EQ(gpu_stats.damp_attempts, cpu_stats.damp_attempts);
  EXPECT_EQ(gpu_stats.damp_percent_used, cpu_stats.damp_percent_used);

  // With no retries allowed both give up with NotPositiveDefinite.
  const Status s = gptqkit::gpu::inverse_hessian_upper_factor(hd.view(DType::kFloat32, k, k), 0.01, 0,
                                                              ud.view(DType::kFloat32, k, k), &gpu_stats, nullptr);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kNotPositiveDefinite) << s.message();
  EXPECT_NE(s.message().find("not positive definite"), std::string::npos) << s.message();
}

// ---------------------------------------------------------------- the solver
struct SolverCase {
  const char* name;
  int bits;
  int64_t group_size;
  bool sym, desc_act, static_groups;
  int clip_steps = 0;
  bool clip_weighted = true;
  int64_t block_size = 128;
  DType weight_dtype = DType::kFloat32;
  bool hessian_fp64 = false;
  bool dead_inputs = false;
  bool act_group_aware = false;
};

using SolverRun = gptqkit_test::Quantized;

QuantizeOptions options_of(const SolverCase& c) {
  QuantizeOptions o;
  o.bits = c.bits;
  o.group_size = c.group_size;
  o.sym = c.sym;
  o.desc_act = c.desc_act;
  o.static_groups = c.static_groups;
  o.act_group_aware = c.act_group_aware;
  o.clip_steps = c.clip_steps;
  o.clip_hessian_weighted = c.clip_weighted;
  o.block_size = c.block_size;
  return o;
}

// The weight in its dtype (raw bytes) and the float values both paths see.
std::vector<uint8_t> weight_bytes(const std::vector<float>& w, DType dtype) {
  std::vector<uint8_t> bytes(w.size() * gptqkit::dtype_size(dtype));
  for (size_t i = 0; i < w.size(); ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(&bytes[4 * i], &w[i], 4);
    } else if (dtype == DType::kFloat64) {
      const double d = w[i];
      std::memcpy(&bytes[8 * i], &d, 8);
    } else {
      const uint16_t h = dtype == DType::kFloat16 ? gptqkit::float_to_fp16(w[i]) : gptqkit::float_to_bf16(w[i]);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
  return bytes;
}

// One random problem (W [40, 200], H from correlated activations) solved by
// both paths. 40 rows: 5 blocks of 8 warps on 32-wide warps, a partial
// block on 64-wide ones; K = 200: partial last groups and lazy blocks.
class SolverProblem {
 public:
  explicit SolverProblem(const SolverCase& c, int64_t n = 40, int64_t k = 200) : c_(c), n_(n), k_(k) {
    w_ = random_normal(static_cast<size_t>(n_ * k_), 7, 0.05f);
    h32_ = test_hessian(k_, 9);
    if (c.dead_inputs)
      for (int64_t j : {int64_t{3}, k_ / 3, k_ - 1}) {
        for (int64_t i = 0; i < k_; ++i) h32_[i * k_ + j] = h32_[j * k_ + i] = 0.0f;
      }
    h64_.assign(h32_.begin(), h32_.end());
    wbytes_ = weight_bytes(w_, c.weight_dtype);
  }

  const void* hessian_data() const {
    return c_.hessian_fp64 ? static_cast<const void*>(h64_.data()) : static_cast<const void*>(h32_.data());
  }
  size_t hessian_bytes() const { return h32_.size() * (c_.hessian_fp64 ? 8 : 4); }
  DType hessian_dtype() const { return c_.hessian_fp64 ? DType::kFloat64 : DType::kFloat32; }
  int64_t groups() const { return c_.group_size > 0 ? gptqkit::num_groups(k_, c_.group_size) : 1; }

  SolverRun run_cpu() {
    const SolverCase& c = c_;
    SolverRun r;
    r.codes.resize(n_ * k_);
    r.scales.resize(groups() * n_);
    r.zeros.resize(groups() * n_);
    r.g_idx.resize(k_);
    r.perm.resize(k_);
    QuantizeOutputs out{gptqkit::make_view(r.codes.data(), DType::kUInt8, n_, k_),
                        gptqkit::make_view(r.scales.data(), DType::kFloat32, groups(), n_),
                        gptqkit::make_view(r.zeros.data(), DType::kInt32, groups(), n_),
                        gptqkit::make_view(r.g_idx.data(), DType::kInt32, k_),
                        gptqkit::make_view(r.perm.data(), DType::kInt64, k_)};
    const Status s =
        gptqkit::quantize_weight(gptqkit::make_view(wbytes_.data(), c.weight_dtype, n_, k_),
                                 gptqkit::make_view(const_cast<void*>(hessian_data()), hessian_dtype(), k_, k_),
                                 options_of(c), out, &r.stats);
    EXPECT_TRUE(s.ok()) << s.message();
    return r;
  }

  Status run_gpu(SolverRun* r) {
    const SolverCase& c = c_;
    DeviceArray<uint8_t> w(wbytes_);
    DeviceArray<uint8_t> h(std::vector<uint8_t>(static_cast<const uint8_t*>(hessian_data()),
                                                static_cast<const uint8_t*>(hessian_data()) + hessian_bytes()));
    DeviceArray<uint8_t> codes(n_ * k_);
    DeviceArray<float> scales(groups() * n_);
    DeviceArray<int32_t> zeros(groups() * n_), g_idx(k_);
    DeviceArray<int64_t> perm(k_);
    QuantizeOutputs out{codes.view(DType::kUInt8, n_, k_), scales.view(DType::kFloat32, groups(), n_),
                        zeros.view(DType::kInt32, groups(), n_), g_idx.view(DType::kInt32, k_),
                        perm.view(DType::kInt64, k_)};
    TensorView wv = w.view(c.weight_dtype, n_, k_), hv = h.view(hessian_dtype(), k_, k_);
    const Status s = gptqkit::gpu::quantize_weight(wv, hv, options_of(c), out, &r->stats, nullptr);
    r->codes = codes.host();
    r->scales = scales.host();
    r->zeros = zeros.host();
    r->g_idx = g_idx.host();
    r->perm = perm.host();
    return s;
  }

  const SolverCase c_;
  const int64_t n_, k_;
  std::vector<float> w_, h32_;
  std::vector<double> h64_;
  std::vector<uint8_t> wbytes_;
};

class EmuSolver : public ::testing::TestWithParam<SolverCase> {};

TEST_P(EmuSolver, MatchesCpu) {
  const SolverCase& c = GetParam();
  SolverProblem problem(c);
  const SolverRun cpu = problem.run_cpu();
  const int64_t live_before = emu_device::live_bytes();
  SolverRun gpu;
  const Status s = problem.run_gpu(&gpu);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(emu_device::live_bytes(), live_before) << "the solver did not free its scratch";

  EXPECT_EQ(gpu.perm, cpu.perm);
  EXPECT_EQ(gpu.g_idx, cpu.g_idx);
  int64_t same = 0;
  for (size_t i = 0; i < cpu.codes.size(); ++i) same += gpu.codes[i] == cpu.codes[i] ? 1 : 0;
  const double agree = static_cast<double>(same) / static_cast<double>(cpu.codes.size());
  // The bar is 99 %; only rounding ties of the differently ordered
  // trailing update (tiled fp32 vs BLAS) may differ.
  EXPECT_GE(agree, 0.99) << c.name << ", " << target();
  // Grids of groups that start after the first lazy block come from weights
  // the trailing update changed, so their scales may differ in the last
  // bits; a zero point moves only at a rounding tie.
  int64_t close_scales = 0, same_zeros = 0;
  for (size_t i = 0; i < cpu.scales.size(); ++i) {
    close_scales += std::fabs(gpu.scales[i] - cpu.scales[i]) <= 1e-5f * std::fabs(cpu.scales[i]) ? 1 : 0;
    same_zeros += gpu.zeros[i] == cpu.zeros[i] ? 1 : 0;
  }
  EXPECT_GE(static_cast<double>(close_scales), 0.99 * static_cast<double>(cpu.scales.size())) << c.name;
  EXPECT_GE(static_cast<double>(same_zeros), 0.99 * static_cast<double>(cpu.zeros.size())) << c.name;
  EXPECT_NEAR(gpu.stats.loss, cpu.stats.loss, 5e-3 * cpu.stats.loss) << c.name << ", " << target();
  EXPECT_EQ(gpu.stats.dead_columns, cpu.stats.dead_columns);
  EXPECT_EQ(gpu.stats.damp_attempts, cpu.stats.damp_attempts);
  RecordProperty("identical_codes", std::to_string(agree));
}

const SolverCase kSolverCases[] = {
    {"4bit_g128_sym", 4, 128, true, false, false},
    {"4bit_g128_asym_act", 4, 128, false, true, false},
    {"4bit_g128_act_static", 4, 128, true, true, true},
    {"4bit_g32_asym", 4, 32, false, false, false},
    {"3bit_g32_sym_act", 3, 32, true, true, false},
    {"3bit_channel_asym", 3, -1, false, false, false},
    {"2bit_g32_asym_act_static", 2, 32, false, true, true},
    {"8bit_g128_sym", 8, 128, true, false, false},
    {"8bit_channel_act", 8, -1, true, true, false},
    {"4bit_g128_act_clip", 4, 128, true, true, false, 16},
    {"3bit_g32_asym_clip_unweighted", 3, 32, false, false, false, 8, false},
    {"4bit_g64_block64_asym", 4, 64, false, false, false, 0, true, 64},
    {"4bit_g128_block256", 4, 128, true, false, false, 0, true, 256},
    {"4bit_g50_block48_act", 4, 50, false, true, false, 0, true, 48},
    {"4bit_fp16_weight", 4, 128, true, false, false, 0, true, 128, DType::kFloat16},
    {"4bit_bf16_weight_act", 4, 128, false, true, false, 0, true, 128, DType::kBFloat16},
    {"4bit_fp64_weight_and_hessian", 4, 128, true, false, false, 0, true, 128, DType::kFloat64, true},
    {"4bit_dead_inputs_act", 4, 32, false, true, false, 0, true, 128, DType::kFloat32, false, true},
    // Group-aware order: groups stay whole but run out of order (K = 200,
    // so a partial group of 8 or 40 goes last); with lazy blocks of 48 a
    // group starts inside one block and continues in the next.
    {"4bit_g32_asym_group_aware", 4, 32, false, false, false, 0, true, 128, DType::kFloat32, false, false, true},
    {"3bit_g64_block48_group_aware_dead", 3, 64, true, false, false, 0, true, 48, DType::kFloat32, false, true,
     true},
    {"4bit_g32_group_aware_static_clip", 4, 32, false, false, true, 8, true, 128, DType::kFloat32, false, false,
     true},
};

INSTANTIATE_TEST_SUITE_P(Emulated, EmuSolver, ::testing::ValuesIn(kSolverCases),
                         [](const ::testing::TestParamInfo<SolverCase>& info) { return std::string(info.param.name); });

TEST(EmuSolverErrors, OutOfMemoryAnywhereFreesEverything) {
  // Allocation number i fails, for every i the solver makes: a clear error,
  // and every scratch buffer of the failed call is freed.
  SolverProblem problem(kSolverCases[0]);
  constexpr int kOwnArrays = 7;  // run_gpu's device arrays: w, h, codes, scales, zeros, g_idx, perm
  for (int skip = kOwnArrays;; ++skip) {
    SolverRun r;
    const int64_t live_before = emu_device::live_bytes();
    emu_device::fail_allocation_after(skip);
    const Status s = problem.run_gpu(&r);
    emu_device::fail_allocation_after(-1);
    EXPECT_EQ(emu_device::live_bytes(), live_before);
    if (s.ok()) {
      EXPECT_GT(skip, kOwnArrays + 5) << "the solver allocates its scratch";
      break;
    }
    EXPECT_EQ(s.code(), gptqkit::StatusCode::kInternal);
    EXPECT_NE(s.message().find("out of GPU memory"), std::string::npos) << s.message();
    if (skip == kOwnArrays)  // the solver's first allocation
      EXPECT_NE(s.message().find("the check results"), std::string::npos) << s.message();
    ASSERT_LT(skip, 40) << "the solver never finished";
  }
}

TEST(EmuSolverErrors, BadInputIsRejectedBeforeAnyWork) {
  const int64_t n = 8, k = 64;
  std::vector<float> w = random_normal(static_cast<size_t>(n * k), 1), h = test_hessian(k, 2);
  w[3 * k + 5] = INFINITY;
  DeviceArray<float> wd(w), hd(h), scales(k / 32 * n);
  DeviceArray<uint8_t> codes(n * k);
  DeviceArray<int32_t> zeros(k / 32 * n), g_idx(k);
  DeviceArray<int64_t> perm(k);
  QuantizeOutputs out{codes.view(DType::kUInt8, n, k), scales.view(DType::kFloat32, k / 32, n),
                      zeros.view(DType::kInt32, k / 32, n), g_idx.view(DType::kInt32, k),
                      perm.view(DType::kInt64, k)};
  QuantizeOptions o;
  o.group_size = 32;
  const int64_t live_before = emu_device::live_bytes();
  Status s = gptqkit::gpu::quantize_weight(wd.view(DType::kFloat32, n, k), hd.view(DType::kFloat32, k, k), o, out,
                                           nullptr, nullptr);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("flat index " + std::to_string(3 * k + 5)), std::string::npos) << s.message();
  EXPECT_EQ(emu_device::live_bytes(), live_before);

  w[3 * k + 5] = 0.0f;
  DeviceArray<float> ok_w(w);
  // A lazy block wider than the sweep kernel holds in registers (K > 256).
  const int64_t wide = 264;
  DeviceArray<float> wide_w(std::vector<float>(static_cast<size_t>(n * wide), 0.5f));
  DeviceArray<float> wide_h(test_hessian(wide, 4));
  DeviceArray<uint8_t> wide_codes(n * wide);
  DeviceArray<float> wide_scales(9 * n);
  DeviceArray<int32_t> wide_zeros(9 * n), wide_g_idx(wide);
  DeviceArray<int64_t> wide_perm(wide);
  QuantizeOutputs wide_out{wide_codes.view(DType::kUInt8, n, wide), wide_scales.view(DType::kFloat32, 9, n),
                           wide_zeros.view(DType::kInt32, 9, n), wide_g_idx.view(DType::kInt32, wide),
                           wide_perm.view(DType::kInt64, wide)};
  o.block_size = 512;
  s = gptqkit::gpu::quantize_weight(wide_w.view(DType::kFloat32, n, wide), wide_h.view(DType::kFloat32, wide, wide),
                                    o, wide_out, nullptr, nullptr);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kUnsupported) << s.message();
  EXPECT_NE(s.message().find("block_size"), std::string::npos) << s.message();

  o.block_size = 128;
  TensorView cpu_hessian = gptqkit::make_view(h.data(), DType::kFloat32, k, k);
  s = gptqkit::gpu::quantize_weight(ok_w.view(DType::kFloat32, n, k), cpu_hessian, o, out, nullptr, nullptr);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("hessian"), std::string::npos) << s.message();
}

TEST(EmuSolverShapes, OddShapesMatchCpu) {
  // Warps that leave the sweep early (N not a multiple of the rows per
  // block), K below one tile, a single column, a partial last lazy block.
  const SolverCase c{"odd", 4, 32, false, true, false, 0, true, 16};
  for (const auto& [n, k] : std::vector<std::pair<int64_t, int64_t>>{{7, 33}, {1, 1}, {1, 65}, {9, 1}, {13, 129}}) {
    SolverProblem problem(c, n, k);
    const SolverRun cpu = problem.run_cpu();
    SolverRun gpu;
    const Status s = problem.run_gpu(&gpu);
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_EQ(gpu.codes, cpu.codes) << n << " x " << k << ", " << target();
    EXPECT_EQ(gpu.perm, cpu.perm);
    EXPECT_NEAR(gpu.stats.loss, cpu.stats.loss, 5e-3 * cpu.stats.loss + 1e-12);
  }
}

// ---------------------------------------------------------------- packing
class EmuPack : public ::testing::TestWithParam<int> {};

TEST_P(EmuPack, WordsMatchCpu) {
  const int bits = GetParam();
  const int64_t n = 37, k = 200, g = 3;  // K, N not multiples of 32: partial chunks, 3-bit straddling
  std::vector<uint8_t> codes(static_cast<size_t>(n * k));
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>((i * 2654435761u >> 7) % (1u << bits));
  const int64_t wk = gptqkit::packed_words(k, bits), wn = gptqkit::packed_words(n, bits);
  std::vector<int32_t> q_cpu(static_cast<size_t>(wk * n));
  ASSERT_TRUE(gptqkit::pack_qweight(gptqkit::make_view(codes.data(), DType::kUInt8, n, k), bits,
                                    gptqkit::make_view(q_cpu.data(), DType::kInt32, wk, n))
                  .ok());
  DeviceArray<uint8_t> cd(codes);
  DeviceArray<int32_t> qd(static_cast<size_t>(wk * n));
  ASSERT_TRUE(gptqkit::gpu::pack_qweight(cd.view(DType::kUInt8, n, k), bits, qd.view(DType::kInt32, wk, n), nullptr)
                  .ok());
  EXPECT_EQ(qd.host(), q_cpu);

  for (const bool v1 : {true, false}) {
    std::vector<int32_t> zeros(static_cast<size_t>(g * n));
    for (size_t i = 0; i < zeros.size(); ++i) zeros[i] = static_cast<int32_t>(v1 + (i * 40503u >> 3) % (1u << bits));
    if (v1) zeros[5] = 1 << bits;  // v1 stores zero - 1: 2^bits is storable
    std::vector<int32_t> z_cpu(static_cast<size_t>(g * wn));
    const auto format = v1 ? gptqkit::ZeroFormat::kV1 : gptqkit::ZeroFormat::kV2;
    ASSERT_TRUE(gptqkit::pack_qzeros(gptqkit::make_view(zeros.data(), DType::kInt32, g, n), bits, format,
                                     gptqkit::make_view(z_cpu.data(), DType::kInt32, g, wn))
                    .ok());
    DeviceArray<int32_t> zd(zeros), zq(static_cast<size_t>(g * wn));
    ASSERT_TRUE(
        gptqkit::gpu::pack_qzeros(zd.view(DType::kInt32, g, n), bits, v1, zq.view(DType::kInt32, g, wn), nullptr)
            .ok());
    EXPECT_EQ(zq.host(), z_cpu) << (v1 ? "v1" : "v2");
  }

  // An out-of-range code: an error naming it, and qweight left untouched.
  codes[3 * k + 17] = static_cast<uint8_t>(1u << bits);
  if (bits < 8) {
    DeviceArray<uint8_t> bad(codes);
    std::vector<int32_t> before = qd.host();
    const Status s =
        gptqkit::gpu::pack_qweight(bad.view(DType::kUInt8, n, k), bits, qd.view(DType::kInt32, wk, n), nullptr);
    EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("[n=3, k=17]"), std::string::npos) << s.message();
    EXPECT_EQ(qd.host(), before);
  }
}

INSTANTIATE_TEST_SUITE_P(Emulated, EmuPack, ::testing::Values(2, 3, 4, 8));


// ---------------------------------------------------------------- the public API on GPU tensors
// The core's routing (hessian.cpp, solver.cpp, pack.cpp, gpu_gemm.cpp built
// with GPTQKIT_HAS_GPU): the device is chosen by where the tensors live.
namespace api {

using gptqkit_test::from_bits16;
using gptqkit_test::to_bits16;

TEST(EmuPublicApi, BackendIsReported) {
  EXPECT_TRUE(gptqkit::gpu_backend_available());
  EXPECT_STREQ(gptqkit::gpu_backend_name(), "cuda");
}

TEST(EmuPublicApi, HessianAccumulatorOnGpuMatchesCpu) {
  const int64_t k = 70;
  const int64_t live_before = emu_device::live_bytes();
  {
    gptqkit::HessianAccumulator on_gpu(k), on_cpu(k);
    for (const int64_t rows : {50, 31}) {
      std::vector<float> x = correlated_activations(rows, k, static_cast<uint32_t>(rows)), rounded;
      std::vector<uint16_t> x16 = to_16bit(x, DType::kFloat16, &rounded);
      DeviceArray<uint16_t> xd(x16);
      ASSERT_TRUE(on_cpu.add_batch(gptqkit::make_view(x16.data(), DType::kFloat16, rows, k)).ok());
      const Status s = on_gpu.add_batch(xd.view(DType::kFloat16, rows, k));
      ASSERT_TRUE(s.ok()) << s.message();
    }
    std::vector<double> h_cpu(static_cast<size_t>(k * k));
    ASSERT_TRUE(on_cpu.hessian(gptqkit::make_view(h_cpu.data(), DType::kFloat64, k, k)).ok());
    DeviceArray<double> hd(static_cast<size_t>(k * k));
    ASSERT_TRUE(on_gpu.hessian(hd.view(DType::kFloat64, k, k)).ok());
    EXPECT_LT(gptqkit_test::rel_frobenius(hd.host(), h_cpu), 1e-5) << target();

    // One accumulator never mixes devices.
    std::vector<float> x(static_cast<size_t>(4 * k), 0.5f);
    Status s = on_gpu.add_batch(gptqkit::make_view(x.data(), DType::kFloat32, 4, k));
    EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("cannot mix devices"), std::string::npos) << s.message();
    s = on_gpu.hessian(gptqkit::make_view(h_cpu.data(), DType::kFloat64, k, k));
    EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument) << s.message();
    gptqkit::HessianAccumulator fp64(k, gptqkit::AccumulateType::kFloat64);
    DeviceArray<float> xd(x);
    EXPECT_EQ(fp64.add_batch(xd.view(DType::kFloat32, 4, k)).code(), gptqkit::StatusCode::kUnsupported);
  }
  EXPECT_EQ(emu_device::live_bytes(), live_before) << "the accumulator's device buffer was not freed";
}

TEST(EmuPublicApi, QuantizeWeightRunsWhereTheTensorsLive) {
  const int64_t n = 24, k = 96;
  std::vector<float> w = random_normal(static_cast<size_t>(n * k), 31, 0.05f), h = test_hessian(k, 32);
  QuantizeOptions o;
  o.group_size = 32;
  o.desc_act = true;
  std::vector<uint8_t> codes(n * k);
  std::vector<float> scales(3 * n);
  std::vector<int32_t> zeros(3 * n), g_idx(k);
  std::vector<int64_t> perm(k);
  QuantizeStats cpu_stats, gpu_stats;
  ASSERT_TRUE(gptqkit::quantize_weight(gptqkit::make_view(w.data(), DType::kFloat32, n, k),
                                       gptqkit::make_view(h.data(), DType::kFloat32, k, k), o,
                                       {gptqkit::make_view(codes.data(), DType::kUInt8, n, k),
                                        gptqkit::make_view(scales.data(), DType::kFloat32, 3, n),
                                        gptqkit::make_view(zeros.data(), DType::kInt32, 3, n),
                                        gptqkit::make_view(g_idx.data(), DType::kInt32, k),
                                        gptqkit::make_view(perm.data(), DType::kInt64, k)},
                                       &cpu_stats)
                  .ok());
  DeviceArray<float> wd(w), hd(h), sd(3 * n);
  DeviceArray<uint8_t> cd(n * k);
  DeviceArray<int32_t> zd(3 * n), gd(k);
  DeviceArray<int64_t> pd(k);
  const QuantizeOutputs out{cd.view(DType::kUInt8, n, k), sd.view(DType::kFloat32, 3, n), zd.view(DType::kInt32, 3, n),
                            gd.view(DType::kInt32, k), pd.view(DType::kInt64, k)};
  gptqkit::gpu_solver_memory(true);
  const Status s = gptqkit::quantize_weight(wd.view(DType::kFloat32, n, k), hd.view(DType::kFloat32, k, k), o, out,
                                            &gpu_stats);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(cd.host(), codes);
  EXPECT_EQ(pd.host(), perm);
  EXPECT_NEAR(gpu_stats.loss, cpu_stats.loss, 5e-3 * cpu_stats.loss);
  const gptqkit::GpuSolverMemory mem = gptqkit::gpu_solver_memory();
  EXPECT_GE(mem.peak_bytes, 2 * k * k * 8) << "the float64 factorization buffers are counted";
  EXPECT_EQ(mem.current_bytes, 0);

  // Every tensor of one call on one device.
  const Status mixed = gptqkit::quantize_weight(wd.view(DType::kFloat32, n, k),
                                                gptqkit::make_view(h.data(), DType::kFloat32, k, k), o, out, nullptr);
  EXPECT_EQ(mixed.code(), gptqkit::StatusCode::kInvalidArgument) << mixed.message();

  // Packing runs where the codes live.
  const int64_t words = gptqkit::packed_words(k, 4);
  std::vector<int32_t> q_cpu(static_cast<size_t>(words * n));
  ASSERT_TRUE(gptqkit::pack_qweight(gptqkit::make_view(codes.data(), DType::kUInt8, n, k), 4,
                                    gptqkit::make_view(q_cpu.data(), DType::kInt32, words, n))
                  .ok());
  DeviceArray<int32_t> qd(static_cast<size_t>(words * n));
  ASSERT_TRUE(gptqkit::pack_qweight(cd.view(DType::kUInt8, n, k), 4, qd.view(DType::kInt32, words, n)).ok());
  EXPECT_EQ(qd.host(), q_cpu);
}

// ---------------------------------------------------------------- the GEMM
// gpu_gemm_shape + prepare_gpu_weight (host staging, copy to the device) +
// gpu_quantized_matmul (the 4-bit mma kernel on the tensor-core target at
// any M, with and without a workspace; else GEMV for M <= 8 and the tiled
// kernel above)
// and gpu_dequantize_prepared, against gptqkit::dequantize's dense weight.
struct EmuPreparedLayer {
  gptqkit_test::RandomPackedLayer layer;
  gptqkit::GpuGemmShape shape;
  DeviceArray<int32_t> qweight, chunk_group, perm;
  DeviceArray<uint16_t> sz;
  gptqkit::GpuPreparedView w;

  // sz_slack: spare elements after sz, for views shifted inside its buffer.
  EmuPreparedLayer(int64_t n, int64_t k, int64_t group_size, int bits, bool act_order, DType dtype, uint32_t seed,
                   size_t sz_slack = 0)
      : layer(n, k, group_size, bits, gptqkit::ZeroFormat::kV1, act_order, seed),
        shape(shape_of(layer, n, bits)),
        qweight(static_cast<size_t>(shape.chunks * bits * shape.padded_out)),
        chunk_group(static_cast<size_t>(shape.chunks)),
        perm(static_cast<size_t>(std::max<int64_t>(shape.positions, 1))),
        sz(static_cast<size_t>(shape.groups * shape.padded_out * 2) + sz_slack) {
    w.qweight = qweight.view(DType::kInt32, shape.chunks * bits, shape.padded_out);
    w.sz = sz.view(dtype, shape.groups, shape.padded_out);
    w.sz.ndim = 3;  // [G, Np, 2]
    w.sz.shape[2] = 2;
    w.sz.strides[0] = shape.padded_out * 2;
    w.sz.strides[1] = 2;
    w.sz.strides[2] = 1;
    w.chunk_group = chunk_group.view(DType::kInt32, shape.chunks);
    if (shape.reordered) w.perm = perm.view(DType::kInt32, shape.positions);
    w.bits = bits;
    w.in_features = k;
    w.out_features = n;
    const Status s = gptqkit::prepare_gpu_weight(layer.qweight_view(), layer.qzeros_view(), layer.scales_view(),
                                                 layer.g_idx_view(), bits, layer.format, w, nullptr);
    EXPECT_TRUE(s.ok()) << s.message();
  }

  static gptqkit::GpuGemmShape shape_of(gptqkit_test::RandomPackedLayer& l, int64_t n, int bits) {
    gptqkit::GpuGemmShape s;
    EXPECT_TRUE(gptqkit::gpu_gemm_shape(l.g_idx_view(), n, l.g, bits, &s).ok());
    return s;
  }

  // y = x W^T + bias for M random rows (with a workspace of the size the
  // library asks for, or none), checked against the float64 product with the
  // oracle's dense weight: one rounding of x W and of y. Returns the
  // workspace size it was asked for; y stays in last_y.
  std::vector<uint16_t> last_y;
  size_t check_matmul(int64_t m, bool with_workspace, uint32_t seed, const TensorView* tile_counters = nullptr) {
    const int64_t n = w.out_features, k = w.in_features;
    const DType dtype = w.sz.dtype;
    const double u = dtype == DType::kFloat16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
    std::vector<uint16_t> bias16(static_cast<size_t>(n));
    std::vector<float> bias(static_cast<size_t>(n));
    const std::vector<float> bias_values = gptqkit_test::random_vector(static_cast<size_t>(n), 5);
    for (int64_t j = 0; j < n; ++j) {
      bias16[j] = to_bits16(bias_values[j], dtype);
      bias[j] = from_bits16(bias16[j], dtype);
    }
    DeviceArray<uint16_t> bias_d(bias16);
    TensorView bias_view = bias_d.view(dtype, n);
    const std::vector<float> xv = gptqkit_test::random_vector(static_cast<size_t>(m * k), seed);
    std::vector<uint16_t> x16(xv.size());
    std::vector<float> x(xv.size());
    for (size_t i = 0; i < xv.size(); ++i) {
      x16[i] = to_bits16(xv[i], dtype);
      x[i] = from_bits16(x16[i], dtype);
    }
    DeviceArray<uint16_t> xd(x16), yd(static_cast<size_t>(m * n));
    size_t bytes = 0;
    Status s = gptqkit::gpu_matmul_workspace_bytes(xd.view(dtype, m, k), w, &bytes);
    EXPECT_TRUE(s.ok()) << s.message();
    DeviceArray<unsigned char> ws(std::max<size_t>(bytes, 1));
    TensorView ws_view = ws.view(DType::kUInt8, static_cast<int64_t>(bytes));
    s = gptqkit::gpu_quantized_matmul(xd.view(dtype, m, k), w, &bias_view, yd.view(dtype, m, n),
                                      with_workspace && bytes > 0 ? &ws_view : nullptr, tile_counters, nullptr);
    EXPECT_TRUE(s.ok()) << s.message();
    last_y = yd.host();
    const std::vector<uint16_t>& y = last_y;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double ref = bias[j], mag = 0.0;
        for (int64_t c = 0; c < k; ++c) {
          const double p = static_cast<double>(x[r * k + c]) * layer.dense[j * k + c];
          ref += p;
          mag += std::fabs(p);
        }
        const double got = from_bits16(y[r * n + j], dtype);
        if (!(std::fabs(got - ref) <= 4 * u * mag + 2 * u * std::fabs(ref) + 1e-6)) {
          ADD_FAILURE() << "M = " << m << (with_workspace ? ", workspace " + std::to_string(bytes) : ", no workspace")
                        << ": y[" << r << ", " << j << "] = " << got << ", expected " << ref << ", " << target();
          return bytes;
        }
      }
    return bytes;
  }
};

class EmuGemm : public ::testing::TestWithParam<std::tuple<int, int64_t, bool, DType>> {};

TEST_P(EmuGemm, MatmulAndDequantizeMatchTheOracle) {
  const auto [bits, group_size, act_order, dtype] = GetParam();
  const int64_t n = 200, k = 160;  // N padded to 256 columns; K = 5 chunks
  EmuPreparedLayer p(n, k, group_size, bits, act_order, dtype, 77);
  EXPECT_EQ(p.shape.reordered, act_order);
  for (const int64_t m : {1, 3, 8, 9, 33}) {
    p.check_matmul(m, false, static_cast<uint32_t>(m));
    p.check_matmul(m, true, static_cast<uint32_t>(m));
  }

  DeviceArray<uint16_t> dense(static_cast<size_t>(n * k));
  const Status s = gptqkit::gpu_dequantize_prepared(p.w, dense.view(dtype, n, k), nullptr);
  ASSERT_TRUE(s.ok()) << s.message();
  const std::vector<uint16_t> d = dense.host();
  const double u = dtype == DType::kFloat16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  for (int64_t i = 0; i < n * k; ++i)
    ASSERT_LE(std::fabs(from_bits16(d[i], dtype) - p.layer.dense[i]), 2 * u * std::fabs(p.layer.dense[i]) + 1e-7)
        << "weight[" << i / k << ", " << i % k << "]";

  // The same weights in the layout's position order: column p holds the
  // weight of column perm[p] (of p without perm), bit for bit.
  const int64_t kp = p.shape.positions;
  DeviceArray<uint16_t> by_position(static_cast<size_t>(n * kp));
  Status sp = gptqkit::gpu_dequantize_prepared_positions(p.w, by_position.view(dtype, n, kp), nullptr);
  ASSERT_TRUE(sp.ok()) << sp.message();
  const std::vector<uint16_t> dp = by_position.host();
  const std::vector<int32_t> perm = p.perm.host();
  for (int64_t pos = 0; pos < kp; ++pos) {
    const int64_t col = p.shape.reordered ? perm[pos] : (pos < k ? pos : -1);
    if (col < 0) continue;  // padding
    for (int64_t j = 0; j < n; ++j) ASSERT_EQ(dp[j * kp + pos], d[j * k + col]) << "position " << pos << ", row " << j;
  }
}

// Position order with padding positions (groups of 48 with act-order: each
// group padded to 64; K = 1000 without: padded at the end), and its shape check.
TEST(EmuGemmPositions, PaddedLayoutsKeepEveryColumnsWeight) {
  for (const auto& [k, group_size, act_order] : {std::make_tuple(int64_t{480}, int64_t{48}, true),
                                                 std::make_tuple(int64_t{1000}, int64_t{128}, false)}) {
    const int64_t n = 130;
    EmuPreparedLayer p(n, k, group_size, 4, act_order, DType::kBFloat16, 21);
    const int64_t kp = p.shape.positions;
    ASSERT_GT(kp, k);
    DeviceArray<uint16_t> dense(static_cast<size_t>(n * k)), by_position(static_cast<size_t>(n * kp));
    ASSERT_TRUE(gptqkit::gpu_dequantize_prepared(p.w, dense.view(DType::kBFloat16, n, k), nullptr).ok());
    Status s = gptqkit::gpu_dequantize_prepared_positions(p.w, by_position.view(DType::kBFloat16, n, kp), nullptr);
    ASSERT_TRUE(s.ok()) << s.message();
    const std::vector<uint16_t> d = dense.host(), dp = by_position.host();
    const std::vector<int32_t> perm = p.perm.host();
    int64_t checked = 0;
    for (int64_t pos = 0; pos < kp; ++pos) {
      const int64_t col = p.shape.reordered ? perm[pos] : (pos < k ? pos : -1);
      if (col < 0) continue;
      ++checked;
      for (int64_t j = 0; j < n; ++j) ASSERT_EQ(dp[j * kp + pos], d[j * k + col]) << "position " << pos << ", row " << j;
    }
    EXPECT_EQ(checked, k);
    s = gptqkit::gpu_dequantize_prepared_positions(p.w, dense.view(DType::kBFloat16, n, k), nullptr);
    EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("Kp"), std::string::npos) << s.message();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Emulated, EmuGemm,
    ::testing::Values(std::make_tuple(4, int64_t{128}, false, DType::kFloat16),
                      std::make_tuple(4, int64_t{32}, true, DType::kFloat16),
                      std::make_tuple(4, int64_t{-1}, false, DType::kBFloat16),
                      std::make_tuple(3, int64_t{32}, true, DType::kBFloat16),
                      std::make_tuple(2, int64_t{64}, false, DType::kFloat16),
                      std::make_tuple(8, int64_t{32}, true, DType::kFloat16)));

// The 4-bit mma kernel's split-K plan (the emulated GPU has 4 SMs, so narrow
// layers split K 2-4 ways), its tile heights (16, 32, 64 rows; partial
// tiles), the pipeline over many stages, chunk ranges that end mid-stage,
// and the gather of x for act-order and for K that is not a multiple of 32.
struct MmaCase {
  int64_t n, k, group_size;
  bool act_order;
  DType dtype;
  std::vector<int64_t> rows;
};

void PrintTo(const MmaCase& c, std::ostream* os) {
  *os << "N " << c.n << ", K " << c.k << ", group " << c.group_size << (c.act_order ? ", act-order" : "")
      << (c.dtype == DType::kBFloat16 ? ", bf16" : ", fp16");
}

class EmuGemmMma : public ::testing::TestWithParam<MmaCase> {};

TEST_P(EmuGemmMma, SplitAndGatheredCallsMatchTheOracle) {
  const MmaCase c = GetParam();
  EmuPreparedLayer p(c.n, c.k, c.group_size, 4, c.act_order, c.dtype, 91);
  bool any_workspace = false;
  for (const int64_t m : c.rows) {
    any_workspace |= p.check_matmul(m, true, static_cast<uint32_t>(m) + 1000) > 0;
    p.check_matmul(m, false, static_cast<uint32_t>(m) + 2000);
  }
  // On the tensor-core target every case asks for a workspace (a split, or
  // a gather); elsewhere the kernel does not exist and none is asked for.
  EXPECT_EQ(any_workspace, emu_device::tensor_cores()) << target();
}

INSTANTIATE_TEST_SUITE_P(
    Emulated, EmuGemmMma,
    ::testing::Values(MmaCase{256, 1024, 128, false, DType::kFloat16, {1, 5, 9, 16, 17, 40, 64, 65}},
                      MmaCase{130, 928, 64, false, DType::kBFloat16, {12, 33}},   // 29 chunks: a split ends mid-stage
                      MmaCase{128, 1000, 128, false, DType::kFloat16, {20}},     // K % 32 != 0: x gathered
                      MmaCase{256, 640, 32, true, DType::kFloat16, {2, 16, 48}},  // act-order: x gathered through perm
                      MmaCase{200, 480, 96, true, DType::kBFloat16, {24}}));

// The sm_90a wgmma kernel: the emulated tensor-core target is a
// compute-capability-9.0 GPU with sm_90a code, where it takes calls from
// GPTQKIT_GPU_WGMMA_MIN_ROWS rows (128 by default; 9 here, so that the
// 64-token tile is covered as well as the 128-token one). Partial token
// tiles, K split 2-4 ways, splits that end mid-stage, gathered x.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value != nullptr) setenv(name, value, 1); else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_, old_.c_str(), 1); else unsetenv(name_);
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// Checks every row count of `c` with and without a workspace (seeds from
// `seed`) and returns how often `kernel` was launched meanwhile.
int64_t check_rows_counting(EmuPreparedLayer& p, const MmaCase& c, uint32_t seed, const char* kernel) {
  const int64_t before = emu_device::launches(kernel);
  for (const int64_t m : c.rows) {
    p.check_matmul(m, true, static_cast<uint32_t>(m) + seed);
    p.check_matmul(m, false, static_cast<uint32_t>(m) + seed + 1000);
  }
  return emu_device::launches(kernel) - before;
}

class EmuGemmWgmma : public ::testing::TestWithParam<MmaCase> {};

TEST_P(EmuGemmWgmma, TokenTilesSplitsAndGatheredCallsMatchTheOracle) {
  const MmaCase c = GetParam();
  EmuPreparedLayer p(c.n, c.k, c.group_size, 4, c.act_order, c.dtype, 93);
  const ScopedEnv env("GPTQKIT_GPU_WGMMA_MIN_ROWS", "9");
  // Gathered x needs a workspace: the call without one runs the mma kernel.
  const bool gathered = c.act_order || c.k % 32 != 0;
  const int64_t expected = emu_device::tensor_cores() ? static_cast<int64_t>(c.rows.size()) * (gathered ? 1 : 2) : 0;
  EXPECT_EQ(check_rows_counting(p, c, 3000, "wgmma_kernel"), expected) << target();
}

INSTANTIATE_TEST_SUITE_P(
    Emulated, EmuGemmWgmma,
    ::testing::Values(MmaCase{256, 1024, 128, false, DType::kFloat16, {9, 64, 65, 130}},
                      MmaCase{130, 928, 64, false, DType::kBFloat16, {12, 100}},  // 29 chunks: a split ends mid-stage
                      MmaCase{128, 1000, 128, false, DType::kBFloat16, {70}},    // K % 32 != 0: x gathered
                      MmaCase{256, 640, 32, true, DType::kFloat16, {40}}));       // act-order: x gathered through perm

// The skinny variant of the mma kernel (M <= 16, GPTQKIT_GPU_SKINNY_MAX_ROWS):
// its own K order inside a chunk, column order inside a warp and
// per-group scaling, against the same oracle. Group runs of 1 chunk
// (group 32), 2 (64), 4 (128) and the whole of K (-1), runs that a split
// or a stage boundary cuts, act-order (chunk groups out of order, x
// gathered), K % 32 != 0, N past the last column, rows 9..16 (the upper
// half of the fragment), and no workspace (unsplit: 16-bit stores).
class EmuGemmSkinny : public ::testing::TestWithParam<MmaCase> {};

TEST_P(EmuGemmSkinny, SplitAndGatheredCallsMatchTheOracle) {
  const MmaCase c = GetParam();
  EmuPreparedLayer p(c.n, c.k, c.group_size, 4, c.act_order, c.dtype, 97);
  const ScopedEnv env("GPTQKIT_GPU_SKINNY_MAX_ROWS", "16");
  // Gathered x needs a workspace: the call without one runs the tiled kernel.
  const bool gathered = c.act_order || c.k % 32 != 0;
  int64_t expected = 0;
  for (const int64_t m : c.rows) expected += m <= 16 && emu_device::tensor_cores() ? (gathered ? 1 : 2) : 0;
  EXPECT_EQ(check_rows_counting(p, c, 5000, "mma_skinny_kernel"), expected) << target();
}

INSTANTIATE_TEST_SUITE_P(
    Emulated, EmuGemmSkinny,
    ::testing::Values(MmaCase{256, 1024, 128, false, DType::kFloat16, {1, 2, 8, 9, 16, 17}},
                      MmaCase{130, 928, 64, false, DType::kBFloat16, {1, 12}},  // 29 chunks: a split ends mid-stage
                      MmaCase{256, 640, 32, false, DType::kFloat16, {3}},      // a group per chunk
                      MmaCase{128, 768, -1, false, DType::kBFloat16, {5}},     // one group for all of K
                      MmaCase{128, 1000, 128, false, DType::kFloat16, {4}},    // K % 32 != 0: x gathered
                      MmaCase{256, 640, 32, true, DType::kFloat16, {2, 16}},   // act-order: x gathered through perm
                      MmaCase{200, 480, 96, true, DType::kBFloat16, {7}}));

TEST(EmuGemmSkinnyRouting, OnlyUpToItsRowsAndOffByDefault) {
  EmuPreparedLayer p(128, 256, 128, 4, false, DType::kFloat16, 6);
  auto skinny_ran = [&](int64_t m) {
    const int64_t before = emu_device::launches("mma_skinny_kernel");
    p.check_matmul(m, true, static_cast<uint32_t>(m));
    return emu_device::launches("mma_skinny_kernel") > before;
  };
  {
    const ScopedEnv env("GPTQKIT_GPU_SKINNY_MAX_ROWS", nullptr);  // default: off
    EXPECT_FALSE(skinny_ran(1));
  }
  {
    const ScopedEnv env("GPTQKIT_GPU_SKINNY_MAX_ROWS", "4");
    EXPECT_EQ(skinny_ran(4), emu_device::tensor_cores());
    EXPECT_FALSE(skinny_ran(5));
  }
  {
    const ScopedEnv env("GPTQKIT_GPU_SKINNY_MAX_ROWS", "100");  // capped at one 16-row tile
    EXPECT_EQ(skinny_ran(16), emu_device::tensor_cores());
    EXPECT_FALSE(skinny_ran(17));
  }
}

TEST(EmuGemmWgmmaRouting, FromTheRowThresholdAndNeverWhenTurnedOff) {
  EmuPreparedLayer p(128, 256, 128, 4, false, DType::kFloat16, 5);
  auto wgmma_ran = [&](int64_t m) {
    const int64_t before = emu_device::launches("wgmma_kernel");
    p.check_matmul(m, true, static_cast<uint32_t>(m));
    return emu_device::launches("wgmma_kernel") > before;
  };
  {
    const ScopedEnv env("GPTQKIT_GPU_WGMMA_MIN_ROWS", nullptr);  // default: 128
    EXPECT_FALSE(wgmma_ran(127));
    EXPECT_EQ(wgmma_ran(128), emu_device::tensor_cores());
  }
  {
    const ScopedEnv env("GPTQKIT_GPU_WGMMA_MIN_ROWS", "0");  // off
    EXPECT_FALSE(wgmma_ran(200));
  }
}

// Split-K sums added by the GEMM kernel's last block of each tile (tile
// counters, GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS) instead of
// splitk_reduce_kernel: the same bits as the separate reduction, no second
// launch, and the counters back at zero after every call (the next call
// relies on it). The mma kernel's three tile heights (partial tiles, two
// row tiles), the
// skinny kernel, splits that end mid-stage, gathered x (act-order, K % 32),
// N past the last column, bf16; under EMU_SCHEDULE=random a different
// split of each tile comes last.
class EmuGemmInKernelReduce : public ::testing::TestWithParam<MmaCase> {};

TEST_P(EmuGemmInKernelReduce, SameBitsAsTheReduceKernelAndCountersBackAtZero) {
  const MmaCase c = GetParam();
  EmuPreparedLayer p(c.n, c.k, c.group_size, 4, c.act_order, c.dtype, 99);
  constexpr int64_t kCounters = 16;
  DeviceArray<int32_t> counters(std::vector<int32_t>(kCounters, 0));
  const TensorView cv = counters.view(DType::kInt32, kCounters);
  int64_t split_calls = 0;
  for (const char* skinny : {"0", "16"}) {
    const ScopedEnv skinny_env("GPTQKIT_GPU_SKINNY_MAX_ROWS", skinny);
    for (const int64_t m : c.rows) {
      const uint32_t seed = static_cast<uint32_t>(m) + 7000;
      int64_t before = emu_device::launches("splitk_reduce_kernel");
      {
        const ScopedEnv off("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", nullptr);  // default: off
        p.check_matmul(m, true, seed, &cv);
      }
      const bool split = emu_device::launches("splitk_reduce_kernel") > before;
      split_calls += split ? 1 : 0;
      const std::vector<uint16_t> separate = p.last_y;
      before = emu_device::launches("splitk_reduce_kernel");
      (void)emu_device::take_unsigned_atomic_adds();
      {
        const ScopedEnv on("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "1000");
        p.check_matmul(m, true, seed, &cv);
      }
      EXPECT_EQ(emu_device::launches("splitk_reduce_kernel"), before) << "M = " << m << ", " << target();
      // Every split of a tile took one ticket, 0 .. splits - 1 (so exactly one block added the sums).
      const std::vector<std::vector<unsigned>> tickets = emu_device::take_unsigned_atomic_adds();
      EXPECT_EQ(!tickets.empty(), split) << "M = " << m << ", " << target();
      for (std::vector<unsigned> t : tickets) {
        std::sort(t.begin(), t.end());
        std::vector<unsigned> expected(t.size());
        std::iota(expected.begin(), expected.end(), 0u);
        EXPECT_TRUE(t.size() >= 2 && t == expected) << "M = " << m << ", " << target();
      }
      EXPECT_EQ(p.last_y, separate) << "M = " << m << ", skinny " << skinny << ", " << target();
      EXPECT_EQ(counters.host(), std::vector<int32_t>(kCounters, 0)) << "M = " << m << ", " << target();
    }
  }
  EXPECT_EQ(split_calls > 0, emu_device::tensor_cores()) << target();
}

INSTANTIATE_TEST_SUITE_P(
    Emulated, EmuGemmInKernelReduce,
    ::testing::Values(MmaCase{256, 1024, 128, false, DType::kFloat16, {1, 9, 16, 17, 40, 64, 100}},  // 100: 2 row tiles
                      MmaCase{130, 928, 64, false, DType::kBFloat16, {3, 33}},  // 29 chunks: a split ends mid-stage
                      MmaCase{128, 1000, 128, false, DType::kFloat16, {5}},    // K % 32 != 0: x gathered
                      MmaCase{200, 480, 96, true, DType::kBFloat16, {12}}));   // act-order: x gathered through perm

// Calls the counters cannot serve take the separate reduction: more tiles
// than counters, rows above the threshold, the wgmma kernel.
TEST(EmuGemmInKernelReduce, FallsBackToTheReduceKernel) {
  EmuPreparedLayer wide(512, 1024, 128, 4, false, DType::kFloat16, 8);   // 4 column tiles
  EmuPreparedLayer narrow(128, 1024, 128, 4, false, DType::kFloat16, 9);  // 1: the wgmma kernel splits too
  DeviceArray<int32_t> counters(std::vector<int32_t>(8, 0));
  const TensorView two = counters.view(DType::kInt32, 2), eight = counters.view(DType::kInt32, 8);
  auto reduce_kernel_ran = [&](EmuPreparedLayer& p, int64_t m, const TensorView& cv) {
    const int64_t before = emu_device::launches("splitk_reduce_kernel");
    p.check_matmul(m, true, static_cast<uint32_t>(m), &cv);
    EXPECT_EQ(counters.host(), std::vector<int32_t>(8, 0));
    return emu_device::launches("splitk_reduce_kernel") > before;
  };
  const ScopedEnv on("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "16");
  const bool tc = emu_device::tensor_cores();
  EXPECT_FALSE(reduce_kernel_ran(wide, 1, eight));
  EXPECT_EQ(reduce_kernel_ran(wide, 1, two), tc);     // 4 tiles, 2 counters
  EXPECT_EQ(reduce_kernel_ran(wide, 17, eight), tc);  // above the threshold
  const ScopedEnv wgmma("GPTQKIT_GPU_WGMMA_MIN_ROWS", "9");
  const ScopedEnv all_rows("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "1000");
  EXPECT_EQ(reduce_kernel_ran(narrow, 10, eight), tc);  // the wgmma kernel
}

// Programmatic dependent launches (GPTQKIT_GPU_PDL=1) of the mma path: the
// emulation runs kernels one after another, so this checks the host side
// (the launch helper, the plan) and that the kernels' prefetch-then-wait
// prologue leaves the results alone; the overlap itself needs a GPU
// (test_gpu_overlapped_launches_keep_every_dependency).
TEST(EmuGemmOverlappedLaunches, GatheredSplitAndSkinnyCallsMatchTheOracle) {
  EmuPreparedLayer direct(256, 1024, 128, 4, false, DType::kFloat16, 12);
  EmuPreparedLayer act_order(200, 480, 96, 4, true, DType::kBFloat16, 13);
  DeviceArray<int32_t> counters(std::vector<int32_t>(16, 0));
  const TensorView cv = counters.view(DType::kInt32, 16);
  {  // off by default: ordinary launches
    const ScopedEnv off("GPTQKIT_GPU_PDL", nullptr);
    const int64_t before = emu_device::overlapped_launches();
    direct.check_matmul(1, true, 10, &cv);
    EXPECT_EQ(emu_device::overlapped_launches(), before);
  }
  const ScopedEnv pdl("GPTQKIT_GPU_PDL", "1");
  const int64_t before = emu_device::overlapped_launches();
  for (const char* reduce_rows : {"0", "64"}) {
    const ScopedEnv reduce("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", reduce_rows);
    for (const int64_t m : {1, 16, 40}) {
      direct.check_matmul(m, true, static_cast<uint32_t>(m) + 11, &cv);
      act_order.check_matmul(m, true, static_cast<uint32_t>(m) + 12, &cv);
    }
    const ScopedEnv skinny("GPTQKIT_GPU_SKINNY_MAX_ROWS", "16");
    direct.check_matmul(5, true, 13, &cv);
  }
  EXPECT_EQ(counters.host(), std::vector<int32_t>(16, 0));
  // The tensor-core target is compute capability 9.0: every mma-path kernel
  // (gather, mma / skinny, reduce) was asked for as an overlapped launch.
  EXPECT_EQ(emu_device::overlapped_launches() > before, emu_device::tensor_cores()) << target();
}

TEST(EmuGemmErrors, BadTileCountersAreRejected) {
  EmuPreparedLayer p(128, 64, 32, 4, false, DType::kFloat16, 3);
  DeviceArray<uint16_t> x(2 * 64), y(2 * 128);
  DeviceArray<int32_t> counters(16);
  DeviceArray<float> floats(16);
  const TensorView xv = x.view(DType::kFloat16, 2, 64), yv = y.view(DType::kFloat16, 2, 128);
  auto call = [&](const TensorView& cv) { return gptqkit::gpu_quantized_matmul(xv, p.w, nullptr, yv, nullptr, &cv, nullptr); };
  Status s = call(floats.view(DType::kFloat32, 16));
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tile_counters"), std::string::npos) << s.message();
  s = call(counters.view(DType::kInt32, 4, 4));
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument) << s.message();
  TensorView on_host = gptqkit::make_view(counters.data(), DType::kInt32, 16);
  s = call(on_host);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument) << s.message();
  TensorView inside_y = y.view(DType::kInt32, 16);  // the counters would overwrite outputs
  s = call(inside_y);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("overlaps the memory of y"), std::string::npos) << s.message();
  s = call(counters.view(DType::kInt32, 16));
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST(EmuGemmErrors, BadArgumentsAreRejected) {
  EmuPreparedLayer p(128, 64, 32, 4, false, DType::kFloat16, 3, /*sz_slack=*/8);
  const gptqkit::GpuPreparedView& w = p.w;
  DeviceArray<uint16_t> x(2 * 64), y(2 * 128);
  // x of the wrong width, x in another dtype than the layer's, a misaligned sz.
  Status s = gptqkit::gpu_quantized_matmul(x.view(DType::kFloat16, 2, 63), w, nullptr, y.view(DType::kFloat16, 2, 128),
                                           nullptr);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument) << s.message();
  s = gptqkit::gpu_quantized_matmul(x.view(DType::kBFloat16, 2, 64), w, nullptr, y.view(DType::kBFloat16, 2, 128),
                                    nullptr);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument) << s.message();
  gptqkit::GpuPreparedView shifted = w;
  shifted.sz.data = static_cast<uint16_t*>(w.sz.data) + 4;  // 8 bytes off: 128-bit loads would fault
  s = gptqkit::gpu_quantized_matmul(x.view(DType::kFloat16, 2, 64), shifted, nullptr, y.view(DType::kFloat16, 2, 128),
                                    nullptr);
  EXPECT_EQ(s.code(), gptqkit::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("16-byte aligned"), std::string::npos) << s.message();
  s = gptqkit::gpu_quantized_matmul(x.view(DType::kFloat16, 2, 64), w, nullptr, y.view(DType::kFloat16, 2, 128),
                                    nullptr);
  EXPECT_TRUE(s.ok()) << s.message();
}

}  // namespace api

}  // namespace
