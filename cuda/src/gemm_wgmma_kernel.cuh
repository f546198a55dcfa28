// The 4-bit warpgroup-MMA kernel for large M on Hopper (sm_90a; device code
// only, launched from gemm_mma.cu next to the mma.sync kernel, whose weight
// stream, split-K plan and dequantization it shares).
//
// Why: mma.sync runs well below the H100's tensor peak, which only wgmma
// reaches (cuBLAS uses it), so at a few hundred rows and more the mma.sync
// kernel cannot keep up with fp16 GEMM. wgmma takes its A operand from
// registers, which is where this kernel dequantizes the weights anyway, so
// the product is computed transposed:
//   y^T (output columns x tokens) = W (columns x K) * x^T (K x tokens)
// with the dequantized weights as A (64 columns per warpgroup, in the
// m16n8k16 A-fragment layout per warp) and the x tile as B, straight from
// the shared memory that cp.async filled. Per block: two warpgroups (128
// output columns, the mma kernel's word tile) by BT = 64 or 128 tokens.
//   * Fragments: an A fragment holds, per lane, positions 2t, 2t+1 (a0, a1:
//     rows g and g + 8) and 2t+8, 2t+9 (a2, a3) of a k16 slab (g = lane / 4,
//     t = lane % 4); in the GPTQ stream those are byte t of words 2ks and
//     2ks+1 of the chunk: the same bytes the mma kernel's B fragments take.
//   * The x tile of a stage (BT tokens x 64 positions, 128 bytes per token)
//     is stored in wgmma's 128-byte swizzled K-major layout: 16-byte piece s
//     of token row r at piece s ^ (r % 8) of the row, 8 rows per 1024-byte
//     atom (the swizzle is a function of the shared-memory address, so the
//     ring starts 1024-aligned). The descriptor of k16 slab s points 32 * s
//     bytes into the tile; the hardware applies the same XOR.
//   * Pipeline: a 4-stage cp.async ring of 64 positions; each stage's four
//     wgmma run asynchronously while the next stage is dequantized (two sets
//     of A registers, alternating), and wgmma_wait<1> retires the previous
//     stage, whose buffer is then refilled: loads run two stages ahead.
//   * Accumulators: m64nBT fp32, BT / 2 registers per thread (d[4i + e]:
//     column row g + 8 (e / 2) of the warp's 16, token 8i + 2t + e % 2).
// x is read as [M, x_stride] with positions == columns (no perm, K a
// multiple of 32, 16-byte aligned rows), like the mma kernel.
#pragma once

#include "gemm_common.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kWgmmaThreads = 256;  // two warpgroups of 4 warps
constexpr int kWgmmaStages = 4;
constexpr int kWgmmaBN = 128;       // output columns per block (64 per warpgroup)
constexpr int kWgmmaStageChunks = 2;  // 64 positions per stage: one 128-byte swizzle row per token
constexpr int kWgmmaSwizzleAtom = 1024;  // 8 rows x 128 bytes

// Shared memory of one stage: the swizzled x tile first (1024-aligned), the
// packed words [chunk][word][column], the (scale, zero) pairs [chunk][column].
template <int BT>
struct WgmmaSmem {
  static constexpr size_t kX = static_cast<size_t>(BT) * kWgmmaStageChunks * kChunk * sizeof(uint16_t);
  static constexpr size_t kWords = static_cast<size_t>(kWgmmaStageChunks) * 4 * kWgmmaBN * sizeof(uint32_t);
  static constexpr size_t kSz = static_cast<size_t>(kWgmmaStageChunks) * kWgmmaBN * sizeof(uint32_t);
  static constexpr size_t kStage = kX + kWords + kSz;
  // + slack to move the ring to a 1024-byte boundary of the shared window.
  static constexpr size_t kTotal = kStage * kWgmmaStages + kWgmmaSwizzleAtom;
  static_assert(BT % 8 == 0 && kStage % kWgmmaSwizzleAtom == 0, "every stage's x tile starts on a swizzle atom");
};

// Byte offset of 16-byte piece `piece` (0..7) of row `row` in a K-major tile
// of 128-byte rows in the 128-byte swizzle layout (the tile 1024-aligned).
__host__ __device__ __forceinline__ int sw128_offset(int row, int piece) { return row * 128 + ((piece ^ (row % 8)) * 16); }

