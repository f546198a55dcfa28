// The GPTQ solver on the GPU: the same computation as cpp/src/solver.cpp
// (read it first), with the same options and the same rules, so codes agree
// with the CPU path up to float32 rounding in the lazy updates.
//
// Pipeline (all on the caller's stream):
//   diag(H), dead inputs, finiteness checks      -> one host read (validation)
//   processing order (act-order: stable descending sort of diag on the GPU), g_idx
//   damped float64 Cholesky factor U of H^-1     -> one host read per attempt
//   grids fixed before the sweep (per channel / static groups)
//   W in processing order, fp32, dead columns zeroed
//   per lazy block: one kernel for the in-block column loop (a warp per row:
//   rows are independent given U), then a tiled GEMM for the trailing update
//   W[:, i2:] -= Err @ U[i1:i2, i2:]; no host synchronisation in this loop
//   loss                                          -> one host read (stats)
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "checks.h"
#include "damping.h"
#include "gpu_solver_api.h"
#include "gpu_solver_internal.h"
#include "solver_args.h"

namespace gptqkit::gpu {
namespace {

constexpr int kThreads = 256;
// Widest lazy block the sweep kernel holds in registers: a lane owns
// kMaxLazyBlock / kWarpSize columns of its row (8 on 32-wide warps, 4 on 64).
constexpr int kMaxLazyBlock = 256;

template <typename T>
__device__ __forceinline__ float as_float(T v) {
  return gpu_to_float(v);
}
template <>
__device__ __forceinline__ float as_float<double>(double v) {
  return static_cast<float>(v);
}

// diag(H) with dead inputs (H_ii == 0) set to 1, the dead flags, their count
// and the sum of the diagonal (one block: a fixed summation order, so the
// damping is the same from run to run).
template <typename HT>
__global__ __launch_bounds__(kThreads) void diag_kernel(const HT* __restrict__ h, int64_t k, double* __restrict__ diag,
                                                       uint8_t* __restrict__ dead, DeviceInfo* info) {
  __shared__ double sums[kThreads];
  __shared__ long long counts[kThreads];
  double sum = 0.0;
  long long count = 0;
  for (int64_t i = threadIdx.x; i < k; i += kThreads) {
    double d = static_cast<double>(h[i * k + i]);
    const bool is_dead = d == 0.0;
    if (is_dead) {
      d = 1.0;
      ++count;
    }
    if (dead) dead[i] = is_dead ? 1 : 0;
    if (diag) diag[i] = d;
    sum += d;
  }
  sums[threadIdx.x] = sum;
  counts[threadIdx.x] = count;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) {
      sums[threadIdx.x] += sums[threadIdx.x + s];
      counts[threadIdx.x] += counts[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    info->diag_sum = sums[0];
    info->dead_count = counts[0];
  }
}

// Processing order, the CPU's detail::processing_order as rank counts
// (O(K^2) comparisons for desc_act, O(K * (group_size + K / group_size)) for
// act_group_aware): identity; act-order (descending diag, ties by index: a
// stable sort); or group-aware act-order (columns by descending diag within
// their group, full groups by descending group_max, a partial group last).
enum class ColumnOrder : int { kNatural, kDescAct, kGroupAware };

__global__ void group_max_kernel(const double* __restrict__ diag, int64_t group_size, int64_t full_groups,
                                 double* __restrict__ group_max) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= full_groups) return;
  const double* d = diag + g * group_size;
  double m = d[0];
  for (int64_t j = 1; j < group_size; ++j) m = fmax(m, d[j]);
  group_max[g] = m;
}

