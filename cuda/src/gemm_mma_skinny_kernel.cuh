// The 4-bit tensor-core kernel for skinny x (M <= 16 rows: decode-time
// batches) on sm_80+ (device code only; launched from gemm_mma.cu with the
// mma kernel's split-K plan, grid and pipeline).
//
// Why a variant of the mma kernel: at M <= 16 the mma kernel issues about
// 180 instructions per warp per chunk for 8 mma.sync, which puts an H100
// near its instruction rate while the weight stream runs at under half of
// DRAM bandwidth (docs/gpu_gemm.md). Most of them decode weights: each lane
// loads a whole 32-bit word to keep one byte of it (two codes), then needs
// six integer operations to place the two codes in a half2, plus hsub2 and
// hmul2. This kernel changes which positions and columns a lane's fragments
// hold, not what is multiplied, so that every loaded word is used whole:
//   * K order inside a chunk. The sum over k does not care which position
//     sits in which k slot, as long as A and B agree. Lane (g, t) (g =
//     lane / 4, t = lane % 4) takes word t of its column: positions 8t..8t+7,
//     nibbles n0..n7. `(word >> 4i) & 0x000f000f` puts nibbles i and i + 4 in
//     the two halves, one LOP3 with the magic number makes them the half2
//     (magic + n_i, magic + n_{i+4}). So the k slots (2t, 2t+1) of slab s
//     hold positions (8t + 2s, 8t + 2s + 4) and slots (2t+8, 2t+9) positions
//     (8t + 2s + 1, 8t + 2s + 5). The A fragment wants the same positions of
//     x: lane (g, t) loads positions 8t..8t+7 of row g (one 16-byte shared
//     load) and pairs them with four byte permutes; no ldmatrix.
//   * Column order inside a warp's 32 columns. Column slot g of n8 tile nt is
//     column 4g + nt, so the four words a lane needs (word t of columns
//     4g..4g+3) are one 16-byte shared load. A lane's accumulators then hold
//     columns 8t + nt and 8t + 4 + nt: eight consecutive columns per row.
//   * Scales per group, in fp32. B is q - zero (exact: (magic + q) minus
//     (magic + zero)); the chunks of one group accumulate into their own
//     registers, which are scaled and added to the result when the group
//     ends. Per two weights: 0.75 shifts, one LOP3, one hsub2 (the mma
//     kernel: eight integer operations, hsub2, hmul2). The (scale, zero)
//     pairs are copied and read once per group run instead of once per
//     chunk. The weights are not rounded to 16 bits before the product
//     (the oracle's are): the difference is at most one 16-bit rounding of
//     each weight, inside the GEMM tests' error bound.
// Shared memory per stage: x (16 rows x 64 positions, 128-byte rows, the
// two 64-byte halves swapped on odd rows), the words (4 rows x 128 columns
// per chunk; the 16-byte pieces of word row w XOR-ed with 2w) and the
// (scale, zero) pairs: every 16-byte shared load of a quarter-warp hits 8
// distinct bank groups.
#pragma once

#include "gemm_mma_kernel.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kSkinnyRows = 16;  // rows of x per block: one m16 fragment

struct SkinnySmem {
  static constexpr int kStages = 4;
  static constexpr int kXRow = kMmaStageChunks * kChunk;  // 16-bit elements per x row (128 bytes)
  static constexpr size_t kX = static_cast<size_t>(kSkinnyRows) * kXRow * sizeof(uint16_t);
  static constexpr size_t kWords = static_cast<size_t>(kMmaStageChunks) * 4 * kMmaBN * sizeof(uint32_t);
  static constexpr size_t kSz = static_cast<size_t>(kMmaStageChunks) * kMmaBN * sizeof(uint32_t);
  static constexpr size_t kFlags = 16;  // one int per chunk: it starts a group run (padded to 16 bytes)
  static constexpr size_t kStage = kX + kWords + kSz + kFlags;
  static constexpr size_t kTotal = kStage * kStages;
  static_assert(kX % 16 == 0 && kStage % 16 == 0, "cp.async destinations must stay 16-byte aligned");
  static_assert(kTotal <= 48 * 1024, "more than a block gets without an opt-in");
  static_assert(kXRow == 64, "the x swizzle swaps the two chunks of a 64-position stage");
  static_assert(kMmaStageChunks * sizeof(int32_t) <= kFlags, "a flag per chunk of a stage");
  static_assert(kSkinnyRows * kXRow * sizeof(uint16_t) / 16 == kMmaThreads, "one 16-byte x piece per thread");
  static_assert(4 * (kMmaBN / 4) == kMmaThreads, "one 16-byte word piece per thread and chunk");
};

