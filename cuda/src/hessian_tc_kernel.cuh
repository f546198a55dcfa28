// The pipelined tensor-core SYRK kernel of the Hessian accumulation (device
// code only; launched from gpu_hessian.cu): H_upper <- beta H + alpha X^T X
// for 16-bit X whose rows are 16-byte aligned (K a multiple of 8).
//
// Why it looks like this (the first tensor-core kernel transposed X while
// staging it with 2-byte loads and waited on every stage: ~70 TFLOP/s on an
// H100, 6 s for a 28672-wide layer over 262,144 tokens):
//   * X is copied into shared memory as it lies in memory (rows of features,
//     16-byte cp.async, zero-filled past the edges) in a 3-deep ring of
//     32-row stages, one barrier per stage. The mma fragments want pairs
//     along the row index, which ldmatrix.trans delivers from that layout;
//   * 16-byte chunks are XOR-swizzled by row (chunk ^ row % 8), so the eight
//     row addresses of one ldmatrix phase fall in distinct bank groups
//     without padding (3 stages x 2 tiles x 8 KB = the 48 KB a block gets);
//   * tiles are handed out in 8 x 8 super-tiles of the upper triangle, so the
//     blocks resident at one time share ~16 column stripes of X and re-read
//     them from L2 instead of DRAM (the stripes of a 2048-row batch of a
//     28672-wide layer are 117 MB, more than the L2);
//   * a diagonal tile reads its one stripe once.
// Each block owns a 128 x 128 output tile (8 warps of 64 x 32) and walks all
// rows of the batch, so H is read and written once per batch; products of
// 16-bit values are exact in the fp32 accumulators.
#pragma once

#include "cp_async_ring.cuh"
#include "gpu_solver_internal.h"

namespace gptqkit::gpu {
namespace {

// (Shared with the other Hessian kernels of gpu_hessian.cu.)
// Tile (ti, tj), ti <= tj, of the upper triangle from a linear index that
// enumerates the triangle column by column: column tj holds tj + 1 tiles.
__device__ __forceinline__ void upper_tile(int64_t idx, int* ti, int* tj) {
  int64_t c = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(idx) + 1.0) - 1.0) * 0.5);
  while (c * (c + 1) / 2 > idx) --c;           // sqrt rounding, either way
  while ((c + 1) * (c + 2) / 2 <= idx) ++c;
  *tj = static_cast<int>(c);
  *ti = static_cast<int>(idx - c * (c + 1) / 2);
}

// One element of H of the running update.
__device__ __forceinline__ void store_h(float* h, int64_t idx, float acc, float alpha, float beta) {
  // beta == 0: the buffer is uninitialised (first batch), never read it.
  h[idx] = beta == 0.0f ? alpha * acc : beta * h[idx] + alpha * acc;
}

#if !GPTQKIT_GPU_IS_HIP
// Both tensor-core Hessian kernels split a 128 x 128 output tile over 8
// warps (2 along i x 4 along j); a warp holds 64 x 32 outputs as 4 x 4
// m16n8 accumulator fragments.
__device__ __forceinline__ void zero_warp_tile(float (&acc)[4][4][4]) {
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.0f;
}

// Writes a warp's outputs at rows i0.., columns j0.. into the upper triangle
// of H (elements past K or below the diagonal are skipped). Accumulator
// fragment: c0, c1 at (row g, cols 2tq, 2tq+1), c2, c3 at row g + 8.
__device__ __forceinline__ void store_warp_tile(float* h, const float (&acc)[4][4][4], int i0, int j0, int lane, int k,
                                                float alpha, float beta) {
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + mt * 16 + g + (e >= 2 ? 8 : 0);
        const int j = j0 + n8 * 8 + tq * 2 + (e & 1);
        if (i < k && j < k && i <= j) store_h(h, static_cast<int64_t>(i) * k + j, acc[mt][n8][e], alpha, beta);
      }
}

constexpr int kTcTile = 128;        // output tile edge
constexpr int kTcRows = 32;         // rows of X per pipeline stage (two k16 steps)
constexpr int kTcStages = 3;
constexpr int kTcThreads = 256;     // 8 warps: 2 (i) x 4 (j), 64 x 32 outputs each
constexpr int kTcSuper = 8;         // tiles per super-tile edge
constexpr size_t kTcStripeBytes = static_cast<size_t>(kTcRows) * kTcTile * sizeof(uint16_t);  // 8 KB
constexpr size_t kTcSmemBytes = kTcStages * 2 * kTcStripeBytes;                              // 48 KB

// Element offset of (row r, feature c) in a swizzled [kTcRows][kTcTile] stripe.
__device__ __forceinline__ int tc_offset(int r, int c) {
  return r * kTcTile + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7);
}

