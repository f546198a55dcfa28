// Damped Cholesky factor of H^-1 on the GPU, in float64, with own kernels
// (no cuSOLVER / cuBLAS: Debian's HIP has no counterpart, and one tested
// path serves both vendors).
//
// Same algebra as cpp/src/cholesky.cpp: factor the index-reversed matrix
// A = J (H + lambda I) J = L L^T (J the exchange matrix); then
// U = J L^-1 J is upper triangular with H^-1 = U^T U. One Cholesky and one
// triangular inverse instead of Cholesky, inverse and a second Cholesky.
// float64 because damped Hessians of real layers reach condition numbers
// where float32 factorizations lose most digits (and H100-class GPUs have
// fast FP64).
//
// Both steps are blocked right-looking algorithms over 64 x 64 tiles: a
// small kernel for the diagonal block, one for the panel, and a tiled
// rank-64 update of everything to the right/below, which holds almost all
// the flops. Matrices are row-major K x K; only lower triangles are used.
#include <algorithm>
#include <cmath>

#include "checks.h"
#include "damping.h"
#include "gpu_solver_api.h"
#include "gpu_solver_internal.h"

namespace gptqkit::gpu {
namespace {

constexpr int kNb = 64;          // block size of both factorizations
constexpr int kUpdThreads = 256; // tile update: 16 x 16 threads, 4 x 4 outputs each
constexpr int kUpdDepth = 16;    // inner dimension per shared-memory stage

// A[i][j] (j <= i) = Hp[K-1-i][K-1-j] (+ lambda on the diagonal), where Hp is
// H in processing order with dead inputs' diagonal set to 1; upper part 0.
template <typename HT>
__global__ void build_kernel(const HT* __restrict__ h, int64_t k, const int64_t* __restrict__ perm,
                             const uint8_t* __restrict__ dead, double lambda, double* __restrict__ a) {
  const int64_t total = k * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t i = idx / k, j = idx % k;
    double v = 0.0;
    if (j <= i) {
      const int64_t pi = k - 1 - i, pj = k - 1 - j;
      const int64_t oi = perm ? perm[pi] : pi, oj = perm ? perm[pj] : pj;
      v = (oi == oj && dead && dead[oi]) ? 1.0 : static_cast<double>(h[oi * k + oj]);
      if (i == j) v += lambda;
    }
    a[idx] = v;
  }
}

// Unblocked Cholesky of the diagonal block kb in shared memory (one block of
// threads). On a non-positive pivot it records the order of the failing
// leading minor (as LAPACK's info) and every later kernel of the attempt
// returns at once.
__global__ __launch_bounds__(256) void potrf_diag_kernel(double* __restrict__ a, int64_t k, int64_t kb,
                                                         DeviceInfo* info) {
  if (info->chol_failed) return;
  __shared__ double s[kNb][kNb + 1];
  __shared__ int failed;
  const int64_t o = kb * kNb;
  const int n = static_cast<int>(min(static_cast<int64_t>(kNb), k - o));
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) s[e / n][e % n] = a[(o + e / n) * k + o + e % n];
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  for (int c = 0; c < n; ++c) {
    if (threadIdx.x == 0) {
      const double d = s[c][c];
      if (!(d > 0.0) || !isfinite(d)) failed = c + 1;
      else s[c][c] = sqrt(d);
    }
    __syncthreads();
    if (failed) break;  // read after the barrier: the same value in every thread
    const double piv = s[c][c];
    for (int r = c + 1 + threadIdx.x; r < n; r += blockDim.x) s[r][c] /= piv;
    __syncthreads();
    const int m = n - c - 1;
    for (int e = threadIdx.x; e < m * m; e += blockDim.x) {
      const int r = c + 1 + e / m, q = c + 1 + e % m;
      if (q <= r) s[r][q] -= s[r][c] * s[q][c];
    }
    __syncthreads();
  }
  if (failed) {
    if (threadIdx.x == 0) info->chol_failed = static_cast<int>(o) + failed;
    return;
  }
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int r = e / n, c = e % n;
    if (c <= r) a[(o + r) * k + o + c] = s[r][c];
  }
}

