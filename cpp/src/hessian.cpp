#include "gptqkit/hessian.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "blas.h"
#include "checks.h"
#if defined(GPTQKIT_HAS_GPU)
#include "../../cuda/src/gpu_solver_api.h"
#endif
#include "half.h"
#include "parallel.h"

namespace gptqkit {
namespace {

// Rows converted per BLAS call for 16-bit input or float64 accumulation:
// bounds the scratch buffer to rows * K elements.
constexpr int64_t kChunkRows = 2048;

// The upper triangle of C split into column panels of equal width, and the
// panels dealt to `workers` threads, largest first, each to the least loaded
// (panel j costs its height times its width: a gemm for the rectangle above
// its diagonal block plus a syrk for the block). Why panels about K/(2T)
// wide, never under 128: with only T slices the diagonal syrks are large,
// and single-threaded OpenBLAS syrk runs at about half its gemm speed (K=576
// on 2 cores: 2.75 ms as 2 slices, 1.4 ms as 4 panels); narrower than 128,
// the gemms themselves lose speed.
struct PanelPlan {
  std::vector<int64_t> bounds;               // panel p is columns [bounds[p], bounds[p+1])
  std::vector<std::vector<int64_t>> owned;   // panels of each worker
};

PanelPlan plan_panels(int64_t k, int workers) {
  PanelPlan plan;
  const int64_t width = std::max<int64_t>(128, (k / (2 * std::max(workers, 1)) + 15) / 16 * 16);
  for (int64_t c = 0; c < k; c += width) plan.bounds.push_back(c);
  plan.bounds.push_back(k);
  const int64_t panels = static_cast<int64_t>(plan.bounds.size()) - 1;
  workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(workers, panels)));
  plan.owned.resize(static_cast<size_t>(workers));
  std::vector<double> load(static_cast<size_t>(workers), 0.0);
  for (int64_t p = panels - 1; p >= 0; --p) {  // later panels are taller: largest first
    const size_t w = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    plan.owned[w].push_back(p);
    load[w] += static_cast<double>(plan.bounds[p + 1]) * static_cast<double>(plan.bounds[p + 1] - plan.bounds[p]);
  }
  return plan;
}

// C (column-major K x K, upper triangle) = alpha * A A^T + beta * C for the
// column-major K x rows matrix A, over gptqkit's threads (see PanelPlan).
// Why not OpenBLAS's threading: in the quantization loop these calls
// interleave with PyTorch ops, and OpenBLAS's idle threads busy-wait against
// PyTorch's for the same cores.
template <typename T, typename Syrk, typename Gemm>
void parallel_syrk(int64_t k, int64_t rows, T alpha, const T* a, T beta, T* c, Syrk syrk, Gemm gemm) {
  blas::ScopedBlasThreads one_thread(1);
  // Small updates are not worth waking threads for.
  const int64_t flops = k * k * rows;
  const int workers = flops < (int64_t{1} << 24) ? 1 : std::max(1, num_threads());
  const PanelPlan plan = plan_panels(k, workers);
  const int ki = static_cast<int>(k), ri = static_cast<int>(rows);
  parallel_for(static_cast<int64_t>(plan.owned.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (const int64_t p : plan.owned[static_cast<size_t>(w)]) {
        const int64_t j0 = plan.bounds[p], j1 = plan.bounds[p + 1];
        const int width = static_cast<int>(j1 - j0);
        if (j0 > 0)  // C[0:j0, j0:j1] = alpha * A[0:j0, :] A[j0:j1, :]^T + beta * C
          gemm('N', 'T', static_cast<int>(j0), width, ri, alpha, a, ki, a + j0, ki, beta, c + j0 * k, ki);
        syrk('U', 'N', width, ri, alpha, a + j0, ki, beta, c + j0 + j0 * k, ki);
      }
    }
  });
}

template <typename Out>
void convert_rows(const TensorView& x, int64_t row0, int64_t rows, int64_t k, Out* dst) {
  const int64_t count = rows * k;
  const int64_t offset = row0 * k;
  switch (x.dtype) {
    case DType::kFloat32: {
      const float* src = static_cast<const float*>(x.data) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<Out>(src[i]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(x.data) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<Out>(fp16_to_float(src[i]));
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(x.data) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<Out>(bf16_to_float(src[i]));
      break;
    }
    default:
      break;
  }
}

}  // namespace

