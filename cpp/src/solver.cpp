#include "gptqkit/solver.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <string>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "cholesky.h"
#include "column_order.h"
#if defined(GPTQKIT_HAS_GPU)
#include "../../cuda/src/gpu_solver_api.h"
#endif
#include "half.h"
#include "parallel.h"
#include "quantizer.h"
#include "solver_args.h"

namespace gptqkit {

GpuSolverMemory gpu_solver_memory(bool reset_peak) {
  GpuSolverMemory m;
#if defined(GPTQKIT_HAS_GPU)
  const gpu::MemoryStats s = gpu::memory_stats();
  m.current_bytes = s.current_bytes;
  m.peak_bytes = s.peak_bytes;
  if (reset_peak) gpu::reset_peak_memory();
#else
  (void)reset_peak;
#endif
  return m;
}

int64_t num_groups(int64_t in_features, int64_t group_size) {
  if (group_size <= 0) return 1;
  return std::max<int64_t>(1, (in_features + group_size - 1) / group_size);
}

Status validate_options(const QuantizeOptions& o) {
  GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(o.bits));
  if (o.group_size == 0 || o.group_size < -1)
    return Status::InvalidArgument("group_size: expected -1 (per output channel) or a positive value, got " +
                                   std::to_string(o.group_size));
  if (o.block_size <= 0 || o.block_size > (1 << 16))
    return Status::InvalidArgument("block_size: expected a value in [1, 65536], got " + std::to_string(o.block_size));
  if (!(o.damp_percent >= 0.0) || !std::isfinite(o.damp_percent))
    return Status::InvalidArgument("damp_percent: expected a finite value >= 0, got " + std::to_string(o.damp_percent));
  if (o.clip_steps < 0 || o.clip_steps > 1000)
    return Status::InvalidArgument("clip_steps: expected a value in [0, 1000], got " + std::to_string(o.clip_steps));
  if (!(o.clip_min_ratio > 0.0 && o.clip_min_ratio <= 1.0))
    return Status::InvalidArgument("clip_min_ratio: expected a value in (0, 1], got " + std::to_string(o.clip_min_ratio));
  if (!(o.clip_norm > 0.0 && o.clip_norm <= 8.0))
    return Status::InvalidArgument("clip_norm: expected a value in (0, 8], got " + std::to_string(o.clip_norm));
  if (o.min_zero_point < 0 || o.min_zero_point > 1)
    return Status::InvalidArgument("min_zero_point: expected 0 or 1, got " + std::to_string(o.min_zero_point));
  if (o.act_group_aware && o.desc_act)
    return Status::InvalidArgument("act_group_aware: cannot be combined with desc_act (both set the column order)");
  if (o.act_group_aware && o.group_size < 0)
    return Status::InvalidArgument("act_group_aware: needs group_size > 0, got " + std::to_string(o.group_size) +
                                   " (with one group per row, desc_act keeps g_idx trivial as well)");
  if (o.max_damp_retries < 0 || o.max_damp_retries > 64)
    return Status::InvalidArgument("max_damp_retries: expected a value in [0, 64], got " +
                                   std::to_string(o.max_damp_retries));
  return Status::Ok();
}

namespace {

// Routing by device: every tensor of a call on the CPU, or all on one GPU.
// Returns true (and *status) when the call goes to the GPU or is refused.
bool route_to_gpu(std::initializer_list<std::pair<const TensorView*, const char*>> tensors, Status* status) {
  const TensorView* first_gpu = nullptr;
  const char* first_name = nullptr;
  for (const auto& t : tensors)
    if (t.first->device.type != DeviceType::kCPU) {
      first_gpu = t.first;
      first_name = t.second;
      break;
    }
  if (!first_gpu) return false;
  *status = checks::gpu_supported(*first_gpu, first_name);
  if (!status->ok()) return true;
  for (const auto& t : tensors) {
    const Device& d = t.first->device;
    if (d.type == DeviceType::kCPU || d.index != first_gpu->device.index) {
      *status = Status::InvalidArgument(std::string(t.second) + ": is on " + checks::device_string(d) + ", but " +
                                        first_name + " is on " + checks::device_string(first_gpu->device) +
                                        "; every tensor of one call must be on the same device");
      return true;
    }
  }
  return true;
}

}  // namespace

