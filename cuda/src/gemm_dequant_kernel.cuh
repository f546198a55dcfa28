// Dequantization of the kernels' layout to a dense [N, K] fp16/bf16 weight
// (device code only; launched from gemm_dequant.cu).
#pragma once

#include "gemm_common.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kDequantThreads = 256;

// One (chunk c, column n) of the layout, ready to decode: its BITS packed
// words and the group's scale and 2^23 + zero (see magic_code).
template <bool BF16, int BITS>
struct ChunkColumn {
  uint32_t w[BITS];
  float scale, zb;

  __device__ __forceinline__ ChunkColumn(const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ sz,
                                         const int32_t* __restrict__ chunk_group, int c, int n, int np, int groups) {
#pragma unroll
    for (int b = 0; b < BITS; ++b) w[b] = qweight[(static_cast<int64_t>(c) * BITS + b) * np + n];
    const int g = group_of(chunk_group, c, groups);
    const uint32_t pair = *reinterpret_cast<const uint32_t*>(sz + (static_cast<int64_t>(g) * np + n) * 2);
    scale = lo_float<BF16>(pair);
    zb = bias_of_zero(hi_float<BF16>(pair));
  }

  // The weight at position j of the chunk, scale * (q - zero) rounded once.
  __device__ __forceinline__ uint16_t value(int j) const {
    return float_to_raw<BF16>(scale * (magic_code(chunk_code_rt<BITS>(w, j)) - zb));
  }
};

// One thread per (chunk c, column n), columns fastest: a warp reads one row
// of packed words (consecutive columns are consecutive words) in full
// sectors, and each thread scatters its chunk's 32 outputs of row n through
// perm (act-order), or writes them as scalars (rows that are not 16-byte
// aligned). The aligned case without perm is dequant_tile_kernel below.
template <bool BF16, int BITS>
__global__ void __launch_bounds__(kDequantThreads)
    dequant_kernel(const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ sz,
                   const int32_t* __restrict__ chunk_group, const int32_t* __restrict__ perm,
                   uint16_t* __restrict__ out, int k_dim, int n_dim, int np, int chunks, int groups) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kDequantThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(n_dim) * chunks) return;
  const int c = static_cast<int>(idx / n_dim);
  const int n = static_cast<int>(idx % n_dim);
  const ChunkColumn<BF16, BITS> cc(qweight, sz, chunk_group, c, n, np, groups);
  uint16_t* row = out + static_cast<int64_t>(n) * k_dim;
  const int k0 = c * kChunk;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const int k = column_of(perm, static_cast<int64_t>(k0) + j, k_dim);
    if (k >= 0) row[k] = cc.value(j);
  }
}

// The same for layouts without perm whose rows are 16-byte aligned (K a
// multiple of 8): the dense path's common case, where the weight written
// (4x the bytes read for 4-bit) decides the time. One block per tile of
// kDequantTileCols columns x kDequantTileChunks chunks: each thread decodes one (chunk,
// column) into a shared tile, then each warp writes whole row segments
// (512 contiguous bytes) instead of 32 scattered 16-byte pieces.
constexpr int kDequantTileCols = 32;
constexpr int kDequantTileChunks = kDequantThreads / kDequantTileCols;  // 8: 256 positions of K
// Row stride of the shared tile in 16-bit elements: 256 + 8 makes it 132
// words, so the 8 threads of a quarter warp that store 16 bytes into 8
// different rows cover all 32 banks.
constexpr int kDequantTileStride = kDequantTileChunks * kChunk + 8;

template <bool BF16, int BITS>
__global__ void __launch_bounds__(kDequantThreads)
    dequant_tile_kernel(const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ sz,
                        const int32_t* __restrict__ chunk_group, uint16_t* __restrict__ out, int k_dim, int n_dim,
                        int np, int chunks, int groups) {
  __shared__ __align__(16) uint16_t tile[kDequantTileCols * kDequantTileStride];
  const int t = threadIdx.x;
  const int col = t % kDequantTileCols, cl = t / kDequantTileCols;
  const int n = blockIdx.x * kDequantTileCols + col;   // < np: np is a multiple of 128
  const int c = blockIdx.y * kDequantTileChunks + cl;
  uint32_t two[kChunk / 2];
  if (c < chunks && n < np) {
    const ChunkColumn<BF16, BITS> cc(qweight, sz, chunk_group, c, n, np, groups);
#pragma unroll
    for (int j = 0; j < kChunk; j += 2)
      two[j / 2] = static_cast<uint32_t>(cc.value(j)) | (static_cast<uint32_t>(cc.value(j + 1)) << 16);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk / 2; ++j) two[j] = 0u;
  }
  uint4* dst = reinterpret_cast<uint4*>(tile + col * kDequantTileStride + cl * kChunk);
#pragma unroll
  for (int q = 0; q < kChunk / 8; ++q) dst[q] = make_uint4(two[4 * q], two[4 * q + 1], two[4 * q + 2], two[4 * q + 3]);
  __syncthreads();
  // Warp w writes rows w, w + 8, ...: lane l the 8 positions [8 l, 8 l + 8).
  const int warps = kDequantThreads / kWarpSize;
  const int lane = t % kWarpSize, warp = t / kWarpSize;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kDequantTileChunks * kChunk;
  for (int r = warp; r < kDequantTileCols; r += warps) {
    const int nr = blockIdx.x * kDequantTileCols + r;
    if (nr >= n_dim) break;  // rows only grow with r
    for (int seg = lane; seg < kDequantTileChunks * kChunk / 8; seg += kWarpSize) {
      const int64_t k = k0 + 8 * seg;
      if (k >= k_dim) break;
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(nr) * k_dim + k) =
          *reinterpret_cast<const uint4*>(tile + r * kDequantTileStride + 8 * seg);
    }
  }
}

}  // namespace
}  // namespace gptqkit::gpu
