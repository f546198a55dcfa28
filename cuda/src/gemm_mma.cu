// Launcher of the 4-bit tensor-core kernels (gemm_mma_kernel.cuh: mma.sync,
// sm_80+; gemm_wgmma_kernel.cuh: wgmma, sm_90a, for many rows; the designs
// are described there): the choice between them, the split-K plan, the
// optional gather of x, the kernel, and the reduction of the splits.
#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "gemm_mma_kernel.cuh"
#include "gemm_mma_skinny_kernel.cuh"
#include "gemm_wgmma_kernel.cuh"

namespace gptqkit::gpu {
namespace {

// One plan serves both kernels: the same column tile and stage length.
static_assert(kWgmmaBN == kMmaBN && kWgmmaStageChunks == kMmaStageChunks, "the mma and wgmma tiles must agree");

constexpr int kHelperThreads = 256;
// A split gets at least this many pipeline stages, so that filling the ring
// stays small next to streaming.
constexpr int64_t kMinStagesPerSplit = 4;
constexpr int kMaxSplits = 16;
// Blocks per SM the plan aims for: each holds a 3-4 stage ring of weights in
// flight, and two of them keep an SM's share of DRAM bandwidth busy (a
// first guess until benchmarks/bench_gpu_gemm.py has run on the target GPU).
// (env GPTQKIT_GPU_MMA_BLOCKS_PER_SM overrides it, for tuning.)
constexpr int64_t kBlocksPerSm = 2;

// Rows from which the mma kernel takes 4-bit calls of up to kGemvMaxRows rows
// (env GPTQKIT_GPU_MMA_MIN_ROWS; 9 or more leaves them all to the GEMV
// kernel). Measured on an H100 (docs/gpu_gemm.md): the GEMV kernel's fp32
// FMAs grow with M (x0.13-0.19 of fp16 at M = 8), while the mma kernel
// streams the weight at M = 16 at least as fast as the GEMV kernel at M = 1.
constexpr int64_t kMmaMinRows = 1;

// Rows from which the wgmma kernel takes a call where it can (env
// GPTQKIT_GPU_WGMMA_MIN_ROWS; 0 turns it off). A first guess until
// benchmarks/bench_gpu_gemm.py has run on an H100: below a few hundred rows
// the weight stream, not the tensor rate, bounds both kernels.
constexpr int64_t kWgmmaMinRows = 128;

// Rows up to which the skinny variant of the mma kernel takes a call instead
// of it (env GPTQKIT_GPU_SKINNY_MAX_ROWS, at most 16; 0: never). Off until
// benchmarks/bench_gpu_gemm.py has timed both on a GPU: it prints the
// skinny kernel's time next to the mma kernel's for M <= 16.
constexpr int64_t kSkinnyMaxRows = 0;

// Rows up to which a split mma / skinny call given tile counters adds its
// partial sums in the GEMM kernel (the last block of each tile) instead of
// a second kernel (env GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS; 0: never). The
// last block reads splits x rows x 128 sums alone, so the gain (one launch
// less per call) shrinks with M. Off until benchmarks/bench_gpu_gemm.py has
// timed both on a GPU (its "separate reduce" column).
constexpr int64_t kInKernelReduceMaxRows = 0;

// Whether the mma.sync path launches its kernels as programmatic dependent
// launches on GPUs that have them (env GPTQKIT_GPU_PDL=1; 0: ordinary
// launches): each kernel then starts while the one before it on the stream
// finishes, and asks L2 for its first weights meanwhile. Off until
// benchmarks/bench_gpu_gemm.py has timed both on a GPU (its "PDL" column).
constexpr int64_t kOverlapLaunches = 0;

size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

// A non-negative integer from the environment, or `fallback` (unset or
// malformed: the Python layer rejects a malformed value with an error before
// a call gets here).
int64_t env_rows(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  return (*end == '\0' && v >= 0) ? static_cast<int64_t>(v) : fallback;
}

int64_t wgmma_min_rows() { return env_rows("GPTQKIT_GPU_WGMMA_MIN_ROWS", kWgmmaMinRows); }
int64_t mma_min_rows() { return std::max<int64_t>(1, env_rows("GPTQKIT_GPU_MMA_MIN_ROWS", kMmaMinRows)); }
int64_t skinny_max_rows() {
  return std::min<int64_t>(kSkinnyRows, env_rows("GPTQKIT_GPU_SKINNY_MAX_ROWS", kSkinnyMaxRows));
}
int64_t in_kernel_reduce_max_rows() {
  return env_rows("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", kInKernelReduceMaxRows);
}
int64_t blocks_per_sm() { return std::clamp<int64_t>(env_rows("GPTQKIT_GPU_MMA_BLOCKS_PER_SM", kBlocksPerSm), 1, 16); }

// ask(device), remembered in `cache` for devices 0..63 (others are asked
// every time): the device properties below never change in a process.
template <typename Ask>
bool once_per_device(std::atomic<int> (&cache)[64], int device, Ask ask) {
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);  // 0 unknown, 1 yes, 2 no
    if (known != 0) return known == 1;
  }
  const bool yes = ask(device);
  if (cached) cache[device].store(yes ? 1 : 2, std::memory_order_relaxed);
  return yes;
}

