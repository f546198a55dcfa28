// GPU inference for GPTQ-packed linear layers (CUDA, or ROCm through HIP):
//   y[M, N] = x[M, K] · dequant(W)ᵀ (+ bias)
// with x and y float16 or bfloat16 and the weight 2, 3, 4 or 8 bits.
//
// Usage: repack each layer once, at load time, into the kernels' layout
// (docs/gpu_gemm.md), then call gpu_quantized_matmul per forward pass.
//
//   gptqkit::GpuGemmShape shape;
//   gptqkit::gpu_gemm_shape(g_idx, N, G, 4, &shape);          // sizes of the four buffers
//   ... allocate qweight_p, sz, chunk_group (and perm when shape.reordered) on the device ...
//   gptqkit::prepare_gpu_weight(qweight, qzeros, scales, g_idx, 4, ZeroFormat::kV1,
//                               {qweight_p, sz, chunk_group, perm_or_empty}, stream);
//   ...
//   gptqkit::GpuPreparedView w{qweight_p, sz, chunk_group, perm_or_empty, 4, K, N};
//   gptqkit::gpu_quantized_matmul(x, w, &bias, y, stream);   // or nullptr for no bias
//
// No type of the vendor runtime appears here: streams are passed as void*
// (a cudaStream_t / hipStream_t, nullptr for the default stream). The matmul
// allocates nothing and never synchronises with the host, so it can be
// captured in a CUDA graph. In a build without a GPU backend every function
// that needs the GPU returns Unsupported with a how-to-rebuild message;
// gpu_gemm_shape and prepare_gpu_weight into CPU buffers work in every build.
#pragma once

#include <cstdint>

#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit {

// Whether this library was built with a GPU backend, and which: "cuda",
// "hip" or "none".
bool gpu_backend_available();
const char* gpu_backend_name();

// Positions of K per chunk: every chunk of the layout holds 32 consecutive
// positions of one group, `bits` words per output column.
constexpr int64_t kGpuChunk = 32;
// Output columns are padded to a multiple of this (zero codes, scale 0).
constexpr int64_t kGpuColumnAlign = 128;
// Rows of x up to which gpu_quantized_matmul can run the GEMV kernel (it
// does for 2/3/8-bit layers, and for 4-bit ones below
// GPTQKIT_GPU_MMA_MIN_ROWS rows or where the tensor-core kernel cannot run).
constexpr int64_t kGpuGemvMaxRows = 8;

// Extents of the kernel layout of one layer.
struct GpuGemmShape {
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N
  int64_t groups = 0;        // G
  int bits = 0;
  int64_t chunks = 0;        // C: positions / 32
  int64_t positions = 0;     // Kp = 32 * C: K regrouped, every group padded to a multiple of 32
  int64_t padded_out = 0;    // Np: N rounded up to kGpuColumnAlign
  bool reordered = false;    // positions differ from 0..K-1: the layout needs `perm`
};

// The layout's extents for a layer with g_idx int32 [K] (a CPU array, values
// in [0, G)), N output columns and G groups. Without act-order and with
// groups that are multiples of 32 (every g32/g64/g128 layer, and group -1)
// the positions are 0..K-1 (padded at the end) and `reordered` is false.
Status gpu_gemm_shape(const TensorView& g_idx, int64_t out_features, int64_t groups, int bits, GpuGemmShape* out);

// The kernels' copy of one layer (all C-contiguous, all on the same device):
//   qweight      int32 [C * bits, Np]: word b of chunk c of column n at [c * bits + b, n],
//                the GPTQ bit stream of the chunk's 32 codes (docs/format.md)
//   sz           float16 or bfloat16 [G, Np, 2]: (scale, zero point) of group g, column n
//   chunk_group  int32 [C]: the group of every chunk
//   perm         int32 [Kp]: the original column of every position, -1 for padding;
//                an empty view (data == nullptr, ndim == 0) when not reordered
struct GpuPreparedView {
  TensorView qweight;
  TensorView sz;
  TensorView chunk_group;
  TensorView perm;
  int bits = 4;
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N
};

// Repacks the checkpoint tensors (CPU arrays, arguments as for
// gptqkit::dequantize: qweight int32 [packed_words(K, bits), N], qzeros
// int32 [G, packed_words(N, bits)], scales float16/bfloat16/float32 [G, N],
// g_idx int32 [K]) into `out`, whose extents must be those of
// gpu_gemm_shape and whose sz dtype (float16 or bfloat16) is the dtype of
// the activations the layer will see. `out` may live on the CPU (any build)
// or on the GPU (GPU builds: staged on the host and copied on `stream`,
// which is then synchronised — this is load-time work). out.bits,
// in_features and out_features must be filled in. Every argument is checked
// before any memory is written.
Status prepare_gpu_weight(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                          const TensorView& g_idx, int bits, ZeroFormat format, const GpuPreparedView& out,
                          void* stream);

