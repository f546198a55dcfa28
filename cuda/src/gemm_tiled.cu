// Launcher of the tiled kernel (gemm_tiled_kernel.cuh, where the design is
// described): picks the tile height per call.
#include "gemm_tiled_kernel.cuh"

namespace gptqkit::gpu {
namespace {

template <bool BF16, int BITS, int MF>
std::string launch_mf(const GemmArgs& a, bool x_pairs) {
  constexpr int kBM = 16 * MF;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.m, kBM)), static_cast<unsigned>(a.np / kBN));
  GPTQKIT_LAUNCH(grid, kTiledThreads, 0, static_cast<gpuStream_t>(a.stream), tiled_kernel<BF16, BITS, MF>)(
      static_cast<const uint16_t*>(a.x), a.qweight, static_cast<const uint16_t*>(a.sz), a.chunk_group, a.perm,
      static_cast<const uint16_t*>(a.bias), static_cast<uint16_t*>(a.y), static_cast<int>(a.m),
      static_cast<int>(a.k), static_cast<int>(a.n), static_cast<int>(a.np), static_cast<int>(a.chunks),
      static_cast<int>(a.groups), x_pairs);
  return launch_error("tiled_kernel");
}

template <bool BF16, int BITS>
std::string launch_bits(const GemmArgs& a, bool x_pairs) {
  // 16-row tiles while they still fill the GPU (small M wastes no mma rows
  // and makes 4x more blocks); 64-row tiles reuse each dequantized weight
  // tile 4x more once M is large.
  const int64_t blocks64 = ceil_div(a.m, 64) * (a.np / kBN);
  if (a.m <= 32 || blocks64 < 2 * static_cast<int64_t>(multiprocessor_count(a.device)))
    return launch_mf<BF16, BITS, 1>(a, x_pairs);
  return launch_mf<BF16, BITS, 4>(a, x_pairs);
}

template <bool BF16>
std::string launch_act(const GemmArgs& a, bool x_pairs) {
  switch (a.bits) {
    case 2: return launch_bits<BF16, 2>(a, x_pairs);
    case 3: return launch_bits<BF16, 3>(a, x_pairs);
    case 4: return launch_bits<BF16, 4>(a, x_pairs);
    default: return launch_bits<BF16, 8>(a, x_pairs);
  }
}

}  // namespace

std::string launch_tiled(const GemmArgs& a) {
  if (a.np % kBN != 0) return "launch_tiled: Np must be a multiple of 64";
  if (a.np / kBN > 65535) return "launch_tiled: N = " + std::to_string(a.n) + " exceeds the grid limit (4 Mi columns)";
  // Pairs of x values load as one 32-bit word when positions are columns
  // and every row starts 4-byte aligned.
  const bool x_pairs = a.perm == nullptr && a.k % 2 == 0 && reinterpret_cast<uintptr_t>(a.x) % 4 == 0;
  DeviceGuard guard(a.device);
  return a.act == Act::kBFloat16 ? launch_act<true>(a, x_pairs) : launch_act<false>(a, x_pairs);
}

}  // namespace gptqkit::gpu