// wgmma shared-memory matrix descriptor of a K-major operand in the 128-byte
// swizzle layout: start address / 16 (bits 0-13), leading-dimension offset
// (unused by this layout; 1), stride between 8-row atoms / 16 (bits 32-45),
// base offset 0 (atoms are 1024-aligned), layout 1 = 128-byte swizzle (bits 62-63).
__device__ __forceinline__ uint64_t sw128_kmajor_desc(uint32_t smem_address) {
  return static_cast<uint64_t>((smem_address & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(kWgmmaSwizzleAtom >> 4) << 32) | (uint64_t{1} << 62);
}

template <bool BF16, int BT>
__global__ void __launch_bounds__(kWgmmaThreads, 1)
    wgmma_kernel(const uint16_t* __restrict__ x, int x_stride, const uint32_t* __restrict__ qweight,
                 const uint16_t* __restrict__ sz, const int32_t* __restrict__ chunk_group,
                 const uint16_t* __restrict__ bias, uint16_t* __restrict__ y, float* __restrict__ partial,
                 int m_dim, int n_dim, int np, int chunks, int groups, int chunks_per_split) {
#if GPTQKIT_NV_WGMMA
  static_assert(kWarpSize == 32, "warpgroups of four 32-lane warps");
  using Smem = WgmmaSmem<BT>;
  constexpr int kPiecesPerRow = kWgmmaStageChunks * kChunk * 2 / 16;  // 16-byte pieces per token row: 8
  constexpr int kWordPieces = kWgmmaBN / 4;                           // per word row of the tile

  unsigned char* raw = gpu_dynamic_smem();
  unsigned char* smem = raw + (kWgmmaSwizzleAtom - smem_addr(raw) % kWgmmaSwizzleAtom) % kWgmmaSwizzleAtom;
  const int t = threadIdx.x;
  const int warp = t / kWarpSize;
  const int lane = t % kWarpSize;
  const int n0 = blockIdx.x * kWgmmaBN;
  const int m0 = blockIdx.y * BT;
  const int c_begin = blockIdx.z * chunks_per_split;
  const int c_end = min(chunks, c_begin + chunks_per_split);
  const int steps = (c_end - c_begin + kWgmmaStageChunks - 1) / kWgmmaStageChunks;
  // This thread's A rows: columns col_a and col_a + 8 of the block.
  const int col_a = (warp / 4) * 64 + (warp % 4) * 16 + lane / 4;
  const uint32_t lane_byte = lane_byte_selector(lane % 4);

  auto x_tile = [&](int buf) { return smem + buf * Smem::kStage; };
  auto word_tile = [&](int buf) { return reinterpret_cast<uint32_t*>(smem + buf * Smem::kStage + Smem::kX); };
  auto sz_tile = [&](int buf) {
    return reinterpret_cast<uint32_t*>(smem + buf * Smem::kStage + Smem::kX + Smem::kWords);
  };

  auto issue = [&](int step) {
    const int buf = step % kWgmmaStages;
    const int c0 = c_begin + step * kWgmmaStageChunks;
#pragma unroll
    for (int i = 0; i < BT * kPiecesPerRow / kWgmmaThreads; ++i) {
      const int piece = t + i * kWgmmaThreads;
      const int row = piece / kPiecesPerRow, seg = piece % kPiecesPerRow;
      const int c = c0 + seg / 4;
      if (c < c_end) {
        // Token rows past M read row M - 1: their products land in
        // accumulator columns that are never stored.
        const int src_row = min(m0 + row, m_dim - 1);
        static_assert(kPiecesPerRow * 16 == 128, "one 128-byte swizzle row per token and stage");
        cp_async16(x_tile(buf) + sw128_offset(row, seg),
                   x + static_cast<int64_t>(src_row) * x_stride + static_cast<int64_t>(c) * kChunk + (seg % 4) * 8);
      }
    }
    {  // words: 2 chunks x 4 rows x 128 columns, one 16-byte piece per thread
      const int j = t / (4 * kWordPieces), word = (t / kWordPieces) % 4, col = 4 * (t % kWordPieces);
      const int c = c0 + j;
      if (c < c_end)
        cp_async16(word_tile(buf) + (j * 4 + word) * kWgmmaBN + col,
                   qweight + (static_cast<int64_t>(c) * 4 + word) * np + n0 + col);
    }
    if (t < kWgmmaStageChunks * kWordPieces) {  // (scale, zero): 128 columns x 4 bytes per chunk
      const int j = t / kWordPieces, col = 4 * (t % kWordPieces);
      const int c = c0 + j;
      if (c < c_end) {
        const int g = group_of(chunk_group, c, groups);
        cp_async16(sz_tile(buf) + j * kWgmmaBN + col, sz + (static_cast<int64_t>(g) * np + n0 + col) * 2);
      }
    }
  };

  float acc[BT / 2];
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] = 0.0f;

  // Dequantizes stage `step` into a[slab][register] (slab 2j + ks: chunk j,
  // k16 half ks) and starts its wgmma; returns at once (asynchronous).
  auto multiply_stage = [&](int step, uint32_t (&a)[2 * kWgmmaStageChunks][4]) {
    const int buf = step % kWgmmaStages;
    const uint32_t* ws = word_tile(buf);
    const uint32_t* zs = sz_tile(buf);
    const int valid = min(kWgmmaStageChunks, c_end - (c_begin + step * kWgmmaStageChunks));
#pragma unroll
    for (int j = 0; j < kWgmmaStageChunks; ++j) {
      if (j >= valid) break;  // the same for the whole block
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the warp's 16
        const int col = col_a + 8 * h;
        const PairDecoder<BF16> decode(zs[j * kWgmmaBN + col]);
#pragma unroll
        for (int w = 0; w < 4; ++w)
          a[2 * j + w / 2][h + 2 * (w % 2)] = decode(ws[(j * 4 + w) * kWgmmaBN + col], lane_byte);
      }
    }
    const uint32_t x_address = smem_addr(x_tile(buf));
#pragma unroll
    for (int s = 0; s < 2 * kWgmmaStageChunks; ++s) {
      if (s >= 2 * valid) break;
      wgmma_fence();  // orders the writes of a[s] before the wgmma that reads them
      wgmma_rs<BF16, BT>(acc, a[s], sw128_kmajor_desc(x_address + 32u * static_cast<uint32_t>(s)));
    }
    wgmma_commit();
  };