#if !GPTQKIT_GPU_IS_HIP
int compute_capability_major(int device) {
  int major = 0;
  return gpuDeviceGetAttribute(&major, gpuDevAttrComputeCapabilityMajor, device) == gpuSuccess ? major : 0;
}
#endif

// Whether the wgmma kernel can run on `device`: the library was built with
// sm_90a code (which the runtime then picks for compute capability 9.0, the
// only GPUs it runs on). Asked once per device.
bool wgmma_runs_on(int device) {
#if GPTQKIT_GPU_IS_HIP || !GPTQKIT_CUDA_HAS_SM90A
  (void)device;
  return false;
#else
  static std::atomic<int> cache[64];
  return once_per_device(cache, device, [](int d) {
    int minor = 0;
    return compute_capability_major(d) == 9 &&
           gpuDeviceGetAttribute(&minor, gpuDevAttrComputeCapabilityMinor, d) == gpuSuccess && minor == 0;
  });
#endif
}

// Whether the mma path launches its kernels overlapped on `device`
// (GPTQKIT_GPU_PDL, and compute capability 9.0+: programmatic dependent
// launches exist from Hopper on). The capability is asked once per device.
bool overlap_launches_on(int device) {
  if (env_rows("GPTQKIT_GPU_PDL", kOverlapLaunches) == 0) return false;
#if GPTQKIT_GPU_IS_HIP
  (void)device;
  return false;
#else
  static std::atomic<int> cache[64];
  return once_per_device(cache, device, [](int d) { return compute_capability_major(d) >= 9; });
#endif
}

// Whether the binary the runtime picked for `device` has the mma body (it is
// compiled out below sm_80 and on ROCm). Asked once per device.
bool mma_compiled_for(int device) {
#if GPTQKIT_GPU_IS_HIP
  (void)device;
  return false;
#else
  static std::atomic<int> cache[64];
  return once_per_device(cache, device, [](int d) {
    DeviceGuard guard(d);
    gpuFuncAttributes attr;
    if (gpuFuncGetAttributes(&attr, (mma_kernel<false, 1>)) == gpuSuccess) return attr.binaryVersion >= 80;
    (void)gpuGetLastError();
    return false;
  });
#endif
}

template <bool BF16>
std::string launch_skinny(const GemmArgs& a, const MmaPlan& plan, const uint16_t* x, int x_stride, float* partial,
                          unsigned* counters) {
  const dim3 grid(static_cast<unsigned>(a.np / kMmaBN), static_cast<unsigned>(ceil_div(a.m, kSkinnyRows)),
                  static_cast<unsigned>(plan.splits));
  GPTQKIT_LAUNCH_OVERLAPPED(plan.overlap_launches, grid, kMmaThreads, SkinnySmem::kTotal,
                            static_cast<gpuStream_t>(a.stream), mma_skinny_kernel<BF16>)(
      x, x_stride, a.qweight, static_cast<const uint16_t*>(a.sz), a.chunk_group,
      static_cast<const uint16_t*>(a.bias), static_cast<uint16_t*>(a.y), partial, counters, static_cast<int>(a.m),
      static_cast<int>(a.n), static_cast<int>(a.np), static_cast<int>(a.chunks), static_cast<int>(a.groups),
      plan.chunks_per_split);
  return launch_error("mma_skinny_kernel");
}

template <bool BF16, int MF>
std::string launch_tile(const GemmArgs& a, const MmaPlan& plan, const uint16_t* x, int x_stride, float* partial,
                        unsigned* counters) {
  using Smem = MmaSmem<MF>;
  const dim3 grid(static_cast<unsigned>(a.np / kMmaBN), static_cast<unsigned>(ceil_div(a.m, Smem::kBM)),
                  static_cast<unsigned>(plan.splits));
  GPTQKIT_LAUNCH_OVERLAPPED(plan.overlap_launches, grid, kMmaThreads, Smem::kTotal,
                            static_cast<gpuStream_t>(a.stream), mma_kernel<BF16, MF>)(
      x, x_stride, a.qweight, static_cast<const uint16_t*>(a.sz), a.chunk_group,
      static_cast<const uint16_t*>(a.bias), static_cast<uint16_t*>(a.y), partial, counters, static_cast<int>(a.m),
      static_cast<int>(a.n), static_cast<int>(a.np), static_cast<int>(a.chunks), static_cast<int>(a.groups),
      plan.chunks_per_split);
  return launch_error("mma_kernel");
}