__global__ void perm_kernel(const double* __restrict__ diag, int64_t k, ColumnOrder order, int64_t group_size,
                            const double* __restrict__ group_max, int64_t* __restrict__ perm) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= k) return;
  const double di = diag[i];
  auto before = [di, i](double dj, int64_t j) { return dj > di || (dj == di && j < i); };
  if (order == ColumnOrder::kNatural) {
    perm[i] = i;
  } else if (order == ColumnOrder::kDescAct) {
    int64_t rank = 0;
    for (int64_t j = 0; j < k; ++j) rank += before(diag[j], j) ? 1 : 0;
    perm[rank] = i;
  } else {
    const int64_t g = i / group_size, c0 = g * group_size, c1 = min(k, c0 + group_size);
    const int64_t full = k / group_size;
    int64_t local = 0;
    for (int64_t j = c0; j < c1; ++j) local += before(diag[j], j) ? 1 : 0;
    int64_t group_rank = g;  // the partial group (g == full) keeps the last place
    if (g < full) {
      const double key = group_max[g];
      group_rank = 0;
      for (int64_t h = 0; h < full; ++h) {
        const double kh = group_max[h];
        group_rank += (kh > key || (kh == key && h < g)) ? 1 : 0;
      }
    }
    perm[group_rank * group_size + local] = i;
  }
}

__global__ void g_idx_kernel(const int64_t* __restrict__ perm, int64_t k, int64_t group_size, bool by_position,
                             int32_t* __restrict__ g_idx) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  if (group_size < 0) g_idx[j] = 0;
  else if (by_position) g_idx[j] = static_cast<int32_t>(j / group_size);
  else g_idx[perm[j]] = static_cast<int32_t>(j / group_size);
}

// GPTQ's per-column loss weight 1 / U_jj^2, by position and by original column.
__global__ void col_weight_kernel(const float* __restrict__ u, const int64_t* __restrict__ perm, int64_t k,
                                  float* __restrict__ by_pos, float* __restrict__ by_col) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const float d = u[j * k + j];
  const float w = 1.0f / (d * d);
  by_pos[j] = w;
  by_col[perm[j]] = w;
}

// Grids fixed before the sweep from the unpermuted weight (dead columns as
// 0): one warp per (row, group); group_size < 0 is one group of K columns.
template <typename T>
__global__ __launch_bounds__(kThreads) void fixed_grid_kernel(const T* __restrict__ w, int64_t n, int64_t k,
                                                              const uint8_t* __restrict__ dead,
                                                              const float* __restrict__ col_weight, int64_t group_size,
                                                              int64_t groups, int maxq, bool sym, GpuGridSearch search,
                                                              float* __restrict__ scales, int32_t* __restrict__ zeros) {
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (task >= n * groups) return;  // uniform per warp
  const int64_t g = task / n, r = task % n;
  const int64_t c0 = group_size < 0 ? 0 : g * group_size;
  const int64_t c1 = group_size < 0 ? k : min(k, c0 + group_size);
  const T* row = w + r * k + c0;
  const uint8_t* dd = dead + c0;
  auto load = [=](int64_t j) -> float { return dd[j] ? 0.0f : as_float(row[j]); };
  const GpuGrid grid =
      gpu_warp_search_grid(load, col_weight ? col_weight + c0 : nullptr, c1 - c0, maxq, sym, search);
  if (threadIdx.x % kWarpSize == 0) {
    scales[g * n + r] = grid.scale;
    zeros[g * n + r] = grid.zero;
  }
}

// W in processing order, fp32, dead columns zeroed.
template <typename T>
__global__ void load_weight_kernel(const T* __restrict__ w, int64_t n, int64_t k, const int64_t* __restrict__ perm,
                                   const uint8_t* __restrict__ dead, float* __restrict__ wp) {
  const int64_t total = n * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / k, j = idx % k;
    const int64_t c = perm[j];
    wp[idx] = dead[c] ? 0.0f : as_float(w[r * k + c]);
  }
}

struct SweepArgs {
  const float* w;          // [N, K] processing order, state at the start of the block
  const float* u;          // [K, K] upper factor of H^-1, processing order
  const int64_t* perm;     // [K]
  const float* col_weight; // [K] by position, or null (clip search unweighted / off)
  uint8_t* codes;          // [N, K] original column order
  float* scales;           // [G, N]
  int32_t* zeros;          // [G, N]
  float* err;              // [N, ld_err]
  double* row_loss;        // [N]
  int64_t n, k, ld_err, group_size;
  int maxq;
  bool sym, static_groups;
  bool group_by_position;  // desc_act: a group is a run of positions; else perm[pos] / group_size
  GpuGridSearch search;
};

