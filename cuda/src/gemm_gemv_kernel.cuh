// The GEMV-style kernel (device code only; launched from gemm_gemv.cu) for M <= 8 rows of x: decode-time inference is bound
// by how fast the packed weight streams from DRAM, so every weight byte is
// read exactly once, with 128-bit loads, and all (up to 8) rows of x are
// multiplied while it sits in registers.
//
// Work split (docs/gpu_gemm.md): a block of kGemvThreads threads owns 4 * CL
// output columns (CL "column lanes" of 4 columns, one uint4 of words per
// chunk row) and all of K; its threads form S = kGemvThreads / CL "slices" that
// take the chunks of K round-robin (split-K inside the block). Each stage of
// the K loop stages S chunks of x (gathered through perm, so act-order costs
// nothing here) in shared memory as raw 16-bit values; each thread then
// decodes one chunk (32 positions x 4 columns) and accumulates in fp32:
//   part  = sum_j x_j * (q_j - zero)       (exact q - zero via magic_code)
//   acc  += scale * part                    (once per chunk: one group)
// At the end the slices are summed: first across the lanes of a warp that
// share columns (xor-shuffles over lane offsets CL, 2 CL, ... < warp size,
// so it is correct for 32- and 64-wide warps), then across warps in shared
// memory. CL is picked per launch so that the grid has >= 2 blocks per
// multiprocessor where N allows.
#pragma once

#include "gemm_common.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kGemvThreads = 256;
// Row stride of a staged chunk of x, in 16-bit elements: 32 values + 8 of
// padding make it 80 bytes, so the 8 (or 16) slices of a warp that read
// different chunks hit distinct shared-memory banks.
constexpr int kXStride = kChunk + 8;

template <bool BF16, int BITS, int MT>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const uint16_t* __restrict__ x, const uint32_t* __restrict__ qweight,
                const uint16_t* __restrict__ sz, const int32_t* __restrict__ chunk_group,
                const int32_t* __restrict__ perm, const uint16_t* __restrict__ bias, uint16_t* __restrict__ y,
                int m_dim, int k_dim, int n_dim, int np, int chunks, int groups, int lanes) {
  unsigned char* smem_raw = gpu_dynamic_smem();
  uint16_t* x_s = reinterpret_cast<uint16_t*>(smem_raw);  // [MT][S][kXStride]
  float* red = reinterpret_cast<float*>(smem_raw);        // [warps][MT][4 * lanes], after the K loop

  const int t = threadIdx.x;
  const int slices = kGemvThreads / lanes;
  const int lane_col = t % lanes;
  const int slice = t / lanes;
  const int cols = 4 * lanes;
  const int n0 = blockIdx.x * cols;
  const int nc = n0 + 4 * lane_col;  // first of this thread's 4 columns (< np: np is a multiple of 128)

  float acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[m][i] = 0.0f;

  for (int c0 = 0; c0 < chunks; c0 += slices) {
    // Issue this thread's weight loads first: their DRAM latency overlaps
    // the staging of x below.
    const int c = c0 + slice;
    const bool active = c < chunks;
    uint4 wv[BITS];
    uint4 szv = make_uint4(0u, 0u, 0u, 0u);
    if (active) {
#pragma unroll
      for (int b = 0; b < BITS; ++b)
        wv[b] = *reinterpret_cast<const uint4*>(qweight + (static_cast<int64_t>(c) * BITS + b) * np + nc);
      const int g = group_of(chunk_group, c, groups);
      szv = *reinterpret_cast<const uint4*>(sz + (static_cast<int64_t>(g) * np + nc) * 2);
    } else {
#pragma unroll
      for (int b = 0; b < BITS; ++b) wv[b] = make_uint4(0u, 0u, 0u, 0u);
    }

    __syncthreads();  // the previous stage's readers of x_s are done
    const int stage = MT * slices * kChunk;
    for (int i = t; i < stage; i += kGemvThreads) {
      const int m = i / (slices * kChunk);
      const int r = i - m * (slices * kChunk);
      const int cc = r / kChunk;
      const int j = r % kChunk;
      uint16_t v = 0;
      if (m < m_dim && c0 + cc < chunks) {
        const int k = column_of(perm, static_cast<int64_t>(c0 + cc) * kChunk + j, k_dim);
        if (k >= 0) v = x[static_cast<int64_t>(m) * k_dim + k];
      }
      x_s[(m * slices + cc) * kXStride + j] = v;
    }
    __syncthreads();

    if (active) {
      const uint32_t szw[4] = {szv.x, szv.y, szv.z, szv.w};
      float scale[4], zb[4];
      uint32_t w[4][BITS];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        scale[i] = lo_float<BF16>(szw[i]);
        zb[i] = bias_of_zero(hi_float<BF16>(szw[i]));
      }
#pragma unroll
      for (int b = 0; b < BITS; ++b) {
        w[0][b] = wv[b].x;
        w[1][b] = wv[b].y;
        w[2][b] = wv[b].z;
        w[3][b] = wv[b].w;
      }
      float part[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[m][i] = 0.0f;
      const uint32_t* xrow = reinterpret_cast<const uint32_t*>(x_s + slice * kXStride);
      const int m_stride = slices * kXStride / 2;  // in 32-bit words
      // Two positions per step: one 32-bit shared load per row of x.
#pragma unroll
      for (int jp = 0; jp < kChunk / 2; ++jp) {
        float w0[4], w1[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          w0[i] = magic_code(chunk_code_rt<BITS>(w[i], 2 * jp)) - zb[i];
          w1[i] = magic_code(chunk_code_rt<BITS>(w[i], 2 * jp + 1)) - zb[i];
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const uint32_t xx = xrow[m * m_stride + jp];
          const float x0 = lo_float<BF16>(xx), x1 = hi_float<BF16>(xx);
#pragma unroll
          for (int i = 0; i < 4; ++i) part[m][i] = fmaf(x1, w1[i], fmaf(x0, w0[i], part[m][i]));
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][i] = fmaf(scale[i], part[m][i], acc[m][i]);
    }
  }

  // Slices of one warp that share columns: lanes lane_col + j * lanes.
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = acc[m][i];
      for (int off = lanes; off < kWarpSize; off <<= 1) v += gpu_shfl_xor(v, off);
      acc[m][i] = v;
    }
  constexpr int kWarps = kGemvThreads / kWarpSize;
  const int warp = t / kWarpSize;
  __syncthreads();  // x_s is reused as red
  if (t % kWarpSize < lanes) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[(warp * MT + m) * cols + 4 * lane_col + i] = acc[m][i];
  }
  __syncthreads();
  for (int idx = t; idx < MT * cols; idx += kGemvThreads) {
    const int m = idx / cols;
    const int col = idx % cols;
    const int n = n0 + col;
    if (m >= m_dim || n >= n_dim) continue;
    float sum = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) sum += red[(wi * MT + m) * cols + col];
    y[static_cast<int64_t>(m) * n_dim + n] = output_value<BF16>(sum, bias, n);
  }
}

}  // namespace
}  // namespace gptqkit::gpu