// Raises the wgmma kernel's dynamic shared-memory limit (more than the
// 48 KB a block gets by default) on the current device.
template <bool BF16, int BT>
bool raise_wgmma_smem_limit() {
  const auto kernel = wgmma_kernel<BF16, BT>;  // (a template-id would split the macro's arguments)
  return gpuFuncSetAttribute(kernel, gpuFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(WgmmaSmem<BT>::kTotal)) == gpuSuccess;
}

template <bool BF16, int BT>
std::string launch_wgmma_tile(const GemmArgs& a, const MmaPlan& plan, const uint16_t* x, int x_stride,
                              float* partial) {
  using Smem = WgmmaSmem<BT>;
  const dim3 grid(static_cast<unsigned>(a.np / kWgmmaBN), static_cast<unsigned>(ceil_div(a.m, BT)),
                  static_cast<unsigned>(plan.splits));
  GPTQKIT_LAUNCH(grid, kWgmmaThreads, Smem::kTotal, static_cast<gpuStream_t>(a.stream), wgmma_kernel<BF16, BT>)(
      x, x_stride, a.qweight, static_cast<const uint16_t*>(a.sz), a.chunk_group,
      static_cast<const uint16_t*>(a.bias), static_cast<uint16_t*>(a.y), partial, static_cast<int>(a.m),
      static_cast<int>(a.n), static_cast<int>(a.np), static_cast<int>(a.chunks), static_cast<int>(a.groups),
      plan.chunks_per_split);
  return launch_error("wgmma_kernel");
}

template <bool BF16>
std::string launch_act(const GemmArgs& a, const MmaPlan& plan, void* workspace) {
  const gpuStream_t stream = static_cast<gpuStream_t>(a.stream);
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  int x_stride = static_cast<int>(a.k);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  if (plan.gather_x) {
    uint16_t* xc = reinterpret_cast<uint16_t*>(ws);
    const int64_t kp = a.chunks * kChunk;
    const int64_t total = a.m * kp;
    GPTQKIT_LAUNCH_OVERLAPPED(plan.overlap_launches, static_cast<unsigned>(ceil_div(total, kHelperThreads)),
                              kHelperThreads, 0, stream, gather_x_kernel)(x, a.perm, xc, static_cast<int>(a.m),
                                                                          static_cast<int>(a.k), static_cast<int>(kp));
    std::string err = launch_error("gather_x_kernel");
    if (!err.empty()) return err;
    x = xc;
    x_stride = static_cast<int>(kp);
  }
  float* partial = plan.splits > 1 ? reinterpret_cast<float*>(ws + plan.x_bytes) : nullptr;
  unsigned* counters = plan.reduce_in_kernel ? a.tile_counters : nullptr;
  std::string err;
  if (plan.wgmma) {
    err = plan.rows_per_tile == 64 ? launch_wgmma_tile<BF16, 64>(a, plan, x, x_stride, partial)
                                   : launch_wgmma_tile<BF16, 128>(a, plan, x, x_stride, partial);
  } else if (plan.skinny) {
    err = launch_skinny<BF16>(a, plan, x, x_stride, partial, counters);
  } else {
    switch (plan.mf) {
      case 1: err = launch_tile<BF16, 1>(a, plan, x, x_stride, partial, counters); break;
      case 2: err = launch_tile<BF16, 2>(a, plan, x, x_stride, partial, counters); break;
      default: err = launch_tile<BF16, 4>(a, plan, x, x_stride, partial, counters); break;
    }
  }
  if (!err.empty() || partial == nullptr || counters != nullptr) return err;
  const int64_t total = a.m * a.n;
  GPTQKIT_LAUNCH_OVERLAPPED(plan.overlap_launches, static_cast<unsigned>(ceil_div(total, kHelperThreads)),
                            kHelperThreads, 0, stream, splitk_reduce_kernel<BF16>)(
      partial, plan.splits, static_cast<const uint16_t*>(a.bias), static_cast<uint16_t*>(a.y),
      static_cast<int>(a.m), static_cast<int>(a.n), static_cast<int>(a.np));
  return launch_error("splitk_reduce_kernel");
}

}  // namespace