// The group whose grid starts at position `pos` (a multiple of group_size),
// as the CPU's detail::group_at_position.
__device__ __forceinline__ int64_t group_at_position(const SweepArgs& p, int64_t pos) {
  return (p.group_by_position ? pos : p.perm[pos]) / p.group_size;
}

// The in-block column loop of one lazy block [i1, i1 + width): one warp per
// row. Lane l owns columns l, l + W, l + 2W, ... of the block (W the warp
// width) in registers; column i's value is broadcast from its owner, every
// lane quantizes it (same inputs, same result) and updates the columns it
// owns to the right of i. Grids of groups starting inside the block come from
// the block-start weights in global memory (the reference GPTQ rule).
__global__ __launch_bounds__(kThreads) void sweep_block_kernel(SweepArgs p, int64_t i1, int width) {
  constexpr int kSlots = kMaxLazyBlock / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (r >= p.n) return;  // uniform per warp; the kernel has no block-wide barrier
  const int64_t k = p.k, n = p.n;
  const float* wrow = p.w + r * k;
  float w1[kSlots], e_own[kSlots];
  int code_own[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int j = lane + s * kWarpSize;
    w1[s] = j < width ? wrow[i1 + j] : 0.0f;
    e_own[s] = 0.0f;
    code_own[s] = 0;
  }
  GpuGrid grid{1.0f, 0};
  if (p.group_size < 0) {
    grid = GpuGrid{p.scales[r], p.zeros[r]};
  } else if (!p.static_groups && i1 % p.group_size != 0) {
    // A group that began in an earlier block: its grid was stored then.
    const int64_t g = group_at_position(p, i1 - i1 % p.group_size);
    grid = GpuGrid{p.scales[g * n + r], p.zeros[g * n + r]};
  }
  double loss = 0.0;
  for (int i = 0; i < width; ++i) {
    const int64_t col = i1 + i;
    if (p.group_size > 0) {
      if (p.static_groups) {
        const int64_t g = p.perm[col] / p.group_size;
        grid = GpuGrid{p.scales[g * n + r], p.zeros[g * n + r]};
      } else if (col % p.group_size == 0) {
        const int64_t count = min(col + p.group_size, k) - col;
        const float* src = wrow + col;
        auto load = [=](int64_t j) -> float { return src[j]; };
        grid = gpu_warp_search_grid(load, p.col_weight ? p.col_weight + col : nullptr, count, p.maxq, p.sym,
                                    p.search);
        if (lane == 0) {
          const int64_t g = group_at_position(p, col);
          p.scales[g * n + r] = grid.scale;
          p.zeros[g * n + r] = grid.zero;
        }
      }
    }
    const int owner = i % kWarpSize, slot = i / kWarpSize;
    float mine = 0.0f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (s == slot) mine = w1[s];  // static register indexing, no local memory
    const float x = gpu_shfl(mine, owner);
    const int32_t code = gpu_quantize_code(x, grid, p.maxq);
    const float q = gpu_dequantize_code(code, grid);
    const float* urow = p.u + col * k + i1;
    const float e = (x - q) / urow[i];
    loss = __dadd_rn(loss, __dmul_rn(static_cast<double>(e), static_cast<double>(e)));
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int j = lane + s * kWarpSize;
      if (j == i) {
        e_own[s] = e;
        code_own[s] = code;
      } else if (j > i && j < width) {
        // Unfused, as the CPU computes it: the same rounding, the same codes.
        w1[s] = __fsub_rn(w1[s], __fmul_rn(e, urow[j]));
      }
    }
  }
  uint8_t* codes = p.codes + r * k;
  float* err = p.err + r * p.ld_err;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int j = lane + s * kWarpSize;
    if (j < width) {
      codes[p.perm[i1 + j]] = static_cast<uint8_t>(code_own[s]);
      err[j] = e_own[s];
    }
  }
  if (lane == 0) p.row_loss[r] += loss;  // one warp per row: no atomics, a fixed order
}

// Lazy batch update W[:, i2:] -= Err[:, :width] @ U[i1:i1+width, i2:], fp32,
// 64 x 64 output tiles, 16 x 16 threads with 4 x 4 outputs each.
constexpr int kGemmTile = 64;
constexpr int kGemmDepth = 16;