struct HessianAccumulator::DeviceBuffer {
  Device device;
  void* state = nullptr;  // gpu::hessian_state_bytes(k) bytes on `device`
  int64_t bytes = 0;
};

void HessianAccumulator::DeviceBufferDeleter::operator()(DeviceBuffer* b) const {
#if defined(GPTQKIT_HAS_GPU)
  if (b && b->state) gpu::free_persistent(b->device, b->state, b->bytes);
#endif
  delete b;
}

HessianAccumulator::HessianAccumulator(int64_t in_features, AccumulateType acc)
    : k_(in_features), acc_(acc) {}

void HessianAccumulator::reset() {
  n_ = 0;
  device_ = Device{};
  std::fill(h32_.begin(), h32_.end(), 0.0f);
  std::fill(h64_.begin(), h64_.end(), 0.0);
}

namespace {

bool same_device(const Device& a, const Device& b) {
  const bool a_cpu = a.type == DeviceType::kCPU, b_cpu = b.type == DeviceType::kCPU;
  return a_cpu || b_cpu ? a_cpu == b_cpu : a.index == b.index;
}

Status mixed_devices(const Device& held, const Device& got, const char* name) {
  return Status::InvalidArgument(std::string(name) + ": is on " + checks::device_string(got) +
                                 ", but this accumulator holds batches from " + checks::device_string(held) +
                                 "; one accumulator cannot mix devices (move the input, or reset() first)");
}

}  // namespace

Status HessianAccumulator::add_batch(const TensorView& x, void* stream) {
  if (k_ <= 0 || k_ > std::numeric_limits<int>::max())
    return Status::InvalidArgument("in_features: must be in [1, 2^31), got " + std::to_string(k_));
  if (x.device.type != DeviceType::kCPU) {
    GPTQKIT_RETURN_IF_ERROR(checks::gpu_supported(x, "x"));
    if (n_ > 0 && !same_device(device_, x.device)) return mixed_devices(device_, x.device, "x");
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(x, "x", {DType::kFloat32, DType::kFloat16, DType::kBFloat16}));
    if (x.ndim < 1 || x.ndim > 3 || x.shape[x.ndim - 1] != k_)
      return Status::InvalidArgument("x: expected shape [rows, " + std::to_string(k_) + "] or [batch, seq, " +
                                     std::to_string(k_) + "], got " + shape_string(x));
    if (acc_ == AccumulateType::kFloat64)
      return Status::Unsupported("x: float64 accumulation runs on the CPU only; use float32 accumulation for GPU "
                                 "input (16-bit products are exact in float32), or move the input to the CPU");
#if defined(GPTQKIT_HAS_GPU)
    const int64_t rows = x.numel() / k_;
    if (rows == 0) return Status::Ok();
    try {
      if (gpu_ && gpu_->device.index != x.device.index) gpu_.reset();  // after reset(): another GPU
      if (!gpu_) {
        std::unique_ptr<DeviceBuffer, DeviceBufferDeleter> b(new DeviceBuffer);
        b->device = x.device;
        b->bytes = gpu::hessian_state_bytes(k_);
        GPTQKIT_RETURN_IF_ERROR(gpu::alloc_persistent(x.device, b->bytes, &b->state));
        gpu_ = std::move(b);
      }
    } catch (const std::bad_alloc&) {
      return Status::Internal("out of memory");
    }
    const int64_t n_new = n_ + rows;
    const double alpha = 2.0 / static_cast<double>(n_new);
    const double beta = static_cast<double>(n_) / static_cast<double>(n_new);
    GPTQKIT_RETURN_IF_ERROR(gpu::hessian_add_batch(x, gpu_->state, k_, alpha, beta, stream));
    n_ = n_new;
    device_ = x.device;
    return Status::Ok();
#else
    return Status::Internal("unreachable: GPU input in a CPU-only build");
#endif
  }
  if (n_ > 0 && !same_device(device_, x.device)) return mixed_devices(device_, x.device, "x");
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(x, "x"));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(x, "x", {DType::kFloat32, DType::kFloat16, DType::kBFloat16}));
  if (x.ndim < 1 || x.ndim > 3 || x.shape[x.ndim - 1] != k_)
    return Status::InvalidArgument("x: expected shape [rows, " + std::to_string(k_) + "] or [batch, seq, " +
                                   std::to_string(k_) + "], got " + shape_string(x));
  GPTQKIT_RETURN_IF_ERROR(checks::all_finite(x, "x"));
  const int64_t rows = x.numel() / k_;
  if (rows == 0) return Status::Ok();

  const int k = static_cast<int>(k_);
  const bool fp64 = acc_ == AccumulateType::kFloat64;
  if (fp64 && h64_.empty()) h64_.assign(static_cast<size_t>(k_ * k_), 0.0);
  if (!fp64 && h32_.empty()) h32_.assign(static_cast<size_t>(k_ * k_), 0.0f);

  // Running formulation of GPTQ: H <- H * n/(n+b) + (2/(n+b)) X^T X.
  const int64_t n_new = n_ + rows;
  const double alpha = 2.0 / static_cast<double>(n_new);
  double beta = static_cast<double>(n_) / static_cast<double>(n_new);

  // The buffer is column-major K x K; row-major X [rows, K] is the column-major
  // K x rows matrix A, and X^T X = A A^T: syrk with trans = 'N'.
  for (int64_t row0 = 0; row0 < rows; row0 += kChunkRows) {
    const int64_t chunk = std::min(kChunkRows, rows - row0);
    const int c = static_cast<int>(chunk);
    if (fp64) {
      convert64_.resize(static_cast<size_t>(chunk * k_));
      convert_rows(x, row0, chunk, k_, convert64_.data());
      parallel_syrk<double>(k, c, alpha, convert64_.data(), beta, h64_.data(), blas::dsyrk, blas::dgemm);
    } else if (x.dtype == DType::kFloat32) {
      const float* a = static_cast<const float*>(x.data) + row0 * k_;
      parallel_syrk<float>(k, c, static_cast<float>(alpha), a, static_cast<float>(beta), h32_.data(), blas::ssyrk,
                           blas::sgemm);
    } else {
      convert32_.resize(static_cast<size_t>(chunk * k_));
      convert_rows(x, row0, chunk, k_, convert32_.data());
      parallel_syrk<float>(k, c, static_cast<float>(alpha), convert32_.data(), static_cast<float>(beta),
                           h32_.data(), blas::ssyrk, blas::sgemm);
    }
    beta = 1.0;  // later chunks of the same batch only add
  }
  n_ = n_new;
  device_ = Device{};
  return Status::Ok();
}

