// Dequantization of the kernels' layout to a dense [N, K] fp16/bf16 weight
// (device code only; launched from gemm_dequant.cu).
#pragma once

#include "gemm_common.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kDequantThreads = 256;

// One thread per (chunk c, column n), columns fastest: a warp reads one row
// of packed words (consecutive columns are consecutive words) in full
// sectors, and each thread writes its chunk's 32 outputs of row n, 64
// contiguous bytes, as four 16-byte stores when there is no perm and rows
// are 16-byte aligned (vector_rows); scalar stores otherwise (act-order
// scatters them through perm anyway).
template <bool BF16, int BITS>
__global__ void __launch_bounds__(kDequantThreads)
    dequant_kernel(const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ sz,
                   const int32_t* __restrict__ chunk_group, const int32_t* __restrict__ perm,
                   uint16_t* __restrict__ out, int k_dim, int n_dim, int np, int chunks, int groups,
                   bool vector_rows) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kDequantThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(n_dim) * chunks) return;
  const int c = static_cast<int>(idx / n_dim);
  const int n = static_cast<int>(idx % n_dim);
  uint32_t w[BITS];
#pragma unroll
  for (int b = 0; b < BITS; ++b) w[b] = qweight[(static_cast<int64_t>(c) * BITS + b) * np + n];
  const int g = group_of(chunk_group, c, groups);
  const uint32_t pair = *reinterpret_cast<const uint32_t*>(sz + (static_cast<int64_t>(g) * np + n) * 2);
  const float scale = lo_float<BF16>(pair);
  const float zb = bias_of_zero(hi_float<BF16>(pair));
  uint16_t* row = out + static_cast<int64_t>(n) * k_dim;
  const int k0 = c * kChunk;
  if (vector_rows && k0 + kChunk <= k_dim) {
    uint32_t two[kChunk / 2];
#pragma unroll
    for (int j = 0; j < kChunk; j += 2) {
      const uint32_t lo = float_to_raw<BF16>(scale * (magic_code(chunk_code_rt<BITS>(w, j)) - zb));
      const uint32_t hi = float_to_raw<BF16>(scale * (magic_code(chunk_code_rt<BITS>(w, j + 1)) - zb));
      two[j / 2] = lo | (hi << 16);
    }
    uint4* dst = reinterpret_cast<uint4*>(row + k0);
#pragma unroll
    for (int q = 0; q < kChunk / 8; ++q) dst[q] = make_uint4(two[4 * q], two[4 * q + 1], two[4 * q + 2], two[4 * q + 3]);
    return;
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const int k = column_of(perm, static_cast<int64_t>(k0) + j, k_dim);
    if (k >= 0) row[k] = float_to_raw<BF16>(scale * (magic_code(chunk_code_rt<BITS>(w, j)) - zb));
  }
}

}  // namespace
}  // namespace gptqkit::gpu