Status inverse_hessian_upper_factor(const TensorView& hessian, double damp_percent, int max_retries,
                                    const TensorView& upper, QuantizeStats* stats, void* stream) {
  Status routed;
  if (route_to_gpu({{&hessian, "hessian"}, {&upper, "upper"}}, &routed)) {
    if (!routed.ok()) return routed;
#if defined(GPTQKIT_HAS_GPU)
    try {
      return gpu::inverse_hessian_upper_factor(hessian, damp_percent, max_retries, upper, stats, stream);
    } catch (const std::exception& e) {
      return Status::Internal(std::string("internal error in the GPU solver: ") + e.what());
    }
#endif
  }
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(hessian, "hessian"));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(hessian, "hessian", {DType::kFloat32, DType::kFloat64}));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(hessian, "hessian", 2));
  const int64_t k = hessian.shape[0];
  if (k <= 0) return Status::InvalidArgument("hessian: expected a non-empty square matrix, got " + shape_string(hessian));
  GPTQKIT_RETURN_IF_ERROR(checks::shape_is(hessian, "hessian", {k, k}));
  GPTQKIT_RETURN_IF_ERROR(checks::all_finite(hessian, "hessian"));
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(upper, "upper"));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(upper, "upper", {DType::kFloat32}));
  GPTQKIT_RETURN_IF_ERROR(checks::shape_is(upper, "upper", {k, k}));
  if (!(damp_percent >= 0.0) || !std::isfinite(damp_percent))
    return Status::InvalidArgument("damp_percent: expected a finite value >= 0");
  try {
    return detail::inverse_upper_factor(hessian.data, hessian.dtype == DType::kFloat64, k, nullptr, nullptr,
                                        damp_percent, max_retries, static_cast<float*>(upper.data), stats);
  } catch (const std::bad_alloc&) {
    return Status::Internal("out of memory preparing the inverse Hessian");
  }
}

namespace {

GridSearch grid_search_of(const QuantizeOptions& o) {
  GridSearch s;
  s.steps = o.clip_steps;
  s.min_ratio = static_cast<float>(o.clip_min_ratio);
  s.norm = static_cast<float>(o.clip_norm);
  s.fp16_scales = o.fp16_scales;
  s.min_zero = o.min_zero_point;
  return s;
}

void load_weight(const TensorView& w, std::vector<float>& dst) {
  const int64_t n = w.numel();
  dst.resize(static_cast<size_t>(n));
  switch (w.dtype) {
    case DType::kFloat32: std::copy_n(static_cast<const float*>(w.data), n, dst.data()); break;
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(w.data);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.data);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(p[i]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.data);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(p[i]);
      break;
    }
    default: break;
  }
}

// The GPTQ sweep proper, on validated inputs. `w` is the weight in processing
// order ([N, K] row-major, dead columns zeroed), `u` the upper factor of H^-1
// in processing order.
class ColumnSweep {
 public:
  ColumnSweep(const QuantizeOptions& o, int64_t n, int64_t k, std::vector<float>& w, const float* u,
              const std::vector<int64_t>& perm, const std::vector<Grid>& fixed_grids,
              const QuantizeOutputs& out)
      : o_(o), n_(n), k_(k), w_(w), u_(u), perm_(perm), fixed_(fixed_grids), out_(out),
        maxq_((1 << o.bits) - 1), search_(grid_search_of(o)), row_loss_(static_cast<size_t>(n), 0.0) {
    if (o.clip_steps > 0 && o.clip_hessian_weighted) {
      col_weight_.resize(static_cast<size_t>(k));  // processing order
      for (int64_t j = 0; j < k; ++j) col_weight_[j] = 1.0f / (u[j * k + j] * u[j * k + j]);
    }
  }