// Panel below the diagonal block: P = A_panel L_kk^-T, 64 rows per block of
// 64 threads, one row per thread (rows are independent).
__global__ __launch_bounds__(kNb) void trsm_panel_kernel(double* __restrict__ a, int64_t k, int64_t kb,
                                                         const DeviceInfo* info) {
  if (info->chol_failed) return;
  __shared__ double s[kNb][kNb + 1];  // s[col][row]: a thread walks its own row, conflict-free
  const int64_t o = kb * kNb;
  const int n = static_cast<int>(min(static_cast<int64_t>(kNb), k - o));
  const int64_t r0 = o + n + static_cast<int64_t>(blockIdx.x) * kNb;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kNb), k - r0));
  for (int e = threadIdx.x; e < rows * n; e += blockDim.x) s[e % n][e / n] = a[(r0 + e / n) * k + o + e % n];
  __syncthreads();
  const int t = threadIdx.x;
  if (t < rows) {
    for (int j = 0; j < n; ++j) {
      const double* lj = a + (o + j) * k + o;  // row j of L_kk: the same address in every thread
      double v = s[j][t];
      for (int q = 0; q < j; ++q) v -= s[q][t] * lj[q];
      s[j][t] = v / lj[j];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < rows * n; e += blockDim.x) a[(r0 + e / n) * k + o + e % n] = s[e % n][e / n];
}

// C[i][j] -= sum_{t < depth} A(i, t) B(t, j) over 64 x 64 tiles, with
// A(i, t) = a[i * k + t] and B(t, j) = b[t * bt + j * bc].
//  kLower: tiles (ti >= tj) of the lower triangle of the trailing matrix
//          starting at (base, base), elements with i >= j (Cholesky update);
//  else:   a rectangle of tiles_n tile columns starting at (row_base, 0)
//          (triangular-inverse update).
template <bool kLower>
__global__ __launch_bounds__(kUpdThreads) void tile_update_kernel(
    double* __restrict__ c, const double* __restrict__ a, const double* __restrict__ b, int64_t k, int64_t bt,
    int64_t bc, int64_t row_base, int64_t col_base, int64_t col_end, int64_t tiles_n, int depth,
    const DeviceInfo* info) {
  if (info && info->chol_failed) return;
  // +1: stores with t fastest would otherwise hit one bank 16 times.
  __shared__ double as[kUpdDepth][kNb + 1];
  __shared__ double bs[kUpdDepth][kNb + 1];
  int64_t ti, tj;
  const int64_t idx = blockIdx.x;
  if (kLower) {
    int64_t r = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(idx) + 1.0) - 1.0) * 0.5);
    while (r * (r + 1) / 2 > idx) --r;
    while ((r + 1) * (r + 2) / 2 <= idx) ++r;
    ti = r;
    tj = idx - r * (r + 1) / 2;
  } else {
    ti = idx / tiles_n;
    tj = idx % tiles_n;
  }
  const int64_t i0 = row_base + ti * kNb, j0 = col_base + tj * kNb;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  double acc[4][4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = 0.0;

  for (int t0 = 0; t0 < depth; t0 += kUpdDepth) {
    for (int e = threadIdx.x; e < kUpdDepth * kNb; e += kUpdThreads) {
      // A rows are contiguous in t: consecutive threads take consecutive t.
      const int t = e % kUpdDepth, rr = e / kUpdDepth;
      const int64_t i = i0 + rr;
      as[t][rr] = (i < k && t0 + t < depth) ? a[i * k + t0 + t] : 0.0;
      // B is contiguous along whichever index has stride 1.
      const int tb = bt == 1 ? e % kUpdDepth : e / kNb;
      const int cb = bt == 1 ? e / kUpdDepth : e % kNb;
      const int64_t j = j0 + cb;
      bs[tb][cb] = (j < col_end && t0 + tb < depth) ? b[(t0 + tb) * bt + j * bc] : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kUpdDepth; ++t) {
      double x[4], y[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        x[u] = as[t][ty + 16 * u];
        y[u] = bs[t][tx + 16 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += x[u] * y[v];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t i = i0 + ty + 16 * u, j = j0 + tx + 16 * v;
      if (i < k && j < col_end && (!kLower || j <= i)) c[i * k + j] -= acc[u][v];
    }
}

// X_bb = L_bb^-1 for every diagonal block (one block of 64 threads each; a
// thread solves one column by forward substitution; X starts zeroed).
__global__ __launch_bounds__(kNb) void diag_inverse_kernel(const double* __restrict__ l, double* __restrict__ x,
                                                           int64_t k) {
  __shared__ double s[kNb][kNb + 1];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kNb;
  const int n = static_cast<int>(min(static_cast<int64_t>(kNb), k - o));
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) s[e / n][e % n] = l[(o + e / n) * k + o + e % n];
  __syncthreads();
  const int c = threadIdx.x;
  if (c >= n) return;
  double* xc = x + o * k + o + c;  // column c of the block: element r at xc[r * k]
  for (int r = c; r < n; ++r) {
    double v = r == c ? 1.0 : 0.0;
    for (int t = c; t < r; ++t) v -= s[r][t] * xc[t * k];  // this thread's own earlier results
    xc[r * k] = v / s[r][r];
  }
}

// Block row ib of L^-1 left of the diagonal: X[ib][cb] = X_ib,ib * B[ib][cb],
// where B (accumulated in place by the updates) is -sum_t L[ib][t] X[t][cb].
__global__ __launch_bounds__(256) void finalize_row_kernel(double* __restrict__ x, int64_t k, int64_t ib) {
  __shared__ double s[kNb][kNb + 1];
  const int64_t o = ib * kNb, c0 = static_cast<int64_t>(blockIdx.x) * kNb;
  const int n = static_cast<int>(min(static_cast<int64_t>(kNb), k - o));
  for (int e = threadIdx.x; e < n * kNb; e += blockDim.x) s[e / kNb][e % kNb] = x[(o + e / kNb) * k + c0 + e % kNb];
  __syncthreads();
  for (int e = threadIdx.x; e < n * kNb; e += blockDim.x) {
    const int r = e / kNb, c = e % kNb;
    const double* d = x + (o + r) * k + o;  // row r of X_ib,ib (final, not written here)
    double v = 0.0;
    for (int q = 0; q <= r; ++q) v += d[q] * s[q][c];
    x[(o + r) * k + c0 + c] = v;
  }
}

// U[i][j] = (L^-1)[K-1-i][K-1-j] for j >= i, else 0 (fp32 output).
__global__ void extract_upper_kernel(const double* __restrict__ x, int64_t k, float* __restrict__ u) {
  const int64_t total = k * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t i = idx / k, j = idx % k;
    u[idx] = j >= i ? static_cast<float>(x[(k - 1 - i) * k + (k - 1 - j)]) : 0.0f;
  }
}

unsigned grid_for(int64_t total, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, threads), 65535)));
}

