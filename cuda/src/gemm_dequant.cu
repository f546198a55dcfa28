// Dequantization of the kernel layout to a dense [N, K] fp16/bf16 weight in
// the original column order (the large-M path: a caller with a vendor GEMM,
// e.g. torch.mm on cuBLAS/hipBLAS, multiplies it), and the small runtime
// helpers of the GEMM front end.
#include <cstdint>

#include "gemm_dequant_kernel.cuh"

namespace gptqkit::gpu {
namespace {

constexpr int kThreads = kDequantThreads;

template <bool BF16, int BITS>
void launch_one(const GemmArgs& a, void* out) {
  if (a.perm == nullptr && a.k % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
      ceil_div(a.chunks, kDequantTileChunks) <= 65535) {
    const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kDequantTileCols)),
                    static_cast<unsigned>(ceil_div(a.chunks, kDequantTileChunks)));
    GPTQKIT_LAUNCH(grid, kThreads, 0, static_cast<gpuStream_t>(a.stream), dequant_tile_kernel<BF16, BITS>)(
        a.qweight, static_cast<const uint16_t*>(a.sz), a.chunk_group, static_cast<uint16_t*>(out),
        static_cast<int>(a.k), static_cast<int>(a.n), static_cast<int>(a.np), static_cast<int>(a.chunks),
        static_cast<int>(a.groups));
    return;
  }
  const int64_t total = a.n * a.chunks;
  const dim3 grid(static_cast<unsigned>(ceil_div(total, kThreads)));
  GPTQKIT_LAUNCH(grid, kThreads, 0, static_cast<gpuStream_t>(a.stream), dequant_kernel<BF16, BITS>)(
      a.qweight, static_cast<const uint16_t*>(a.sz), a.chunk_group, a.perm, static_cast<uint16_t*>(out),
      static_cast<int>(a.k), static_cast<int>(a.n), static_cast<int>(a.np), static_cast<int>(a.chunks),
      static_cast<int>(a.groups));
}

template <bool BF16>
std::string launch_act(const GemmArgs& a, void* out) {
  switch (a.bits) {
    case 2: launch_one<BF16, 2>(a, out); break;
    case 3: launch_one<BF16, 3>(a, out); break;
    case 4: launch_one<BF16, 4>(a, out); break;
    default: launch_one<BF16, 8>(a, out); break;
  }
  return launch_error("dequant_kernel");
}

}  // namespace

std::string launch_dequantize(const GemmArgs& a, void* out) {
  if (ceil_div(a.n * a.chunks, kThreads) > 0x7fffffff) return "launch_dequantize: the layer is too large for one grid";
  if (a.n == 0 || a.chunks == 0) return std::string();
  DeviceGuard guard(a.device);
  return a.act == Act::kBFloat16 ? launch_act<true>(a, out) : launch_act<false>(a, out);
}

std::string copy_to_device_sync(void* dst, const void* src, size_t bytes, int device, void* stream) {
  if (bytes == 0) return std::string();
  DeviceGuard guard(device);
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  gpuError_t e = gpuMemcpyAsync(dst, src, bytes, gpuMemcpyHostToDevice, s);
  // The source is pageable host memory that dies with the caller's frame:
  // wait for the copy (load-time only, never on the per-call path).
  if (e == gpuSuccess) e = gpuStreamSynchronize(s);
  if (e != gpuSuccess) return std::string("host-to-device copy: ") + gpuGetErrorString(e);
  return std::string();
}

const char* backend_name() {
#if GPTQKIT_GPU_IS_HIP
  return "hip";
#else
  return "cuda";
#endif
}

}  // namespace gptqkit::gpu