// Tile (ti, tj) of block b, or false for the blocks of a diagonal
// super-tile that fall below the diagonal (or past the edge): they exit.
__device__ __forceinline__ bool tc_tile_of(int64_t b, int nt, int* ti, int* tj) {
  int si, sj;
  upper_tile(b / (kTcSuper * kTcSuper), &si, &sj);
  const int within = static_cast<int>(b % (kTcSuper * kTcSuper));
  *ti = si * kTcSuper + within / kTcSuper;
  *tj = sj * kTcSuper + within % kTcSuper;
  return *ti <= *tj && *tj < nt;
}

template <bool kBf16>
__global__ __launch_bounds__(kTcThreads) void syrk_tc_kernel(const uint16_t* __restrict__ x, int64_t rows, int k,
                                                             float alpha, float beta, float* __restrict__ h) {
#if GPTQKIT_NV_TENSOR_CORES
  const int nt = (k + kTcTile - 1) / kTcTile;
  int ti, tj;
  if (!tc_tile_of(blockIdx.x, nt, &ti, &tj)) return;  // the whole block: no barrier is skipped by a part of it
  const int i0 = ti * kTcTile, j0 = tj * kTcTile;
  const bool diagonal = ti == tj;
  uint16_t* smem = reinterpret_cast<uint16_t*>(gpu_dynamic_smem());
  constexpr int kStripe = kTcRows * kTcTile;  // elements
  auto a_tile = [&](int buf) { return smem + (2 * buf) * kStripe; };
  auto b_tile = [&](int buf) { return diagonal ? a_tile(buf) : smem + (2 * buf + 1) * kStripe; };

  const int t = threadIdx.x;
  const int lane = t % kWarpSize, warp = t / kWarpSize;
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;
  const int64_t steps = (rows + kTcRows - 1) / kTcRows;

  // Stage s: rows [32 s, 32 s + 32) of both stripes, 512 chunks of 16 bytes
  // each (32 rows x 16 chunks), two per thread per stripe.
  auto issue = [&](int64_t s) {
    const int buf = static_cast<int>(s % kTcStages);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int e = t + q * kTcThreads;
      const int r = e / 16, c = (e % 16) * 8;
      const int64_t row = s * kTcRows + r;
      const bool row_ok = row < rows;
      const int64_t src_row = row_ok ? row : 0;
      const bool a_ok = row_ok && i0 + c < k;
      cp_async16_zfill(a_tile(buf) + tc_offset(r, c), x + src_row * k + (a_ok ? i0 + c : 0), a_ok);
      if (!diagonal) {
        const bool b_ok = row_ok && j0 + c < k;
        cp_async16_zfill(b_tile(buf) + tc_offset(r, c), x + src_row * k + (b_ok ? j0 + c : 0), b_ok);
      }
    }
  };

  float acc[4][4][4];
  zero_warp_tile(acc);

  // ldmatrix.x4.trans lane addresses: lane l addresses row l % 8 of matrix
  // q = l / 8. A (16 x 16 of X^T at features i, rows k): matrices
  // (k +0, i +0), (k +0, i +8), (k +8, i +0), (k +8, i +8) are a0..a3.
  // B (16 rows k x two n8 column blocks j): (k +0, j +0), (k +8, j +0),
  // (k +0, j +8), (k +8, j +8) are b0, b1 of the first block, b0, b1 of the second.
  const int q = lane / 8, rr = lane % 8;
  const int a_k = (q >> 1) * 8 + rr, a_i = (q & 1) * 8;
  const int b_k = (q & 1) * 8 + rr, b_j = (q >> 1) * 8;

  run_cp_async_ring<kTcStages>(steps, issue, [&](int64_t, int buf) {
    const uint16_t* as = a_tile(buf);
    const uint16_t* bs = b_tile(buf);
#pragma unroll
    for (int ks = 0; ks < kTcRows; ks += 16) {
      uint32_t bf[4][2];
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t r4[4];
        ldmatrix_x4_trans(r4, bs + tc_offset(ks + b_k, wn + np * 16 + b_j));
        bf[2 * np][0] = r4[0];
        bf[2 * np][1] = r4[1];
        bf[2 * np + 1][0] = r4[2];
        bf[2 * np + 1][1] = r4[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        uint32_t af[4];
        ldmatrix_x4_trans(af, as + tc_offset(ks + a_k, wm + mt * 16 + a_i));
#pragma unroll
        for (int n8 = 0; n8 < 4; ++n8) mma_16816<kBf16>(acc[mt][n8], af, bf[n8][0], bf[n8][1]);
      }
    }
  });
  store_warp_tile(h, acc, i0 + wm, j0 + wn, lane, k, alpha, beta);
#else
  unused_args(x, rows, k, alpha, beta, h);
#endif  // GPTQKIT_NV_TENSOR_CORES
}

// Blocks of the launch: every super-tile of the upper triangle, whole.
inline int64_t syrk_tc_blocks(int64_t k) {
  const int64_t nt = (k + kTcTile - 1) / kTcTile;
  const int64_t ns = (nt + kTcSuper - 1) / kTcSuper;
  return ns * (ns + 1) / 2 * kTcSuper * kTcSuper;
}
#endif  // !GPTQKIT_GPU_IS_HIP

}  // namespace
}  // namespace gptqkit::gpu
