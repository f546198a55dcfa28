// Launchers of the GPU GEMM kernels (cuda/src/gemm_*.cu), called by
// cpp/src/gpu_gemm.cpp after it has validated every argument. Plain C++: no
// vendor type crosses this header, so the core compiles it with the host
// compiler. Pointers are device pointers; the stream is a cudaStream_t /
// hipStream_t. Errors come back as a message (empty on success), taken from
// gpuGetLastError right after the launch; nothing here synchronises.
#pragma once

#include <cstdint>
#include <string>

namespace gptqkit::gpu {

enum class Act : uint8_t { kFloat16, kBFloat16 };

struct GemmArgs {
  const void* x = nullptr;          // [M, K] Act, row stride K
  const uint32_t* qweight = nullptr;// [C * bits, Np]
  const void* sz = nullptr;         // [G, Np, 2] Act
  const int32_t* chunk_group = nullptr;  // [C]
  const int32_t* perm = nullptr;    // [C * 32] or nullptr (position p is column p)
  const void* bias = nullptr;       // [N] Act or nullptr
  void* y = nullptr;                // [M, N] Act
  int64_t m = 0, k = 0, n = 0, np = 0, chunks = 0, groups = 0;
  int bits = 4;
  Act act = Act::kFloat16;
  int device = 0;
  void* stream = nullptr;
  // Zeroed counters that the mma kernels may use to add split-K sums
  // themselves (MmaPlan::reduce_in_kernel), left zeroed; nullptr: none.
  unsigned* tile_counters = nullptr;
  int64_t tile_counter_count = 0;
};

// M <= 8 (kGemvMaxRows): the weight streamed once, CUDA-core FMAs. For 4-bit
// layers the mma kernel takes these rows too from GPTQKIT_GPU_MMA_MIN_ROWS
// rows (default kMmaMinRows; see gemm_mma.cu), where it can run.
constexpr int64_t kGemvMaxRows = 8;
std::string launch_gemv(const GemmArgs& a);
// Any M: tiles of 16 or 64 rows x 64 columns.
std::string launch_tiled(const GemmArgs& a);
// The 4-bit tensor-core kernels (M >= GPTQKIT_GPU_MMA_MIN_ROWS, sm_80+ NVIDIA; wgmma on sm_90a from
// GPTQKIT_GPU_WGMMA_MIN_ROWS rows): how they would take a call. Not usable (the tiled kernel runs instead) for other bit widths,
// binaries without sm_80 code, ROCm, or when x must be gathered and there is
// no workspace for it.
struct MmaPlan {
  bool usable = false;
  bool wgmma = false;         // the sm_90a wgmma kernel (many rows, H100/H200) instead of mma.sync
  bool skinny = false;        // the mma.sync variant for M <= 16 (GPTQKIT_GPU_SKINNY_MAX_ROWS; gemm_mma_skinny_kernel.cuh)
  int mf = 1;                 // mma.sync: tiles of 16 * mf rows
  int rows_per_tile = 16;     // rows of x per block (16 * mf, or 64 / 128 for wgmma)
  int splits = 1;             // K split across blocks: float32 partial sums, then a reduction
  bool reduce_in_kernel = false;  // the splits' sums added by the GEMM kernel's last block per tile
                                  // (a.tile_counters), not by splitk_reduce_kernel
  bool overlap_launches = false;  // mma.sync kernels (and gather, reduce) as programmatic dependent
                                  // launches (GPTQKIT_GPU_PDL, compute capability 9.0+)
  int chunks_per_split = 0;
  bool gather_x = false;      // x first gathered into [M, Kp] (act-order, K % 32 != 0, misaligned x)
  size_t x_bytes = 0;         // workspace: the gathered x, then
  size_t partial_bytes = 0;   // the partial sums [splits, M, Np]
  size_t workspace_bytes() const { return x_bytes + partial_bytes; }
};
// The plan for a.m rows of a.x with at most `workspace_bytes` of scratch
// (SIZE_MAX: what it would like); splits fall back to 1 when the scratch is
// too small for the partial sums.
MmaPlan plan_mma(const GemmArgs& a, size_t workspace_bytes);
// One-time per-device setup of the GEMM kernels (the wgmma kernel's
// shared-memory limit, above the 48 KB default); idempotent and cheap after
// the first call. prepare_gpu_weight calls it at load time; launch_mma does
// too, in case a call comes first.
std::string prepare_gemm_kernels(int device);
// Runs a usable plan; `workspace` (16-byte aligned) holds plan.workspace_bytes().
std::string launch_mma(const GemmArgs& a, const MmaPlan& plan, void* workspace);
// weight[N, K] (Act) from the layout; a.x, a.bias, a.y unused, `out` instead.
std::string launch_dequantize(const GemmArgs& a, void* out);

// Host -> device copy of `bytes` on `stream`, then a stream synchronise
// (load-time staging of prepare_gpu_weight).
std::string copy_to_device_sync(void* dst, const void* src, size_t bytes, int device, void* stream);

// "cuda" or "hip".
const char* backend_name();

}  // namespace gptqkit::gpu