  double run() {
    const int64_t block = std::min(o_.block_size, k_);
    // Rows are independent given H^-1, so each worker takes a slice of rows
    // through the whole sweep with no synchronisation: the in-block column
    // loop keeps a row's working copy in L1 and shares the block's rows of U
    // in L2, and the lazy update of the slice is a single-threaded BLAS call
    // (threads are ours, not the BLAS provider's, so they never fight).
    blas::ScopedBlasThreads one_thread(1);
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (n_ + 7) / 8));
    const int64_t slice = (n_ + workers - 1) / workers;
    parallel_for(workers, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t r0 = w * slice, r1 = std::min(n_, r0 + slice);
        if (r0 < r1) sweep_rows(r0, r1, block);
      }
    });
    return std::accumulate(row_loss_.begin(), row_loss_.end(), 0.0) / 2.0;
  }

  void sweep_rows(int64_t r0, int64_t r1, int64_t block) {
    const int64_t rows = r1 - r0;
    std::vector<float> err(static_cast<size_t>(rows * block));
    std::vector<float> w1(static_cast<size_t>(block));
    for (int64_t i1 = 0; i1 < k_; i1 += block) {
      const int64_t i2 = std::min(i1 + block, k_);
      const int64_t width = i2 - i1;
      for (int64_t r = r0; r < r1; ++r) sweep_row(r, i1, width, w1.data(), err.data() + (r - r0) * width);
      if (i2 < k_) {
        // Lazy batch update W[r0:r1, i2:] -= Err1 @ U[i1:i2, i2:] (row-major
        // operands seen column-major, hence the order).
        blas::sgemm('N', 'N', static_cast<int>(k_ - i2), static_cast<int>(rows), static_cast<int>(width), -1.0f,
                    u_ + i1 * k_ + i2, static_cast<int>(k_), err.data(), static_cast<int>(width), 1.0f,
                    w_.data() + r0 * k_ + i2, static_cast<int>(k_));
      }
    }
  }

 private:
  void sweep_row(int64_t r, int64_t i1, int64_t width, float* w1, float* err) {
    const float* wrow = w_.data() + r * k_;  // state at the start of this block
    std::copy_n(wrow + i1, width, w1);
    uint8_t* codes = static_cast<uint8_t*>(out_.codes.data) + r * k_;
    float* scales = static_cast<float*>(out_.scales.data);
    int32_t* zeros = static_cast<int32_t*>(out_.zeros.data);
    double loss = 0.0;
    Grid grid = o_.group_size < 0 ? fixed_[static_cast<size_t>(r)] : Grid{1.0f, 0};
    if (o_.group_size > 0 && !o_.static_groups && i1 % o_.group_size != 0) {
      // A group that began in an earlier block continues here: its grid was
      // stored when the group started.
      const int64_t g = detail::group_at_position(o_, perm_.data(), i1 - i1 % o_.group_size);
      grid = Grid{scales[g * n_ + r], zeros[g * n_ + r]};
    }
    for (int64_t i = 0; i < width; ++i) {
      const int64_t col = i1 + i;
      if (o_.group_size > 0) {
        if (o_.static_groups) {
          const int64_t g = perm_[static_cast<size_t>(col)] / o_.group_size;
          grid = fixed_[static_cast<size_t>(g * n_ + r)];
        } else if (col % o_.group_size == 0) {
          // Block-start weights (wrow), not w1: the reference GPTQ rule.
          const int64_t end = std::min(col + o_.group_size, k_);
          grid = search_grid(wrow + col, col_weight_.empty() ? nullptr : col_weight_.data() + col, end - col, maxq_,
                             o_.sym, search_);
          const int64_t g = detail::group_at_position(o_, perm_.data(), col);
          scales[g * n_ + r] = grid.scale;
          zeros[g * n_ + r] = grid.zero;
        }
      }
      const float x = w1[i];
      const int32_t code = quantize_code(x, grid, maxq_);
      const float q = dequantize_code(code, grid);
      const float* urow = u_ + col * k_ + i1;
      const float d = urow[i];
      const float e = (x - q) / d;
      loss += static_cast<double>(e) * static_cast<double>(e);
      err[i] = e;
      codes[perm_[static_cast<size_t>(col)]] = static_cast<uint8_t>(code);
      for (int64_t j = i + 1; j < width; ++j) w1[j] -= e * urow[j];
    }
    row_loss_[static_cast<size_t>(r)] += loss;
  }

  const QuantizeOptions& o_;
  const int64_t n_, k_;
  std::vector<float>& w_;
  const float* u_;
  const std::vector<int64_t>& perm_;
  const std::vector<Grid>& fixed_;
  const QuantizeOutputs& out_;
  const int maxq_;
  const GridSearch search_;
  std::vector<float> col_weight_;
  std::vector<double> row_loss_;
};

