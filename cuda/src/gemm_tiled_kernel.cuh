// The tiled kernel for M > 8 (device code only; launched from gemm_tiled.cu): blocks of BM = 16 * MF rows of x by kBN = 64
// output columns walk K one chunk (32 positions, one group) at a time.
//
// Per chunk, double-buffered so that the next chunk's global loads are in
// flight while the current one is computed:
//   * the chunk's packed words (BITS rows x 64 columns) go to shared memory
//     (cp.async on sm_80+, which skips the register file and L1);
//   * the BM x 32 tile of x is gathered through perm into registers and
//     stored to shared memory after the current chunk's math (act-order is a
//     gather at load time, never a second pass over x);
//   * the words are dequantized once into a 64 x 32 tile of fp16/bf16 in
//     shared memory (scale * (q - zero), the oracle's arithmetic rounded once
//     to the activation type), which every row of x then reuses;
//   * sm_80+: 4 warps, each 16 columns x BM rows, ldmatrix + mma.sync
//     m16n8k16 with fp32 accumulators. Other targets (ROCm, older NVIDIA):
//     the same tiles, multiplied by a SIMT loop in fp32.
#pragma once

#include <type_traits>

#include "gemm_common.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kTiledThreads = 128;
constexpr int kBN = 64;
// Rows of the shared tiles in 16-bit elements: 32 + 8 makes the row stride
// 80 bytes, so the 8 row addresses of one ldmatrix phase (and the 8 rows of
// the SIMT reads) fall in distinct 16-byte bank groups.
constexpr int kTileStride = kChunk + 8;