__global__ __launch_bounds__(kThreads) void lazy_update_kernel(float* __restrict__ w, const float* __restrict__ err,
                                                               const float* __restrict__ u, int64_t n, int64_t k,
                                                               int64_t ld_err, int64_t i1, int64_t i2, int width) {
  __shared__ float es[kGemmDepth][kGemmTile + 1];  // +1: stores with t fastest spread over banks
  __shared__ float us[kGemmDepth][kGemmTile];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;
  const int64_t c0 = i2 + static_cast<int64_t>(blockIdx.x) * kGemmTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  for (int t0 = 0; t0 < width; t0 += kGemmDepth) {
    for (int e = threadIdx.x; e < kGemmDepth * kGemmTile; e += kThreads) {
      const int t = e % kGemmDepth, rr = e / kGemmDepth;  // Err rows are contiguous in t
      es[t][rr] = (r0 + rr < n && t0 + t < width) ? err[(r0 + rr) * ld_err + t0 + t] : 0.0f;
      const int tb = e / kGemmTile, cc = e % kGemmTile;  // U rows are contiguous in the column
      us[tb][cc] = (c0 + cc < k && t0 + tb < width) ? u[(i1 + t0 + tb) * k + c0 + cc] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kGemmDepth; ++t) {
      float a[4], b[4];
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        a[v] = es[t][ty + 16 * v];
        b[v] = us[t][tx + 16 * v];
      }
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] += a[x] * b[y];
    }
    __syncthreads();
  }
#pragma unroll
  for (int x = 0; x < 4; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      const int64_t r = r0 + ty + 16 * x, c = c0 + tx + 16 * y;
      if (r < n && c < k) w[r * k + c] -= acc[x][y];
    }
}

__global__ __launch_bounds__(kThreads) void loss_kernel(const double* __restrict__ row_loss, int64_t n,
                                                        DeviceInfo* info) {
  __shared__ double sums[kThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += row_loss[i];
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (static_cast<int>(threadIdx.x) < h) sums[threadIdx.x] += sums[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) info->loss = sums[0];
}

unsigned grid_stride_blocks(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kThreads), 65535)));
}

Status on_device(const TensorView& t, const char* name, const Device& device) {
  if (t.ndim < 0 || t.ndim > kMaxTensorDims)
    return Status::InvalidArgument(std::string(name) + ": unsupported rank " + std::to_string(t.ndim));
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] < 0)
      return Status::InvalidArgument(std::string(name) + ": negative extent in shape " + shape_string(t));
  if (t.device.type == DeviceType::kCPU)
    return Status::InvalidArgument(std::string(name) +
                                   ": expected a tensor on the GPU like the weight (every tensor of one call must be "
                                   "on the same device)");
  if (t.device.type != device.type || t.device.index != device.index)
    return Status::InvalidArgument(std::string(name) + ": on GPU " + std::to_string(t.device.index) +
                                   ", but the weight is on GPU " + std::to_string(device.index) +
                                   " (every tensor of one call must be on the same device)");
  if (t.numel() > 0 && t.data == nullptr) return Status::InvalidArgument(std::string(name) + ": null data pointer");
  if (!t.is_contiguous())
    return Status::InvalidArgument(std::string(name) + ": expected a C-contiguous (row-major) array, got shape " +
                                   shape_string(t) + " with non-contiguous strides; call .contiguous() first");
  return Status::Ok();
}

template <typename Launch>
Status by_weight_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(static_cast<const float*>(nullptr)); break;
    case DType::kFloat16: launch(static_cast<const gpu_half*>(nullptr)); break;
    case DType::kBFloat16: launch(static_cast<const gpu_bfloat16*>(nullptr)); break;
    case DType::kFloat64: launch(static_cast<const double*>(nullptr)); break;
    default: return Status::InvalidArgument("weight: unsupported dtype");
  }
  return Status::Ok();
}

}  // namespace

