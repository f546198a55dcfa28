// Dequantization of the kernels' layout to a dense [N, K] fp16/bf16 weight
// (device code only; launched from gemm_dequant.cu).
#pragma once

#include "gemm_common.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kDequantThreads = 256;

// One thread per (column n, chunk c), chunks fastest: consecutive threads
// write consecutive 64-byte runs of a row of the output (without act-order),
// which is the bigger side of the traffic (16 bits out per 2-8 bits in).
template <bool BF16, int BITS>
__global__ void __launch_bounds__(kDequantThreads)
    dequant_kernel(const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ sz,
                   const int32_t* __restrict__ chunk_group, const int32_t* __restrict__ perm,
                   uint16_t* __restrict__ out, int k_dim, int n_dim, int np, int chunks, int groups) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kDequantThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(n_dim) * chunks) return;
  const int n = static_cast<int>(idx / chunks);
  const int c = static_cast<int>(idx % chunks);
  uint32_t w[BITS];
#pragma unroll
  for (int b = 0; b < BITS; ++b) w[b] = qweight[(static_cast<int64_t>(c) * BITS + b) * np + n];
  const int g = group_of(chunk_group, c, groups);
  const uint32_t pair = *reinterpret_cast<const uint32_t*>(sz + (static_cast<int64_t>(g) * np + n) * 2);
  const float scale = lo_float<BF16>(pair);
  const float zb = bias_of_zero(hi_float<BF16>(pair));
  uint16_t* row = out + static_cast<int64_t>(n) * k_dim;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const int k = column_of(perm, static_cast<int64_t>(c) * kChunk + j, k_dim);
    if (k >= 0) row[k] = float_to_raw<BF16>(scale * (magic_code(chunk_code_rt<BITS>(w, j)) - zb));
  }
}

}  // namespace
}  // namespace gptqkit::gpu
