// The 4-bit tensor-core kernel for any M on sm_80+ (device code only;
// launched from gemm_mma.cu, which also holds the split-K plan).
//
// Why a second tensor-core kernel next to the tiled one: the tiled kernel
// dequantizes every chunk into shared memory (two barriers per 32 positions)
// and runs one block per 64 columns over all of K, so at M = 16 a 4096-wide
// layer is 64 blocks on a 132-SM H100 with 1 KB of weights in flight each.
// Small and medium M are bound by the weight stream; this kernel keeps it
// flowing:
//   * blocks of BM = 16 * MF rows by kMmaBN = 128 columns, and K split across
//     blocks (blockIdx.z, chunks_per_split chunks each) until there are about
//     two blocks per SM; each split writes float32 partial sums that
//     splitk_reduce_kernel adds in a fixed order (deterministic), or, given
//     tile counters, the last block of each tile adds them in the same
//     order (reduce_splits_if_last: one launch less per call);
//   * a 3- or 4-deep cp.async ring of stages of 2 chunks (64 positions):
//     the x tile, the packed words and the (scale, zero) pairs of the stage,
//     one barrier per stage;
//   * weights are dequantized in registers straight into mma B fragments
//     (never written back to shared memory): a B fragment of m16n8k16 holds,
//     per lane, positions 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1) of column
//     lane / 4 (t = lane % 4), which are nibbles 2t and 2t+1 of that column's
//     words 2ks and 2ks+1 of the chunk (the GPTQ stream puts position 8w + j
//     in nibble j of word w). The four lanes of a quad read the same word
//     (a shared-memory broadcast) and keep one byte each;
//   * dequantization in 16-bit pairs (PairDecoder, gemm_common.cuh): a
//     magic number makes q - zero exact, one multiply by the scale rounds
//     once, bit-identical to the oracle; four instructions per two codes in
//     fp16, about six in bf16.
// x is read as [M, x_stride] with positions == columns (no perm, K a
// multiple of 32, 16-byte aligned rows); the launcher gathers act-order or
// unaligned x into that form first (gather_x_kernel).
#pragma once

#include "cp_async_ring.cuh"
#include "gemm_common.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kMmaThreads = 128;     // 4 warps, 32 output columns each
constexpr int kMmaBN = 128;          // output columns per block
constexpr int kMmaStageChunks = 2;   // chunks (32 positions each) per pipeline stage
// Row stride of the x tile in 16-bit elements: 64 + 8 makes it 144 bytes, so
// the 8 rows one ldmatrix phase addresses fall in distinct 16-byte bank groups.
constexpr int kMmaAStride = kMmaStageChunks * kChunk + 8;

// Bytes of one pipeline stage and of the whole ring (dynamic shared memory),
// and the ring's depth: 4 stages (3 loading while 1 is multiplied), 3 for
// 64-row tiles, which keeps every variant under the 48 KB a block gets
// without an opt-in. (A 6-stage ring for 16-row tiles measured 5-25 %
// slower on an H100 at M <= 16, at 1 to 8 blocks per SM: docs/gpu_gemm.md.)
template <int MF>
struct MmaSmem {
  static constexpr int kBM = 16 * MF;
  static constexpr int kStages = MF >= 4 ? 3 : 4;
  static constexpr size_t kX = static_cast<size_t>(kBM) * kMmaAStride * sizeof(uint16_t);
  static constexpr size_t kWords = static_cast<size_t>(kMmaStageChunks) * 4 * kMmaBN * sizeof(uint32_t);
  static constexpr size_t kSz = static_cast<size_t>(kMmaStageChunks) * kMmaBN * sizeof(uint32_t);
  static constexpr size_t kStage = kX + kWords + kSz;
  static constexpr size_t kTotal = kStage * kStages;
  static_assert(kX % 16 == 0 && kStage % 16 == 0, "cp.async destinations must stay 16-byte aligned");
  static_assert(kTotal <= 48 * 1024, "more than a block gets without an opt-in");
};