Status quantize_impl(const TensorView& weight, const TensorView& hessian, const QuantizeOptions& o,
                     const QuantizeOutputs& out, QuantizeStats* stats) {
  detail::QuantizeShape shape;
  GPTQKIT_RETURN_IF_ERROR(detail::check_quantize_args(weight, hessian, o, out, checks::cpu_contiguous, &shape));
  const int64_t n = shape.n, k = shape.k, g = shape.groups;
  if (n > std::numeric_limits<int>::max() || k > std::numeric_limits<int>::max())
    return Status::InvalidArgument("weight: dimensions must be below 2^31, got " + shape_string(weight));
  GPTQKIT_RETURN_IF_ERROR(checks::all_finite(weight, "weight"));
  GPTQKIT_RETURN_IF_ERROR(checks::all_finite(hessian, "hessian"));

  const int maxq = (1 << o.bits) - 1;
  std::vector<float> w;
  load_weight(weight, w);

  // Dead inputs (never active in calibration): H_ii = 1 and weights zeroed.
  const bool h64 = hessian.dtype == DType::kFloat64;
  auto hdiag = [&](int64_t i) {
    return h64 ? static_cast<const double*>(hessian.data)[i * k + i]
               : static_cast<double>(static_cast<const float*>(hessian.data)[i * k + i]);
  };
  std::vector<uint8_t> dead(static_cast<size_t>(k), 0);
  std::vector<double> diag(static_cast<size_t>(k));
  int64_t dead_count = 0;
  for (int64_t i = 0; i < k; ++i) {
    diag[i] = hdiag(i);
    if (diag[i] == 0.0) {
      dead[i] = 1;
      diag[i] = 1.0;
      ++dead_count;
    }
  }
  if (dead_count > 0)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < k; ++i)
        if (dead[i]) w[static_cast<size_t>(r * k + i)] = 0.0f;

  const std::vector<int64_t> perm = detail::processing_order(diag, o);
  std::copy(perm.begin(), perm.end(), static_cast<int64_t*>(out.perm.data));

  int32_t* g_idx = static_cast<int32_t*>(out.g_idx.data);
  for (int64_t j = 0; j < k; ++j) {
    if (o.group_size < 0) g_idx[j] = 0;
    else if (o.static_groups || !o.desc_act) g_idx[j] = static_cast<int32_t>(j / o.group_size);
    else g_idx[perm[j]] = static_cast<int32_t>(j / o.group_size);
  }

  QuantizeStats local;
  local.dead_columns = dead_count;
  std::vector<float> upper(static_cast<size_t>(k * k));
  GPTQKIT_RETURN_IF_ERROR(detail::inverse_upper_factor(hessian.data, h64, k, perm.data(), dead.data(),
                                                       o.damp_percent, o.max_damp_retries, upper.data(), &local));

  // GPTQ's per-column loss weight 1 / U_jj^2, indexed by original column,
  // for the clipping search of grids fixed before the sweep.
  const GridSearch search = grid_search_of(o);
  std::vector<float> col_weight;
  if (o.clip_steps > 0 && o.clip_hessian_weighted) {
    col_weight.resize(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) {
      const float d = upper[static_cast<size_t>(j * k + j)];
      col_weight[static_cast<size_t>(perm[j])] = 1.0f / (d * d);
    }
  }
  const float* weight_of = col_weight.empty() ? nullptr : col_weight.data();

  // Grids fixed before the sweep: per output channel, or static groups taken
  // from the unpermuted weight.
  std::vector<Grid> fixed;
  float* scales = static_cast<float*>(out.scales.data);
  int32_t* zeros = static_cast<int32_t*>(out.zeros.data);
  if (o.group_size < 0) {
    fixed.resize(static_cast<size_t>(n));
    parallel_for(n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        fixed[r] = search_grid(w.data() + r * k, weight_of, k, maxq, o.sym, search);
        scales[r] = fixed[r].scale;
        zeros[r] = fixed[r].zero;
      }
    });
  } else if (o.static_groups) {
    fixed.resize(static_cast<size_t>(g * n));
    parallel_for(n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t c0 = gi * o.group_size, c1 = std::min(k, c0 + o.group_size);
        for (int64_t r = r0; r < r1; ++r) {
          const Grid grid = search_grid(w.data() + r * k + c0, weight_of ? weight_of + c0 : nullptr, c1 - c0, maxq,
                                        o.sym, search);
          fixed[static_cast<size_t>(gi * n + r)] = grid;
          scales[gi * n + r] = grid.scale;
          zeros[gi * n + r] = grid.zero;
        }
      }
    });
  }

  if (o.desc_act || o.act_group_aware) {
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
      float* wr = w.data() + r * k;
      for (int64_t j = 0; j < k; ++j) row[j] = wr[perm[j]];
      std::copy(row.begin(), row.end(), wr);
    }
  }

  ColumnSweep sweep(o, n, k, w, upper.data(), perm, fixed, out);
  local.loss = sweep.run();
  if (stats) *stats = local;
  return Status::Ok();
}

}  // namespace

Status quantize_weight(const TensorView& weight, const TensorView& hessian, const QuantizeOptions& options,
                       const QuantizeOutputs& out, QuantizeStats* stats, void* stream) {
  Status routed;
  if (route_to_gpu({{&weight, "weight"}, {&hessian, "hessian"}, {&out.codes, "codes"}, {&out.scales, "scales"},
                    {&out.zeros, "zeros"}, {&out.g_idx, "g_idx"}, {&out.perm, "perm"}},
                   &routed)) {
    if (!routed.ok()) return routed;
#if defined(GPTQKIT_HAS_GPU)
    try {
      return gpu::quantize_weight(weight, hessian, options, out, stats, stream);
    } catch (const std::exception& e) {
      return Status::Internal(std::string("internal error in the GPU solver: ") + e.what());
    }
#endif
  }
  try {
    return quantize_impl(weight, hessian, options, out, stats);
  } catch (const std::bad_alloc&) {
    return Status::Internal("out of memory while quantizing a weight of shape " + shape_string(weight));
  } catch (const std::exception& e) {
    return Status::Internal(std::string("internal error while quantizing: ") + e.what());
  }
}

}  // namespace gptqkit