Status HessianAccumulator::hessian(const TensorView& out, void* stream) const {
  const bool on_gpu = n_ > 0 && device_.type != DeviceType::kCPU;
  if (out.device.type != DeviceType::kCPU || on_gpu) {
    if (n_ > 0 && !same_device(device_, out.device))
      return Status::InvalidArgument("out: is on " + checks::device_string(out.device) +
                                     ", but the Hessian was accumulated on " + checks::device_string(device_) +
                                     "; pass an output on that device");
    GPTQKIT_RETURN_IF_ERROR(checks::gpu_supported(out, "out"));
#if defined(GPTQKIT_HAS_GPU)
    return gpu::hessian_write(n_ > 0 && gpu_ ? gpu_->state : nullptr, k_, out, stream);
#else
    return Status::Internal("unreachable: GPU output in a CPU-only build");
#endif
  }
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(out, "out"));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(out, "out", {DType::kFloat32, DType::kFloat64}));
  GPTQKIT_RETURN_IF_ERROR(checks::shape_is(out, "out", {k_, k_}));
  const int64_t k = k_;
  auto read = [&](int64_t r, int64_t c) -> double {
    if (n_ == 0) return 0.0;
    const int64_t lo = std::min(r, c), hi = std::max(r, c);  // upper triangle, column-major
    const size_t idx = static_cast<size_t>(lo + hi * k);
    return acc_ == AccumulateType::kFloat64 ? h64_[idx] : static_cast<double>(h32_[idx]);
  };
  if (out.dtype == DType::kFloat64) {
    double* o = static_cast<double*>(out.data);
    for (int64_t r = 0; r < k; ++r)
      for (int64_t c = 0; c < k; ++c) o[r * k + c] = read(r, c);
  } else {
    float* o = static_cast<float*>(out.data);
    for (int64_t r = 0; r < k; ++r)
      for (int64_t c = 0; c < k; ++c) o[r * k + c] = static_cast<float>(read(r, c));
  }
  return Status::Ok();
}

}  // namespace gptqkit
