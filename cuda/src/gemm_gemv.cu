// Launcher of the GEMV kernel (gemm_gemv_kernel.cuh, where the design is
// described): picks the rows template and the column-lane count per call.
#include <algorithm>

#include "gemm_gemv_kernel.cuh"

namespace gptqkit::gpu {
namespace {

template <bool BF16, int BITS, int MT>
std::string launch_mt(const GemmArgs& a) {
  const int sms = multiprocessor_count(a.device);
  const int warp = gpu_warp_size();
  // The widest lane count that still gives >= 2 blocks per multiprocessor:
  // wide blocks read long contiguous rows, narrow ones make more blocks.
  int lanes = 32;
  while (lanes > 4 && a.np / (4 * lanes) < 2 * static_cast<int64_t>(sms)) lanes /= 2;
  if (lanes > warp) lanes = warp;  // the shuffle reduction needs lanes <= warp size
  const int slices = kGemvThreads / lanes;
  const size_t x_bytes = static_cast<size_t>(MT) * slices * kXStride * sizeof(uint16_t);
  const size_t red_bytes = static_cast<size_t>(kGemvThreads / warp) * MT * 4 * lanes * sizeof(float);
  const size_t smem = std::max(x_bytes, red_bytes);
  const dim3 grid(static_cast<unsigned>(a.np / (4 * lanes)));
  GPTQKIT_LAUNCH(grid, kGemvThreads, smem, static_cast<gpuStream_t>(a.stream), gemv_kernel<BF16, BITS, MT>)(
      static_cast<const uint16_t*>(a.x), a.qweight, static_cast<const uint16_t*>(a.sz), a.chunk_group, a.perm,
      static_cast<const uint16_t*>(a.bias), static_cast<uint16_t*>(a.y), static_cast<int>(a.m),
      static_cast<int>(a.k), static_cast<int>(a.n), static_cast<int>(a.np), static_cast<int>(a.chunks),
      static_cast<int>(a.groups), lanes);
  return launch_error("gemv_kernel");
}

template <bool BF16, int BITS>
std::string launch_bits(const GemmArgs& a) {
  if (a.m <= 1) return launch_mt<BF16, BITS, 1>(a);
  if (a.m <= 2) return launch_mt<BF16, BITS, 2>(a);
  if (a.m <= 4) return launch_mt<BF16, BITS, 4>(a);
  return launch_mt<BF16, BITS, 8>(a);
}

template <bool BF16>
std::string launch_act(const GemmArgs& a) {
  switch (a.bits) {
    case 2: return launch_bits<BF16, 2>(a);
    case 3: return launch_bits<BF16, 3>(a);
    case 4: return launch_bits<BF16, 4>(a);
    default: return launch_bits<BF16, 8>(a);
  }
}

}  // namespace

int multiprocessor_count(int device) {
  // Asked once per device: the attribute query is cheap but not free, and
  // this runs on every call.
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int count = 0;
  if (gpuDeviceGetAttribute(&count, gpuDevAttrMultiProcessorCount, device) != gpuSuccess || count <= 0) count = 1;
  if (device >= 0 && device < 64) cache[device] = count;
  return count;
}

std::string launch_gemv(const GemmArgs& a) {
  if (a.m < 1 || a.m > kGemvMaxRows) return "launch_gemv: M = " + std::to_string(a.m) + " is not in [1, 8]";
  if (a.np % 128 != 0) return "launch_gemv: Np must be a multiple of 128";
  DeviceGuard guard(a.device);
  return a.act == Act::kBFloat16 ? launch_act<true>(a) : launch_act<false>(a);
}

}  // namespace gptqkit::gpu