template <bool BF16, int BITS, int MF>
__global__ void __launch_bounds__(kTiledThreads)
    tiled_kernel(const uint16_t* __restrict__ x, const uint32_t* __restrict__ qweight,
                 const uint16_t* __restrict__ sz, const int32_t* __restrict__ chunk_group,
                 const int32_t* __restrict__ perm, const uint16_t* __restrict__ bias, uint16_t* __restrict__ y,
                 int m_dim, int k_dim, int n_dim, int np, int chunks, int groups, bool x_pairs) {
  constexpr int kBM = 16 * MF;
  constexpr int kTPR = kTiledThreads / kBM;  // threads per row of the x tile (8 or 2)
  constexpr int kPPT = kChunk / kTPR;   // positions per thread (4 or 16), an even count
  constexpr int kWordCopies = BITS * kBN / 4;  // 16-byte pieces of a chunk's words (<= kTiledThreads)
  static_assert(kWordCopies <= kTiledThreads, "one 16-byte copy per thread at most");

  __shared__ __align__(16) uint16_t a_s[2][kBM][kTileStride];
  __shared__ __align__(16) uint32_t w_s[2][BITS][kBN];
  __shared__ __align__(16) uint16_t b_s[kBN][kTileStride];

  const int t = threadIdx.x;
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * kBN;

  // This thread's share of the x tile: row a_row, positions [a_p0, a_p0 + kPPT).
  const int a_row = t / kTPR;
  const int a_p0 = (t % kTPR) * kPPT;
  const int a_m = m0 + a_row;
  uint32_t a_reg[kPPT / 2];
  // Dequantization: column d_col, positions [16 * d_half, 16 * d_half + 16).
  const int d_col = t % kBN;
  const int d_half = t / kBN;
  uint32_t sz_cur = 0, sz_next = 0;

  auto load_x = [&](int c) {
    const int64_t row = static_cast<int64_t>(a_m) * k_dim;
    const int p0 = c * kChunk + a_p0;
#pragma unroll
    for (int e = 0; e < kPPT / 2; ++e) {
      const int p = p0 + 2 * e;
      uint32_t v = 0;
      if (a_m < m_dim) {
        if (x_pairs && p + 1 < k_dim) {  // identity order, even K: one aligned 32-bit load
          v = *reinterpret_cast<const uint32_t*>(x + row + p);
        } else {
          const int k0 = column_of(perm, p, k_dim);
          const int k1 = column_of(perm, p + 1, k_dim);
          const uint32_t lo = k0 >= 0 ? x[row + k0] : 0u;
          const uint32_t hi = k1 >= 0 ? x[row + k1] : 0u;
          v = lo | (hi << 16);
        }
      }
      a_reg[e] = v;
    }
  };
  auto store_x = [&](int buf) {
#pragma unroll
    for (int e = 0; e < kPPT / 2; ++e) *reinterpret_cast<uint32_t*>(&a_s[buf][a_row][a_p0 + 2 * e]) = a_reg[e];
  };
  auto load_sz = [&](int c) {
    const int g = group_of(chunk_group, c, groups);
    return *reinterpret_cast<const uint32_t*>(sz + (static_cast<int64_t>(g) * np + n0 + d_col) * 2);
  };
  // The chunk's words: piece t is row t / 16, columns 4 * (t % 16) .. + 3.
  const int w_row = t / (kBN / 4);
  const int w_col = 4 * (t % (kBN / 4));
  auto word_src = [&](int c) {
    return qweight + (static_cast<int64_t>(c) * BITS + w_row) * np + n0 + w_col;
  };
#if !GPTQKIT_NV_TENSOR_CORES
  uint4 w_reg = make_uint4(0u, 0u, 0u, 0u);
#endif
  auto issue_words = [&](int c, int buf) {
    if (t < kWordCopies) {
#if GPTQKIT_NV_TENSOR_CORES
      cp_async16(&w_s[buf][w_row][w_col], word_src(c));
#else
      (void)buf;
      w_reg = *reinterpret_cast<const uint4*>(word_src(c));
#endif
    }
  };
  auto land_words = [&](int buf) {  // SIMT path: registers -> shared (cp.async lands by itself)
#if !GPTQKIT_NV_TENSOR_CORES
    if (t < kWordCopies) *reinterpret_cast<uint4*>(&w_s[buf][w_row][w_col]) = w_reg;
#else
    (void)buf;
#endif
  };

#if GPTQKIT_NV_TENSOR_CORES
  const int warp = t / kWarpSize;
  const int lane = t % kWarpSize;
  float acc[MF][2][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
#else
  // SIMT: columns 4 * (t % 16) .. + 3, rows t / 16 + 8 * i.
  constexpr int kRows = kBM / 8;
  const int s_col = 4 * (t % 16);
  const int s_row = t / 16;
  float acc[kRows][4];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
#endif

  // Prologue: chunk 0 into buffer 0.
  issue_words(0, 0);
#if GPTQKIT_NV_TENSOR_CORES
  cp_async_commit();
#endif
  land_words(0);
  load_x(0);
  store_x(0);
  sz_cur = load_sz(0);

  for (int c = 0; c < chunks; ++c) {
    const int buf = c & 1;
    const bool more = c + 1 < chunks;
    if (more) {
      issue_words(c + 1, buf ^ 1);
      load_x(c + 1);
      sz_next = load_sz(c + 1);
    }
#if GPTQKIT_NV_TENSOR_CORES
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();  // this chunk's words have landed (the next chunk's may be in flight)
#endif
    __syncthreads();  // words and x of chunk c visible to all; everyone is done with b_s

    // Dequantize this chunk: 16 positions of one column per thread. The
    // half is a template constant so every code index folds to fixed shifts
    // of registers (a run-time index would put the words in local memory).
    {
      uint32_t wd[BITS];
#pragma unroll
      for (int b = 0; b < BITS; ++b) wd[b] = w_s[buf][b][d_col];
      const float scale = lo_float<BF16>(sz_cur);
      const float zb = bias_of_zero(hi_float<BF16>(sz_cur));
      auto dequant_half = [&](auto half_tag) {
        constexpr int kOff = decltype(half_tag)::value;
        uint32_t packed[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float v0 = scale * (magic_code(chunk_code_rt<BITS>(wd, kOff + 2 * e)) - zb);
          const float v1 = scale * (magic_code(chunk_code_rt<BITS>(wd, kOff + 2 * e + 1)) - zb);
          packed[e] = static_cast<uint32_t>(float_to_raw<BF16>(v0)) |
                      (static_cast<uint32_t>(float_to_raw<BF16>(v1)) << 16);
        }
        uint4* dst = reinterpret_cast<uint4*>(&b_s[d_col][kOff]);
        dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
      };
      if (d_half == 0) {
        dequant_half(std::integral_constant<int, 0>{});
      } else {
        dequant_half(std::integral_constant<int, 16>{});
      }
    }
    __syncthreads();  // b_s complete

#if GPTQKIT_NV_TENSOR_CORES
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      // B: n8 tiles (warp * 16) and (warp * 16 + 8), k 16 * ks .. + 15, stored [n][k]:
      // lanes 0-7 address matrix 0 (n 0-7, k 0-7), 8-15 matrix 1 (n 0-7, k 8-15),
      // 16-23 matrix 2 (n 8-15, k 0-7), 24-31 matrix 3 (n 8-15, k 8-15).
      uint32_t bfrag[4];
      ldmatrix_x4(bfrag, &b_s[warp * 16 + (lane / 16) * 8 + (lane % 8)][ks * 16 + ((lane / 8) % 2) * 8]);
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) {
        // A: rows mf * 16 + (lane % 16), k halves (lane / 16) * 8: a0..a3 in mma order.
        uint32_t afrag[4];
        ldmatrix_x4(afrag, &a_s[buf][mf * 16 + (lane % 16)][ks * 16 + (lane / 16) * 8]);
        mma_16816<BF16>(acc[mf][0], afrag, bfrag[0], bfrag[1]);
        mma_16816<BF16>(acc[mf][1], afrag, bfrag[2], bfrag[3]);
      }
    }
#else
#pragma unroll 4
    for (int p = 0; p < kChunk; p += 2) {
      float b0[4], b1[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t bb = *reinterpret_cast<const uint32_t*>(&b_s[s_col + j][p]);
        b0[j] = lo_float<BF16>(bb);
        b1[j] = hi_float<BF16>(bb);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const uint32_t aa = *reinterpret_cast<const uint32_t*>(&a_s[buf][s_row + 8 * i][p]);
        const float x0 = lo_float<BF16>(aa), x1 = hi_float<BF16>(aa);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(x1, b1[j], fmaf(x0, b0[j], acc[i][j]));
      }
    }
#endif

    if (more) {
      // a_s[buf ^ 1] and w_s[buf ^ 1] were last read before this iteration's
      // first barrier, so they can be refilled now; the next iteration's
      // first barrier publishes them.
      land_words(buf ^ 1);
      store_x(buf ^ 1);
      sz_cur = sz_next;
    }
  }

  // Epilogue: fp32 accumulators (+ bias) rounded once to the output type.
  auto store = [&](int m, int n, float v) {
    if (m < m_dim && n < n_dim) y[static_cast<int64_t>(m) * n_dim + n] = output_value<BF16>(v, bias, n);
  };
#if GPTQKIT_NV_TENSOR_CORES
  // mma C fragment: c0, c1 at (row lane / 4, cols 2 * (lane % 4) + {0, 1}); c2, c3 at row + 8.
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int r = m0 + mf * 16 + lane / 4;
      const int cn = n0 + warp * 16 + nt * 8 + 2 * (lane % 4);
      store(r, cn, acc[mf][nt][0]);
      store(r, cn + 1, acc[mf][nt][1]);
      store(r + 8, cn, acc[mf][nt][2]);
      store(r + 8, cn + 1, acc[mf][nt][3]);
    }
#else
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) store(m0 + s_row + 8 * i, n0 + s_col + j, acc[i][j]);
#endif
}

}  // namespace
}  // namespace gptqkit::gpu