// Cholesky of a (lower) in place; failure is recorded in info->chol_failed.
Status launch_cholesky(double* a, int64_t k, DeviceInfo* info, gpuStream_t stream) {
  const int64_t nb = ceil_div(k, kNb);
  for (int64_t kb = 0; kb < nb; ++kb) {
    GPTQKIT_LAUNCH(1, 256, 0, stream, potrf_diag_kernel)(a, k, kb, info);
    GPTQKIT_GPU_LAUNCHED("potrf_diag_kernel");
    const int64_t below = k - (kb + 1) * kNb;
    if (below <= 0) break;
    GPTQKIT_LAUNCH(static_cast<unsigned>(ceil_div(below, kNb)), kNb, 0, stream, trsm_panel_kernel)(a, k, kb, info);
    GPTQKIT_GPU_LAUNCHED("trsm_panel_kernel");
    const int64_t m = ceil_div(below, kNb);
    const int64_t base = (kb + 1) * kNb;
    GPTQKIT_LAUNCH(static_cast<unsigned>(m * (m + 1) / 2), kUpdThreads, 0, stream, tile_update_kernel<true>)(
        a, a + kb * kNb, a + kb * kNb, k, 1, k, base, base, k, 0, kNb, info);
    GPTQKIT_GPU_LAUNCHED("tile_update_kernel<lower>");
  }
  return Status::Ok();
}