// y[M, N] = x[M, K] · Wᵀ (+ bias[N]) on the GPU, enqueued on `stream`.
// x, y (and bias) float16 or bfloat16, all the dtype of w.sz, C-contiguous,
// on w's device; y must not overlap x or bias. Accumulation is in float32.
// Kernel choice: 4-bit, sm_80+ NVIDIA, any M (from GPTQKIT_GPU_MMA_MIN_ROWS
// rows, default 1): a tensor-core kernel (mma.sync; from 128 rows on Hopper,
// wgmma; up to GPTQKIT_GPU_SKINNY_MAX_ROWS rows, default 0 = off, at most
// 16, its "skinny" variant) that splits K across blocks when the output
// alone has too few tiles to fill the GPU; other bit widths and GPUs: M <= 8 a bandwidth-bound GEMV
// kernel (the weight streamed once, up to 8 rows of x at a time), otherwise
// a tiled kernel (tensor cores on sm_80+, a SIMT path on other
// GPUs and ROCm). gpu_matmul_kernel tells which.
// `workspace` (may be nullptr): device scratch of at least
// gpu_matmul_workspace_bytes(x, w) bytes (any dtype, C-contiguous, 16-byte
// aligned, on w's device, overlapping nothing else), for the split-K
// partial sums and for gathering act-order x; without it the call still
// runs, unsplit, or on the GEMV / tiled kernel. No allocation, no host
// synchronisation; results are deterministic (fixed summation order).
// With GPTQKIT_GPU_PDL=1 (compute capability 9.0+; default off until timed)
// the mma path's kernels are programmatic dependent launches: they may start
// while the previous kernel on the stream finishes, prefetch their first
// weights into L2, and wait for it before they read x or write anything.
Status gpu_quantized_matmul(const TensorView& x, const GpuPreparedView& w, const TensorView* bias, const TensorView& y,
                            const TensorView* workspace, void* stream);
// The same without a workspace.
Status gpu_quantized_matmul(const TensorView& x, const GpuPreparedView& w, const TensorView* bias, const TensorView& y,
                            void* stream);
// The same with `tile_counters` (may be nullptr): int32 [count] on w's
// device, all zero before the first call, which every call leaves all zero.
// With them a split call of the 4-bit mma kernels of up to
// GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS rows (default 0: off until timed on
// a GPU) adds its split-K partial sums in the GEMM kernel itself, one
// counter per output tile (a call with more tiles than `count` does not),
// instead of in a second kernel; the result has the same bits either way.
// Calls that may run at the same time (on different streams) need
// different counters; a call that does not complete (a fault) can leave
// them non-zero, and the next call using them then computes wrong sums.
Status gpu_quantized_matmul(const TensorView& x, const GpuPreparedView& w, const TensorView* bias, const TensorView& y,
                            const TensorView* workspace, const TensorView* tile_counters, void* stream);

// Bytes of workspace gpu_quantized_matmul would use for this x (validated
// like the matmul's); 0 when it needs none (the GEMV kernel, other bit widths, GPUs
// without the tensor-core kernel). Depends on x's rows and alignment, the
// layer and the device's SM count.
Status gpu_matmul_workspace_bytes(const TensorView& x, const GpuPreparedView& w, size_t* bytes);

// Which kernel gpu_quantized_matmul runs for this x (validated like the
// matmul's), given a workspace of gpu_matmul_workspace_bytes or none:
// "gemv" (M <= 8, see gpu_quantized_matmul), "wgmma" (4-bit, Hopper with sm_90a code, from
// GPTQKIT_GPU_WGMMA_MIN_ROWS rows, default 128; 0 turns it off), "skinny"
// (4-bit, sm_80+ NVIDIA, up to GPTQKIT_GPU_SKINNY_MAX_ROWS rows), "mma"
// (4-bit, sm_80+ NVIDIA) or "tiled". For benchmarks, tests and diagnostics.
Status gpu_matmul_kernel(const TensorView& x, const GpuPreparedView& w, bool with_workspace, const char** kernel);

// weight[N, K] = dequant(W) in the dtype of w.sz, in the original column
// order (act-order undone), enqueued on `stream`: the first half of the
// "dequantize + dense GEMM" path that callers with a vendor GEMM (torch)
// use for large M.
Status gpu_dequantize_prepared(const GpuPreparedView& w, const TensorView& weight, void* stream);

// weight[N, Kp] (Kp = 32 * chunks) = dequant(W) in the layout's position
// order, enqueued on `stream`: column p is the weight at position p, and a
// padding position holds scale * (0 - zero). For act-order layers this is
// the fast way to the dense path: gpu_dequantize_prepared must scatter each
// weight to its original column (one 2-byte store per row and position),
// while here every layout is written in whole rows. The caller gathers x
// into the same order instead, x_pos[m, p] = x[m, perm[p]], and 0 where
// perm[p] = -1 so that the padding drops out (M * Kp values, not N * K);
// without perm, positions past K are padding.
Status gpu_dequantize_prepared_positions(const GpuPreparedView& w, const TensorView& weight, void* stream);

}  // namespace gptqkit