MmaPlan plan_mma(const GemmArgs& a, size_t workspace_bytes) {
  MmaPlan plan;
  if (a.bits != 4 || a.m < 1 || (a.m <= kGemvMaxRows && a.m < mma_min_rows()) || a.np % kMmaBN != 0 ||
      a.chunks <= 0)
    return plan;
  if (!mma_compiled_for(a.device)) return plan;
  plan.mf = a.m <= 16 ? 1 : a.m <= 32 ? 2 : 4;
  const int64_t wgmma_rows = wgmma_min_rows();
  plan.wgmma = wgmma_rows > 0 && a.m >= wgmma_rows && wgmma_runs_on(a.device);
  plan.skinny = !plan.wgmma && a.m <= skinny_max_rows();  // one 16-row tile, like mf == 1
  plan.rows_per_tile = plan.wgmma ? (a.m <= 64 ? 64 : 128) : 16 * plan.mf;
  const int64_t bm = plan.rows_per_tile;
  // The kernel reads x as [M, Kp] with positions == columns, 16-byte rows.
  plan.gather_x = a.perm != nullptr || a.k % kChunk != 0 || reinterpret_cast<uintptr_t>(a.x) % 16 != 0;
  plan.x_bytes = plan.gather_x ? round_up(static_cast<size_t>(a.m * a.chunks * kChunk) * sizeof(uint16_t), 256) : 0;
  if (plan.x_bytes > workspace_bytes) return plan;  // cannot gather: the tiled kernel takes the call

  const int64_t blocks = (a.np / kMmaBN) * ceil_div(a.m, bm);
  const int64_t stages = ceil_div(a.chunks, kMmaStageChunks);
  // A wgmma block (two warpgroups, ~85 KB of shared memory, ~165 registers
  // per thread) has an SM to itself, and its splits are compute-bound: as
  // many as fit in one wave (64 tiles on 132 SMs: 2 splits, 128 blocks; 3
  // would make a second, mostly idle wave). mma.sync blocks are bound by
  // the weight stream: about kBlocksPerSm per SM.
  const int64_t sms = multiprocessor_count(a.device);
  const int64_t want = plan.wgmma ? std::max<int64_t>(1, sms / blocks) : ceil_div(blocks_per_sm() * sms, blocks);
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, stages / kMinStagesPerSplit));
  int64_t splits = std::clamp<int64_t>(want, 1, most);
  // Whole stages per split, then as few splits as that spacing needs.
  int64_t per_split = ceil_div(stages, splits) * kMmaStageChunks;
  splits = ceil_div(a.chunks, per_split);
  size_t partial_bytes = splits > 1 ? static_cast<size_t>(splits * a.m * a.np) * sizeof(float) : 0;
  if (plan.x_bytes + partial_bytes > workspace_bytes) {  // not enough scratch: no split
    splits = 1;
    per_split = a.chunks;
    partial_bytes = 0;
  }
  plan.splits = static_cast<int>(splits);
  plan.chunks_per_split = static_cast<int>(per_split);
  plan.partial_bytes = partial_bytes;
  // The wgmma kernel (many rows: a long serial sum for one block) always
  // leaves the sums to splitk_reduce_kernel.
  plan.reduce_in_kernel = splits > 1 && !plan.wgmma && a.tile_counters != nullptr &&
                          blocks <= a.tile_counter_count && a.m <= in_kernel_reduce_max_rows();
  // (The wgmma kernel, compute-bound at its row counts, launches ordinarily.)
  plan.overlap_launches = !plan.wgmma && overlap_launches_on(a.device);
  plan.usable = true;
  return plan;
}

std::string prepare_gemm_kernels(int device) {
  if (!wgmma_runs_on(device)) return std::string();
  static std::atomic<bool> done[64];
  const bool cached = device >= 0 && device < 64;
  if (cached && done[device].load(std::memory_order_relaxed)) return std::string();
  DeviceGuard guard(device);
  if (!raise_wgmma_smem_limit<false, 64>() || !raise_wgmma_smem_limit<false, 128>() ||
      !raise_wgmma_smem_limit<true, 64>() || !raise_wgmma_smem_limit<true, 128>())
    return launch_error("wgmma_kernel (raising its shared-memory limit)");
  if (cached) done[device].store(true, std::memory_order_relaxed);
  return std::string();
}

std::string launch_mma(const GemmArgs& a, const MmaPlan& plan, void* workspace) {
  if (!plan.usable) return "launch_mma: the plan says the mma kernel cannot take this call";
  if (plan.workspace_bytes() > 0 && workspace == nullptr) return "launch_mma: the plan needs a workspace";
  if (a.m > 65535 * static_cast<int64_t>(plan.rows_per_tile))
    return "launch_mma: M = " + std::to_string(a.m) + " exceeds the grid limit";
  if (plan.wgmma) {
    const std::string err = prepare_gemm_kernels(a.device);
    if (!err.empty()) return err;
  }
  DeviceGuard guard(a.device);
  return a.act == Act::kBFloat16 ? launch_act<true>(a, plan, workspace) : launch_act<false>(a, plan, workspace);
}

}  // namespace gptqkit::gpu