// Stores one row of a lane's output tile when its column slots hold 8
// consecutive columns [cn, cn + 8): acc[nt][2 * half + e] (the C fragment
// of n-tile nt, row half `half`) is column cn + 4e + nt. Split-K partial sums
// go to partial[split] as two float4 (columns up to Np, a multiple of 128);
// otherwise the 16-bit outputs (+ bias) are stored up to N.
template <bool BF16>
__device__ __forceinline__ void store_row_of_8_columns(const float (&acc)[4][4], int half, int64_t r, int cn,
                                                       int split, float* partial, uint16_t* y,
                                                       const uint16_t* bias, int m_dim, int n_dim, int np) {
  if (partial != nullptr) {
    float* p = partial + (static_cast<int64_t>(split) * m_dim + r) * np + cn;
    *reinterpret_cast<float4*>(p) =
        make_float4(acc[0][2 * half], acc[1][2 * half], acc[2][2 * half], acc[3][2 * half]);
    *reinterpret_cast<float4*>(p + 4) =
        make_float4(acc[0][2 * half + 1], acc[1][2 * half + 1], acc[2][2 * half + 1], acc[3][2 * half + 1]);
  } else {
    uint16_t* out = y + r * n_dim;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = cn + i;
      if (col < n_dim) out[col] = output_value<BF16>(acc[i % 4][2 * half + i / 4], bias, col);
    }
  }
}

#if GPTQKIT_NV_TENSOR_CORES
// The start of a programmatic dependent launch (gpu_compat.h): asks L2 for
// the weights of the block's first 8 chunks -- 4 stages, the ring's depth --
// and their first group's (scale, zero) pairs, which no kernel writes, so
// their DRAM latency overlaps the previous kernel's tail; then waits for
// that kernel (x may be its output, and y or the workspace memory it still
// reads) and lets the next one launch. One 128-byte line per thread: a
// chunk's 4 word rows of 128 columns are 16 lines.
__device__ __forceinline__ void prefetch_weights_then_wait(const uint32_t* qweight, const uint16_t* sz,
                                                           const int32_t* chunk_group, int c_begin, int c_end,
                                                           int n0, int np, int groups) {
  const int t = threadIdx.x;
  const int c = c_begin + t / 16;
  if (c < c_end) prefetch_l2(qweight + (static_cast<int64_t>(c) * 4 + (t / 4) % 4) * np + n0 + 32 * (t % 4));
  if (t < 4 && c_begin < c_end)  // 128 columns x (scale, zero) = 512 bytes
    prefetch_l2(sz + (static_cast<int64_t>(group_of(chunk_group, c_begin, groups)) * np + n0) * 2 + 64 * t);
  wait_for_prior_grids();
  allow_dependent_grids();
}

// Split-K without a second kernel (the launcher's choice: gemm_mma.cu),
// called by every thread of every block of a split launch after the
// block's partial sums are stored. Each block takes a ticket from its
// tile's counter; the block that gets the last one (splits - 1) knows
// every other split has stored its sums, adds the tile's partial sums in
// split order -- splitk_reduce_kernel's order and arithmetic, so y has the
// same bits either way -- and sets the counter back to zero for the next
// call. The fence before the ticket orders each thread's partial-sum
// stores before it; the one after orders the tickets before the last
// block's loads (the threadfence-reduction pattern of the CUDA guide).
// Not inlined: inlined, ptxas hoisted its address arithmetic above the
// kernel's main loop, which then ran 10-25 % more instructions per stage
// (sm_90a SASS); as a call the loop is the same as without it.
template <bool BF16>
__device__ __noinline__ void reduce_splits_if_last(const float* partial, unsigned* counter, int splits,
                                                   const uint16_t* bias, uint16_t* y, int m0, int tile_rows, int n0,
                                                   int m_dim, int n_dim, int np) {
  // The flag reuses the pipeline's shared memory, which every thread has
  // left at the barrier below.
  volatile int* is_last = reinterpret_cast<volatile int*>(gpu_dynamic_smem());
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    *is_last = atomicAdd(counter, 1u) == static_cast<unsigned>(splits - 1) ? 1 : 0;
    if (*is_last) atomicExch(counter, 0u);  // every split has its ticket: nobody reads it again this call
  }
  __syncthreads();
  if (!*is_last) return;
  __threadfence();
  constexpr int kQuads = kMmaBN / 4;  // float4 column groups of the tile
  const int rows = min(tile_rows, m_dim - m0);
  const int64_t split_stride = static_cast<int64_t>(m_dim) * np;
  for (int i = threadIdx.x; i < rows * kQuads; i += blockDim.x) {
    const int64_t r = m0 + i / kQuads;
    const int c = n0 + 4 * (i % kQuads);
    if (c >= n_dim) continue;
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* p0 = partial + r * np + c;
#pragma unroll 1
    for (int s = 0; s < splits; ++s) {
      const float4 p = load_float4_l2(p0 + s * split_stride);
      sum[0] += p.x;
      sum[1] += p.y;
      sum[2] += p.z;
      sum[3] += p.w;
    }
    uint16_t* out = y + r * n_dim;
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (c + e < n_dim) out[c + e] = output_value<BF16>(sum[e], bias, c + e);
  }
}
#endif