// x (zeroed) <- L^-1 for the lower factor l.
Status launch_tri_inverse(const double* l, double* x, int64_t k, gpuStream_t stream) {
  const int64_t nb = ceil_div(k, kNb);
  GPTQKIT_LAUNCH(static_cast<unsigned>(nb), kNb, 0, stream, diag_inverse_kernel)(l, x, k);
  GPTQKIT_GPU_LAUNCHED("diag_inverse_kernel");
  for (int64_t ib = 0; ib < nb; ++ib) {
    if (ib > 0) {
      GPTQKIT_LAUNCH(static_cast<unsigned>(ib), 256, 0, stream, finalize_row_kernel)(x, k, ib);
      GPTQKIT_GPU_LAUNCHED("finalize_row_kernel");
    }
    if (ib + 1 < nb) {
      // B[i][c] -= L[i][ib] X[ib][c] for block rows i > ib, block columns c <= ib.
      const int64_t row_base = (ib + 1) * kNb;
      const int64_t col_end = std::min(k, (ib + 1) * kNb);
      const int64_t tiles_m = ceil_div(k - row_base, kNb), tiles_n = ib + 1;
      const int depth = static_cast<int>(std::min<int64_t>(kNb, k - ib * kNb));
      GPTQKIT_LAUNCH(static_cast<unsigned>(tiles_m * tiles_n), kUpdThreads, 0, stream, tile_update_kernel<false>)(
          x, l + ib * kNb, x + ib * kNb * k, k, k, 1, row_base, 0, col_end, tiles_n, depth, nullptr);
      GPTQKIT_GPU_LAUNCHED("tile_update_kernel<rect>");
    }
  }
  return Status::Ok();
}

}  // namespace

Status factor_inverse_upper(const void* hessian, bool hessian_fp64, int64_t k, const int64_t* perm,
                            const uint8_t* dead, double mean_diag, double damp_percent, int max_retries,
                            float* upper, QuantizeStats* stats, DeviceInfo* info, gpuStream_t stream) {
  if (k <= 0 || k > (int64_t{1} << 20)) return Status::InvalidArgument("hessian: unsupported size " + std::to_string(k));
  if (!hessian || !upper || !info) return Status::InvalidArgument("hessian: null device pointer");
  Scratch scratch(stream);
  double* a = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&a, k * k, "the float64 Cholesky factor"));
  const unsigned grid = grid_for(k * k, 256);
  detail::DampingLadder damping(damp_percent, max_retries, mean_diag);
  for (;;) {
    const double lambda = damping.lambda();
    GPTQKIT_GPU_TRY(gpuMemsetAsync(&info->chol_failed, 0, sizeof(int), stream), "resetting the Cholesky flag");
    if (hessian_fp64)
      GPTQKIT_LAUNCH(grid, 256, 0, stream, build_kernel<double>)(
          static_cast<const double*>(hessian), k, perm, dead, lambda, a);
    else
      GPTQKIT_LAUNCH(grid, 256, 0, stream, build_kernel<float>)(
          static_cast<const float*>(hessian), k, perm, dead, lambda, a);
    GPTQKIT_GPU_LAUNCHED("build_kernel");
    GPTQKIT_RETURN_IF_ERROR(launch_cholesky(a, k, info, stream));
    // One host synchronisation per attempt: the next damping (or the error)
    // depends on whether this factorization succeeded.
    DeviceInfo host;
    GPTQKIT_RETURN_IF_ERROR(info_read(info, &host, stream));
    if (host.chol_failed == 0) break;
    if (!damping.next()) return damping.failure(host.chol_failed);
  }
  damping.record(stats);

  double* x = nullptr;
  GPTQKIT_RETURN_IF_ERROR(scratch.alloc(&x, k * k, "the float64 inverse factor"));
  GPTQKIT_GPU_TRY(gpuMemsetAsync(x, 0, static_cast<size_t>(k * k) * sizeof(double), stream), "zeroing the inverse");
  GPTQKIT_RETURN_IF_ERROR(launch_tri_inverse(a, x, k, stream));
  GPTQKIT_LAUNCH(grid, 256, 0, stream, extract_upper_kernel)(x, k, upper);
  GPTQKIT_GPU_LAUNCHED("extract_upper_kernel");
  return Status::Ok();
}

}  // namespace gptqkit::gpu