Status quantize_weight(const TensorView& weight, const TensorView& hessian, const QuantizeOptions& o,
                       const QuantizeOutputs& out, QuantizeStats* stats, void* stream_ptr) {
  // ---- validation, before any memory is touched ----
  const Device dev = weight.device;
  detail::QuantizeShape shape;
  GPTQKIT_RETURN_IF_ERROR(detail::check_quantize_args(
      weight, hessian, o, out, [&](const TensorView& t, const char* name) { return on_device(t, name, dev); },
      &shape));
  const int64_t n = shape.n, k = shape.k, groups = shape.groups;
  // n: the trailing update's grid has ceil(n / 64) rows of tiles, at most 65535.
  if (n > int64_t{65535} * kGemmTile || k > (int64_t{1} << 20))
    return Status::InvalidArgument("weight: dimensions too large for the GPU solver (at most 4194240 x 1048576), got " +
                                   shape_string(weight));
  const int64_t block = std::min(o.block_size, k);
  if (block > kMaxLazyBlock)
    return Status::Unsupported("block_size: the GPU solver supports lazy blocks of at most " +
                               std::to_string(kMaxLazyBlock) + " columns, got " + std::to_string(o.block_size));

  DeviceGuard guard(dev.index);
  GPTQKIT_RETURN_IF_ERROR(guard.status());
  gpuStream_t stream = static_cast<gpuStream_t>(stream_ptr);
  Scratch scratch(stream);
  const int maxq = (1 << o.bits) - 1;
  const bool h64 = hessian.dtype == DType::kFloat64;
  const int ws = gpu_warp_size();
  const int rows_per_block = std::max(1, kThreads / ws);

  // ---- checks and the diagonal: first host read ----
  DeviceInfo* info = nullptr;
  double* diag = nullptr;
  uint8_t* dead = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&info, 1, "the check results"));
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&diag, k, "diag(H)"));
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&dead, k, "the dead-input flags"));
  GPTQKIT_RETURN_IF_ERROR(info_reset(info, stream));
  GPTQKIT_RETURN_IF_ERROR(launch_finite_check(weight, &info->bad_weight, stream));
  GPTQKIT_RETURN_IF_ERROR(launch_finite_check(hessian, &info->bad_hessian, stream));
  if (h64) GPTQKIT_LAUNCH(1, kThreads, 0, stream, diag_kernel<double>)(
      static_cast<const double*>(hessian.data), k, diag, dead, info);
  else GPTQKIT_LAUNCH(1, kThreads, 0, stream, diag_kernel<float>)(
      static_cast<const float*>(hessian.data), k, diag, dead, info);
  GPTQKIT_GPU_LAUNCHED("diag_kernel");
  DeviceInfo host;
  GPTQKIT_RETURN_IF_ERROR(info_read(info, &host, stream));
  if (host.bad_weight != ~0ull)
    return Status::InvalidArgument("weight: contains NaN or Inf (first at flat index " +
                                   std::to_string(host.bad_weight) + ")");
  if (host.bad_hessian != ~0ull)
    return Status::InvalidArgument("hessian: contains NaN or Inf (first at flat index " +
                                   std::to_string(host.bad_hessian) + ")");
  const double mean_diag = host.diag_sum / static_cast<double>(k);
  GPTQKIT_RETURN_IF_ERROR(detail::check_mean_diagonal(mean_diag));

  // ---- processing order and g_idx ----
  int64_t* perm = static_cast<int64_t*>(out.perm.data);
  const unsigned kb = static_cast<unsigned>(ceil_div(k, kThreads));
  const ColumnOrder order = o.desc_act ? ColumnOrder::kDescAct
                            : o.act_group_aware ? ColumnOrder::kGroupAware : ColumnOrder::kNatural;
  double* group_max = nullptr;
  if (order == ColumnOrder::kGroupAware && k / o.group_size > 0) {
    const int64_t full = k / o.group_size;
    GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&group_max, full, "group maxima of diag(H)"));
    GPTQKIT_LAUNCH(static_cast<unsigned>(ceil_div(full, kThreads)), kThreads, 0, stream, group_max_kernel)(
        diag, o.group_size, full, group_max);
    GPTQKIT_GPU_LAUNCHED("group_max_kernel");
  }
  GPTQKIT_LAUNCH(kb, kThreads, 0, stream, perm_kernel)(diag, k, order, o.group_size, group_max, perm);
  GPTQKIT_GPU_LAUNCHED("perm_kernel");
  GPTQKIT_LAUNCH(kb, kThreads, 0, stream, g_idx_kernel)(perm, k, o.group_size, o.static_groups || !o.desc_act,
                                            static_cast<int32_t*>(out.g_idx.data));
  GPTQKIT_GPU_LAUNCHED("g_idx_kernel");

  // ---- U, the upper factor of (H + lambda I)^-1 in processing order ----
  QuantizeStats local;
  local.dead_columns = host.dead_count;
  float* u = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&u, k * k, "the inverse Hessian factor"));
  GPTQKIT_RETURN_IF_ERROR(factor_inverse_upper(hessian.data, h64, k, perm, dead, mean_diag, o.damp_percent,
                                               o.max_damp_retries, u, &local, info, stream));

  float* col_pos = nullptr;
  float* col_orig = nullptr;
  if (o.clip_steps > 0 && o.clip_hessian_weighted) {
    GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&col_pos, k, "column weights"));
    GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&col_orig, k, "column weights"));
    GPTQKIT_LAUNCH(kb, kThreads, 0, stream, col_weight_kernel)(u, perm, k, col_pos, col_orig);
    GPTQKIT_GPU_LAUNCHED("col_weight_kernel");
  }
  GpuGridSearch search;
  search.steps = o.clip_steps;
  search.min_ratio = static_cast<float>(o.clip_min_ratio);
  search.norm = static_cast<float>(o.clip_norm);
  search.fp16_scales = o.fp16_scales;
  search.min_zero = o.min_zero_point;

  float* scales = static_cast<float*>(out.scales.data);
  int32_t* zeros = static_cast<int32_t*>(out.zeros.data);

  // ---- grids fixed before the sweep ----
  if (o.group_size < 0 || o.static_groups) {
    const int64_t tasks = n * groups;
    const unsigned blocks = static_cast<unsigned>(ceil_div(tasks, rows_per_block));
    const int64_t gs = o.group_size < 0 ? -1 : o.group_size;
    GPTQKIT_RETURN_IF_ERROR(by_weight_dtype(weight.dtype, [&](auto tag) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      GPTQKIT_LAUNCH(blocks, kThreads, 0, stream, fixed_grid_kernel<T>)(
          static_cast<const T*>(weight.data), n, k, dead, col_orig, gs, groups, maxq, o.sym, search, scales, zeros);
    }));
    GPTQKIT_GPU_LAUNCHED("fixed_grid_kernel");
  }

  // ---- W in processing order ----
  float* wp = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&wp, n * k, "the working copy of the weight"));
  GPTQKIT_RETURN_IF_ERROR(by_weight_dtype(weight.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    GPTQKIT_LAUNCH(grid_stride_blocks(n * k), kThreads, 0, stream, load_weight_kernel<T>)(
        static_cast<const T*>(weight.data), n, k, perm, dead, wp);
  }));
  GPTQKIT_GPU_LAUNCHED("load_weight_kernel");

  // ---- the sweep ----
  float* err = nullptr;
  double* row_loss = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&err, n * block, "the lazy-block errors"));
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&row_loss, n, "per-row losses"));
  GPTQKIT_GPU_TRY(gpuMemsetAsync(row_loss, 0, static_cast<size_t>(n) * sizeof(double), stream), "zeroing losses");
  SweepArgs args;
  args.w = wp;
  args.u = u;
  args.perm = perm;
  args.col_weight = col_pos;
  args.codes = static_cast<uint8_t*>(out.codes.data);
  args.scales = scales;
  args.zeros = zeros;
  args.err = err;
  args.row_loss = row_loss;
  args.n = n;
  args.k = k;
  args.ld_err = block;
  args.group_size = o.group_size > 0 ? o.group_size : -1;
  args.maxq = maxq;
  args.sym = o.sym;
  args.static_groups = o.static_groups;
  args.group_by_position = o.desc_act;
  args.search = search;
  const unsigned sweep_blocks = static_cast<unsigned>(ceil_div(n, rows_per_block));
  const unsigned row_tiles = static_cast<unsigned>(ceil_div(n, kGemmTile));
  for (int64_t i1 = 0; i1 < k; i1 += block) {
    const int64_t i2 = std::min(i1 + block, k);
    const int width = static_cast<int>(i2 - i1);
    GPTQKIT_LAUNCH(sweep_blocks, kThreads, 0, stream, sweep_block_kernel)(args, i1, width);
    GPTQKIT_GPU_LAUNCHED("sweep_block_kernel");
    if (i2 < k) {
      const dim3 grid(static_cast<unsigned>(ceil_div(k - i2, kGemmTile)), row_tiles);
      GPTQKIT_LAUNCH(grid, kThreads, 0, stream, lazy_update_kernel)(wp, err, u, n, k, block, i1, i2, width);
      GPTQKIT_GPU_LAUNCHED("lazy_update_kernel");
    }
  }
  GPTQKIT_LAUNCH(1, kThreads, 0, stream, loss_kernel)(row_loss, n, info);
  GPTQKIT_GPU_LAUNCHED("loss_kernel");
  GPTQKIT_RETURN_IF_ERROR(info_read(info, &host, stream));
  local.loss = host.loss / 2.0;
  if (stats) *stats = local;
  return Status::Ok();
}