template <bool BF16, int MF>
__global__ void __launch_bounds__(kMmaThreads)
    mma_kernel(const uint16_t* __restrict__ x, int x_stride, const uint32_t* __restrict__ qweight,
               const uint16_t* __restrict__ sz, const int32_t* __restrict__ chunk_group,
               const uint16_t* __restrict__ bias, uint16_t* __restrict__ y, float* __restrict__ partial,
               unsigned* __restrict__ tile_counters, int m_dim, int n_dim, int np, int chunks, int groups,
               int chunks_per_split) {
#if GPTQKIT_NV_TENSOR_CORES
  static_assert(kWarpSize == 32, "the mma fragment layout is that of 32-lane warps");
  using Smem = MmaSmem<MF>;
  constexpr int kMmaStages = Smem::kStages;
  constexpr int kPiecesPerWordRow = kMmaBN / 4;  // 16-byte pieces of one word row of the tile

  unsigned char* smem = gpu_dynamic_smem();
  const int t = threadIdx.x;
  const int warp = t / kWarpSize;
  const int lane = t % kWarpSize;
  const int n0 = blockIdx.x * kMmaBN;
  const int m0 = blockIdx.y * Smem::kBM;
  const int c_begin = blockIdx.z * chunks_per_split;
  const int c_end = min(chunks, c_begin + chunks_per_split);
  const int steps = (c_end - c_begin + kMmaStageChunks - 1) / kMmaStageChunks;

  auto x_tile = [&](int buf) { return reinterpret_cast<uint16_t*>(smem + buf * Smem::kStage); };
  auto word_tile = [&](int buf) {  // [chunk of stage][word][column]
    return reinterpret_cast<uint32_t*>(smem + buf * Smem::kStage + Smem::kX);
  };
  auto sz_tile = [&](int buf) {  // [chunk of stage][column]: (scale, zero) as two 16-bit values
    return reinterpret_cast<uint32_t*>(smem + buf * Smem::kStage + Smem::kX + Smem::kWords);
  };

  // Starts the copies of stage `step` (chunks past c_end are skipped, and
  // never multiplied).
  auto issue = [&](int step) {
    const int buf = step % kMmaStages;
    const int c0 = c_begin + step * kMmaStageChunks;
#pragma unroll
    for (int i = 0; i < MF; ++i) {  // x: BM rows x 64 positions, 8 pieces per row
      const int piece = t + i * kMmaThreads;
      const int row = piece / 8, seg = piece % 8;
      const int c = c0 + seg / 4;
      // Rows past M are not loaded: whatever their shared memory holds lands
      // in accumulator rows that are never stored (row r of an mma's result
      // depends on row r of A alone). At M = 1 that saves 15/16 of the x
      // traffic of a stage.
      if (c < c_end && m0 + row < m_dim) {
        cp_async16(x_tile(buf) + row * kMmaAStride + seg * 8,
                   x + static_cast<int64_t>(m0 + row) * x_stride + static_cast<int64_t>(c) * kChunk + (seg % 4) * 8);
      }
    }
#pragma unroll
    for (int j = 0; j < kMmaStageChunks; ++j) {  // words: 4 rows x 128 columns per chunk, a piece per thread
      const int c = c0 + j;
      if (c < c_end) {
        const int word = t / kPiecesPerWordRow, col = 4 * (t % kPiecesPerWordRow);
        cp_async16(word_tile(buf) + (j * 4 + word) * kMmaBN + col,
                   qweight + (static_cast<int64_t>(c) * 4 + word) * np + n0 + col);
      }
    }
    if (t < kMmaStageChunks * kPiecesPerWordRow) {  // (scale, zero): 128 columns x 4 bytes per chunk
      const int j = t / kPiecesPerWordRow, col = 4 * (t % kPiecesPerWordRow);
      const int c = c0 + j;
      if (c < c_end) {
        const int g = group_of(chunk_group, c, groups);
        cp_async16(sz_tile(buf) + j * kMmaBN + col, sz + (static_cast<int64_t>(g) * np + n0 + col) * 2);
      }
    }
  };

  prefetch_weights_then_wait(qweight, sz, chunk_group, c_begin, c_end, n0, np, groups);

  float acc[MF][4][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mf][nt][e] = 0.0f;

  const uint32_t lane_byte = lane_byte_selector(lane % 4);  // this lane's byte (two codes) of every word
  run_cp_async_ring<kMmaStages>(steps, issue, [&](int step, int buf) {
    const uint16_t* xs = x_tile(buf);
    const uint32_t* ws = word_tile(buf);
    const uint32_t* zs = sz_tile(buf);
    const int c0 = c_begin + step * kMmaStageChunks;
#pragma unroll
    for (int j = 0; j < kMmaStageChunks; ++j) {
      if (c0 + j >= c_end) break;  // the same for the whole block
      uint32_t afrag[2][MF][4];  // A fragments of the chunk's two k16 slabs
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
          ldmatrix_x4(afrag[ks][mf],
                      xs + (mf * 16 + lane % 16) * kMmaAStride + j * kChunk + ks * 16 + (lane / 16) * 8);
      // B column slot g = lane / 4 of n-tile nt is column 4g + nt of the warp's 32: the
      // lane's four n-tiles read one 16-byte row of words (and of pairs) per load.
      const int col4 = warp * 32 + 4 * (lane / 4);
      const uint4 pairs = *reinterpret_cast<const uint4*>(zs + j * kMmaBN + col4);
      uint4 words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) words[w] = *reinterpret_cast<const uint4*>(ws + (j * 4 + w) * kMmaBN + col4);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const PairDecoder<BF16> decode(uint4_part(pairs, nt));
        uint32_t b[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) b[w] = decode(uint4_part(words[w], nt), lane_byte);
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          mma_16816<BF16>(acc[mf][nt], afrag[0][mf], b[0], b[1]);
          mma_16816<BF16>(acc[mf][nt], afrag[1][mf], b[2], b[3]);
        }
      }
    }
  });

  // mma C fragment: c0, c1 at (row lane / 4, column slots 2 * (lane % 4) + {0, 1}); c2, c3 at
  // row + 8. Slot g of n-tile nt is column 4g + nt, so a lane holds 8 consecutive columns of a row:
  // base + nt from c0 / c2, base + 4 + nt from c1 / c3.
  const int base = n0 + warp * 32 + 8 * (lane % 4);
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = m0 + mf * 16 + lane / 4 + 8 * half;
      if (r < m_dim)
        store_row_of_8_columns<BF16>(acc[mf], half, r, base, blockIdx.z, partial, y, bias, m_dim, n_dim, np);
    }
  if (tile_counters != nullptr)  // split (partial != nullptr), sums added here
    reduce_splits_if_last<BF16>(partial, tile_counters + blockIdx.y * gridDim.x + blockIdx.x, gridDim.z, bias, y,
                                m0, Smem::kBM, n0, m_dim, n_dim, np);