// 16-byte piece `piece` (8 positions) of x row `row` in a stage: odd rows
// swap the stage's two chunks, so rows g and g + 1 of one quarter-warp's
// loads land in different bank groups.
__device__ __forceinline__ int skinny_x_piece(int row, int piece) { return piece ^ ((row & 1) << 2); }
// 16-byte piece (4 columns) `piece` of word row `word`: XOR with 2 * word
// spreads the four word rows a quarter-warp reads over 8 bank groups.
__device__ __forceinline__ int skinny_word_piece(int word, int piece) { return piece ^ (word << 1); }

// (At least 4 blocks per SM: a register budget of 128 per thread. Without
// it ptxas settles on 96 on sm_90a and spills two of the copy offsets.)
template <bool BF16>
__global__ void __launch_bounds__(kMmaThreads, 4)
    mma_skinny_kernel(const uint16_t* __restrict__ x, int x_stride, const uint32_t* __restrict__ qweight,
                      const uint16_t* __restrict__ sz, const int32_t* __restrict__ chunk_group,
                      const uint16_t* __restrict__ bias, uint16_t* __restrict__ y, float* __restrict__ partial,
                      unsigned* __restrict__ tile_counters, int m_dim, int n_dim, int np, int chunks, int groups,
                      int chunks_per_split) {
#if GPTQKIT_NV_TENSOR_CORES
  static_assert(kWarpSize == 32, "the mma fragment layout is that of 32-lane warps");
  using Smem = SkinnySmem;
  constexpr int kStages = Smem::kStages;
  constexpr int kPieces = kMmaBN / 4;  // 16-byte pieces of one word row (or (scale, zero) row) of the tile
  constexpr uint32_t kMagic2 = mma_magic2<BF16>();

  unsigned char* smem = gpu_dynamic_smem();
  const int t = threadIdx.x;
  const int warp = t / kWarpSize;
  const int lane = t % kWarpSize;
  const int gq = lane / 4;  // fragment row / column slot
  const int tq = lane % 4;  // fragment k pair; also this lane's word of every chunk
  const int n0 = blockIdx.x * kMmaBN;
  const int m0 = blockIdx.y * kSkinnyRows;
  const int c_begin = blockIdx.z * chunks_per_split;
  const int c_end = min(chunks, c_begin + chunks_per_split);
  const int steps = (c_end - c_begin + kMmaStageChunks - 1) / kMmaStageChunks;
  const bool upper_rows = m_dim - m0 > 8;  // fragment rows 8..15 hold rows of x (the same for the block)

  auto x_tile = [&](int buf) { return reinterpret_cast<uint16_t*>(smem + buf * Smem::kStage); };
  auto word_tile = [&](int buf) {  // [chunk of stage][word][column], pieces swizzled
    return reinterpret_cast<uint32_t*>(smem + buf * Smem::kStage + Smem::kX);
  };
  auto sz_tile = [&](int buf) {  // [chunk of stage][column]: (scale, zero) as two 16-bit values
    return reinterpret_cast<uint32_t*>(smem + buf * Smem::kStage + Smem::kX + Smem::kWords);
  };
  auto flag_tile = [&](int buf) {  // [chunk of stage]: starts a group run
    return reinterpret_cast<int32_t*>(smem + buf * Smem::kStage + Smem::kX + Smem::kWords + Smem::kSz);
  };
  // Chunk c begins a run of its group in this split (c == c_begin, or its
  // group differs from chunk c - 1's): its (scale, zero) pairs are copied,
  // and the previous group's sums are scaled. Decided once, by the threads
  // that copy the pairs, and passed on through shared memory with the stage
  // (the readers would otherwise wait on two global loads of the
  // chunk-group table every chunk).
  // Threads t < kMmaStageChunks * kPieces copy the pairs of chunk j = t /
  // kPieces of each stage; they look up the groups of that chunk and of the
  // one before it a stage ahead, so the global loads of the table overlap
  // a stage of work instead of stalling the copy.
  const int sz_chunk = t / kPieces;  // (meaningful for the copying threads)
  int new_group = -1;  // the group whose pairs the next stage copies, or -1: no new run there
  auto look_up_groups = [&](int step) {
    const int c = c_begin + step * kMmaStageChunks + sz_chunk;
    new_group = -1;
    if (c < c_end) {
      const int g = group_of(chunk_group, c, groups);
      if (c == c_begin || g != group_of(chunk_group, c - 1, groups)) new_group = g;
    }
  };

  // This thread's copies of a stage, as sources of the next stage to issue
  // (advanced by one stage per issue: stages are issued in order) and
  // destinations inside a stage buffer: one 16-byte piece of x (row t / 8,
  // positions 8 (t % 8).. of the stage) and one per chunk of words (word
  // row t / 32, columns 4 (t % 32)..).
  const int x_row = t / 8, x_piece = t % 8;
  const bool x_row_real = m0 + x_row < m_dim;  // rows past M are not loaded (their sums are never stored)
  const uint16_t* x_src = x + static_cast<int64_t>(m0 + (x_row_real ? x_row : 0)) * x_stride +
                          static_cast<int64_t>(c_begin) * kChunk + x_piece * 8;
  const int x_dst = x_row * Smem::kXRow + skinny_x_piece(x_row, x_piece) * 8;
  const int w_word = t / kPieces, w_piece = t % kPieces;
  const uint32_t* w_src = qweight + (static_cast<int64_t>(c_begin) * 4 + w_word) * np + n0 + 4 * w_piece;
  const int w_dst = w_word * kMmaBN + 4 * skinny_word_piece(w_word, w_piece);
  const int64_t w_chunk_stride = 4 * static_cast<int64_t>(np);

  auto issue = [&](int step) {
    const int buf = step % kStages;
    const int c0 = c_begin + step * kMmaStageChunks;
    if (x_row_real && c0 + x_piece / 4 < c_end) cp_async16(x_tile(buf) + x_dst, x_src);
    x_src += kMmaStageChunks * kChunk;
#pragma unroll
    for (int j = 0; j < kMmaStageChunks; ++j) {  // words: 4 rows x 128 columns per chunk
      if (c0 + j < c_end) cp_async16(word_tile(buf) + j * 4 * kMmaBN + w_dst, w_src + j * w_chunk_stride);
    }
    w_src += kMmaStageChunks * w_chunk_stride;
    if (t < kMmaStageChunks * kPieces) {  // (scale, zero): 128 columns x 4 bytes, where a group run starts
      const int j = sz_chunk, piece = t % kPieces;
      if (new_group >= 0) {
        cp_async16(sz_tile(buf) + j * kMmaBN + 4 * piece,
                   sz + (static_cast<int64_t>(new_group) * np + n0 + 4 * piece) * 2);
      }
      // A plain store: the barrier before the stage is read orders it.
      if (piece == 0) flag_tile(buf)[j] = new_group >= 0 ? 1 : 0;
      look_up_groups(step + 1);
    }
  };

  // acc: the result; part: the current group's sums of x * (q - zero).
  // [nt][e]: rows gq (e = 0, 1) and gq + 8 (e = 2, 3), columns
  // warp * 32 + 8 tq + 4 (e % 2) + nt.
  float acc[4][4], part[4][4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = part[nt][e] = 0.0f;
  uint32_t magic_zero2[4] = {0u, 0u, 0u, 0u};  // (magic + zero) twice, columns warp * 32 + 4 gq + nt (B side)
  float scale[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};  // [e % 2][nt] (C side)
  auto fold_group = [&]() {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[nt][e] = fmaf(scale[e % 2][nt], part[nt][e], acc[nt][e]);
        part[nt][e] = 0.0f;
      }
  };

  // This lane's shared-memory offsets inside a stage (chunk 0 of it): x rows
  // gq and gq + 8 at positions 8 tq.. (chunk j: XOR 32, the swizzle swaps
  // the chunks on odd rows), word tq of columns 4 gq.., the (scale, zero)
  // pairs of those columns and of columns 8 tq...
  const int x_lo = gq * Smem::kXRow + skinny_x_piece(gq, tq) * 8;
  const int x_hi = (gq + 8) * Smem::kXRow + skinny_x_piece(gq + 8, tq) * 8;
  const int word_offset = tq * kMmaBN + 4 * skinny_word_piece(tq, warp * 8 + gq);
  const int zero_col = warp * 32 + 4 * gq;
  const int scale_col = warp * 32 + 8 * tq;

  prefetch_weights_then_wait(qweight, sz, chunk_group, c_begin, c_end, n0, np, groups);
  if (t < kMmaStageChunks * kPieces) look_up_groups(0);
  run_cp_async_ring<kStages>(steps, issue, [&](int step, int buf) {
    const uint16_t* xs = x_tile(buf);
    const uint32_t* ws = word_tile(buf);
    const uint32_t* zs = sz_tile(buf);
    const int32_t* flags = flag_tile(buf);
    const int c0 = c_begin + step * kMmaStageChunks;
#pragma unroll
    for (int j = 0; j < kMmaStageChunks; ++j) {
      const int c = c0 + j;
      if (c >= c_end) break;  // the same for the whole block
      if (flags[j] != 0) {
        if (c != c_begin) fold_group();
        const uint4 zb = *reinterpret_cast<const uint4*>(zs + j * kMmaBN + zero_col);
        const uint4 s_lo = *reinterpret_cast<const uint4*>(zs + j * kMmaBN + scale_col);
        const uint4 s_hi = *reinterpret_cast<const uint4*>(zs + j * kMmaBN + scale_col + 4);
        const uint32_t zw[4] = {zb.x, zb.y, zb.z, zb.w};
        const uint32_t lo[4] = {s_lo.x, s_lo.y, s_lo.z, s_lo.w};
        const uint32_t hi[4] = {s_hi.x, s_hi.y, s_hi.z, s_hi.w};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          magic_zero2[nt] = hadd2_raw<BF16>(__byte_perm(zw[nt], 0u, 0x3232u), kMagic2);  // exact: small integers
          scale[0][nt] = lo_float<BF16>(lo[nt]);
          scale[1][nt] = lo_float<BF16>(hi[nt]);
        }
      }

      // A: positions 8 tq .. 8 tq + 7 of rows gq and gq + 8; slab s takes
      // (p[2s], p[2s+4]) for k slots (2t, 2t+1), (p[2s+1], p[2s+5]) for (2t+8, 2t+9).
      uint32_t a[2][4];
      auto load_row = [&](int x_offset, int reg) {
        const uint4 v = *reinterpret_cast<const uint4*>(xs + (x_offset ^ (j * 32)));
        a[0][reg] = __byte_perm(v.x, v.z, 0x5410u);
        a[0][reg + 2] = __byte_perm(v.x, v.z, 0x7632u);
        a[1][reg] = __byte_perm(v.y, v.w, 0x5410u);
        a[1][reg + 2] = __byte_perm(v.y, v.w, 0x7632u);
      };
      load_row(x_lo, 0);
      if (upper_rows) {
        load_row(x_hi, 1);
      } else {
        a[0][1] = a[0][3] = a[1][1] = a[1][3] = 0u;
      }

      const uint4 wv = *reinterpret_cast<const uint4*>(ws + j * 4 * kMmaBN + word_offset);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        uint32_t b[4];  // (n_i, n_{i+4}) - zero, i = 0..3
#pragma unroll
        for (int i = 0; i < 4; ++i)
          b[i] = hsub2_raw<BF16>(and_or_u32<0x000f000fu, kMagic2>(words[nt] >> (4 * i)), magic_zero2[nt]);
        mma_16816<BF16>(part[nt], a[0], b[0], b[1]);
        mma_16816<BF16>(part[nt], a[1], b[2], b[3]);
      }
    }
  });
  if (steps > 0) fold_group();

  // Column slot g of n-tile nt is column 4g + nt: this lane's 8 consecutive columns start at 8 tq.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m0 + gq + 8 * half;
    if (r < m_dim)
      store_row_of_8_columns<BF16>(acc, half, r, n0 + warp * 32 + 8 * tq, blockIdx.z, partial, y, bias, m_dim, n_dim,
                                   np);
  }
  if (tile_counters != nullptr)  // split (partial != nullptr), sums added here
    reduce_splits_if_last<BF16>(partial, tile_counters + blockIdx.y * gridDim.x + blockIdx.x, gridDim.z, bias, y,
                                m0, kSkinnyRows, n0, m_dim, n_dim, np);
#else
  // Compiled for targets without mma.sync: the launcher never runs it there.
  unused_args(x, x_stride, qweight, sz, chunk_group, bias, y, partial, tile_counters, m_dim, n_dim, np, chunks,
              groups, chunks_per_split);
#endif
}

}  // namespace
}  // namespace gptqkit::gpu