Status inverse_hessian_upper_factor(const TensorView& hessian, double damp_percent, int max_retries,
                                    const TensorView& upper, QuantizeStats* stats, void* stream_ptr) {
  const Device dev = hessian.device;
  GPTQKIT_RETURN_IF_ERROR(on_device(hessian, "hessian", dev));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(hessian, "hessian", {DType::kFloat32, DType::kFloat64}));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(hessian, "hessian", 2));
  const int64_t k = hessian.shape[0];
  if (k <= 0) return Status::InvalidArgument("hessian: expected a non-empty square matrix, got " + shape_string(hessian));
  if (k > (int64_t{1} << 20)) return Status::InvalidArgument("hessian: too large for the GPU solver");
  GPTQKIT_RETURN_IF_ERROR(checks::shape_is(hessian, "hessian", {k, k}));
  GPTQKIT_RETURN_IF_ERROR(on_device(upper, "upper", dev));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(upper, "upper", {DType::kFloat32}));
  GPTQKIT_RETURN_IF_ERROR(checks::shape_is(upper, "upper", {k, k}));
  if (!(damp_percent >= 0.0) || !std::isfinite(damp_percent))
    return Status::InvalidArgument("damp_percent: expected a finite value >= 0");

  DeviceGuard guard(dev.index);
  GPTQKIT_RETURN_IF_ERROR(guard.status());
  gpuStream_t stream = static_cast<gpuStream_t>(stream_ptr);
  Scratch scratch(stream);
  const bool h64 = hessian.dtype == DType::kFloat64;
  DeviceInfo* info = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&info, 1, "the check results"));
  GPTQKIT_RETURN_IF_ERROR(info_reset(info, stream));
  GPTQKIT_RETURN_IF_ERROR(launch_finite_check(hessian, &info->bad_hessian, stream));
  // Without dead-input handling (as the CPU entry point): diag read as is.
  if (h64) GPTQKIT_LAUNCH(1, kThreads, 0, stream, diag_kernel<double>)(
      static_cast<const double*>(hessian.data), k, nullptr, nullptr, info);
  else GPTQKIT_LAUNCH(1, kThreads, 0, stream, diag_kernel<float>)(
      static_cast<const float*>(hessian.data), k, nullptr, nullptr, info);
  GPTQKIT_GPU_LAUNCHED("diag_kernel");
  DeviceInfo host;
  GPTQKIT_RETURN_IF_ERROR(info_read(info, &host, stream));
  if (host.bad_hessian != ~0ull)
    return Status::InvalidArgument("hessian: contains NaN or Inf (first at flat index " +
                                   std::to_string(host.bad_hessian) + ")");
  // diag_kernel counted zero diagonals as 1; this entry point takes H as is.
  const double mean_diag = (host.diag_sum - static_cast<double>(host.dead_count)) / static_cast<double>(k);
  GPTQKIT_RETURN_IF_ERROR(detail::check_mean_diagonal(mean_diag));
  return factor_inverse_upper(hessian.data, h64, k, nullptr, nullptr, mean_diag, damp_percent, max_retries,
                              static_cast<float*>(upper.data), stats, info, stream);
}

}  // namespace gptqkit::gpu