#pragma unroll
  for (int s = 0; s < kWgmmaStages - 2; ++s) {
    if (s < steps) issue(s);
    cp_async_commit();
  }
  uint32_t a_even[2 * kWgmmaStageChunks][4], a_odd[2 * kWgmmaStageChunks][4];
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kWgmmaStages - 3>();  // stage `step` has landed for this thread,
    fence_proxy_async();                // is visible to the tensor cores' reads,
    __syncthreads();                    // and for every thread; all are past wgmma_wait of step - 2
    // Refill the buffer of stage step - 2, whose wgmma every thread has retired.
    if (step + kWgmmaStages - 2 < steps) issue(step + kWgmmaStages - 2);
    cp_async_commit();
    // Stage step - 1's wgmma may still read its A registers: use the other set.
    if (step % 2 == 0) {
      multiply_stage(step, a_even);
    } else {
      multiply_stage(step, a_odd);
    }
    wgmma_wait<1>();  // stage step - 1's group has retired
  }
  wgmma_wait<0>();

#pragma unroll
  for (int i = 0; i < BT / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int token = m0 + 8 * i + 2 * (lane % 4) + e % 2;
      const int cn = n0 + col_a + 8 * (e / 2);
      if (token >= m_dim) continue;
      if (partial != nullptr) {  // split-K: float32 partial sums, columns up to Np
        partial[(static_cast<int64_t>(blockIdx.z) * m_dim + token) * np + cn] = acc[4 * i + e];
      } else if (cn < n_dim) {
        y[static_cast<int64_t>(token) * n_dim + cn] = output_value<BF16>(acc[4 * i + e], bias, cn);
      }
    }
#else
  // Compiled for targets without wgmma: the launcher never runs it there
  // (GPTQKIT_CUDA_HAS_SM90A and compute capability 9.0).
  unused_args(x, x_stride, qweight, sz, chunk_group, bias, y, partial, m_dim, n_dim, np, chunks, groups,
              chunks_per_split);
#endif
}

}  // namespace
}  // namespace gptqkit::gpu