#else
  // Compiled for targets without mma.sync: the launcher never runs it there
  // (it asks the binary's architecture first).
  unused_args(x, x_stride, qweight, sz, chunk_group, bias, y, partial, tile_counters, m_dim, n_dim, np, chunks,
              groups, chunks_per_split);
#endif
}

// y[m, n] = sum over splits s (in order) of partial[s, m, n] (+ bias[n]),
// rounded once.
template <bool BF16>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, int splits, const uint16_t* __restrict__ bias,
                                     uint16_t* __restrict__ y, int m_dim, int n_dim, int np) {
  wait_for_prior_grids();  // the partial sums (and y's memory) belong to the GEMM kernel before it
  allow_dependent_grids();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(m_dim) * n_dim) return;
  const int64_t m = i / n_dim;
  const int n = static_cast<int>(i % n_dim);
  float v = 0.0f;
  for (int s = 0; s < splits; ++s) v += partial[(static_cast<int64_t>(s) * m_dim + m) * np + n];
  y[i] = output_value<BF16>(v, bias, n);
}

// xc[m, p] = x[m, column of position p] (0 for padding), for p < kp: the
// x the mma kernel reads, for act-order layouts and K that is not a
// multiple of 32 (or rows that are not 16-byte aligned).
__global__ void gather_x_kernel(const uint16_t* __restrict__ x, const int32_t* __restrict__ perm,
                                uint16_t* __restrict__ xc, int m_dim, int k_dim, int kp) {
  wait_for_prior_grids();  // x may be the previous kernel's output
  allow_dependent_grids();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(m_dim) * kp) return;
  const int64_t m = i / kp;
  const int k = column_of(perm, i % kp, k_dim);
  xc[i] = k >= 0 ? x[m * k_dim + k] : uint16_t{0};
}

}  // namespace
}  // namespace gptqkit::gpu
