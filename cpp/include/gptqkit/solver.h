// The GPTQ solver: Hessian preparation and lazy-batch column quantization
// with error feedback (Frantar et al., 2022), on the CPU.
#pragma once

#include <cstdint>

#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit {

struct QuantizeOptions {
  int bits = 4;              // 2, 3, 4 or 8
  int64_t group_size = 128;  // -1: one group per output channel; else > 0 (last group may be partial)
  bool sym = true;           // symmetric grid, zero point (maxq + 1) / 2
  bool desc_act = false;     // act-order: quantize columns by descending diag(H)
  // Group-aware act-order (Gafni et al., 2025; GPTQModel's act_group_aware):
  // each group's columns by descending diag(H), whole groups by descending
  // max diag(H) within the group, a last partial group last. Every group is
  // still quantized as one contiguous run, so g_idx stays k / group_size and
  // the checkpoint is a plain desc_act = false one that every kernel runs
  // without a gather, while the most sensitive inputs are quantized first.
  // Needs group_size > 0 and desc_act off.
  bool act_group_aware = false;
  bool static_groups = false;// group grids from the unpermuted weight, fixed before the sweep
  double damp_percent = 0.01;// lambda = damp_percent * mean(diag H)
  int64_t block_size = 128;  // lazy-batch width
  int max_damp_retries = 8;  // extra attempts, each with 3x the damping, capped at 100 %

  // Clipping search: besides the min-max range, try ranges shrunk to
  // p * [min, max] for clip_steps values of p evenly spaced down to
  // clip_min_ratio, keeping the one with the least error
  // sum_j c_j |x_j - q_j|^clip_norm. The column weights c_j are 1 / U_jj^2
  // (U the upper factor of H^-1: GPTQ's own per-column loss weight) when
  // clip_hessian_weighted, else 1. clip_steps = 0 keeps plain min-max (the
  // reference GPTQ grid).
  int clip_steps = 0;
  double clip_min_ratio = 0.75;
  double clip_norm = 2.0;
  bool clip_hessian_weighted = true;
  // Round every scale to float16 before quantizing with it, so the error
  // feedback sees exactly the weights a float16-scale checkpoint will hold.
  bool fp16_scales = false;
  // Smallest zero point an asymmetric grid may use. The v1 checkpoint layout
  // stores zero - 1 and so cannot hold a zero of 0: with 1 here, a group whose
  // range would round its zero to 0 gets zero 1 and a scale widened to still
  // cover the group's maximum.
  int min_zero_point = 0;
};

// Outputs, all preallocated by the caller, contiguous, on the CPU:
//   codes  uint8 [N, K]     integer codes in the original column order
//   scales float32 [G, N]   G = 1 if group_size == -1 else ceil(K / group_size)
//   zeros  int32 [G, N]     true zero points (not the v1 "zero - 1")
//   g_idx  int32 [K]        group of every original input column
//   perm   int64 [K]        processing order (identity without desc_act / act_group_aware)
struct QuantizeOutputs {
  TensorView codes, scales, zeros, g_idx, perm;
};

struct QuantizeStats {
  double loss = 0.0;          // sum over entries of (w - q)^2 / d^2 / 2, as GPTQ prints it
  double damp_percent_used = 0.0;
  double damp_lambda = 0.0;   // absolute damping added to diag(H)
  int damp_attempts = 0;      // 1 when the first damping worked
  int64_t dead_columns = 0;   // inputs with H_ii == 0 (weights zeroed)
};

int64_t num_groups(int64_t in_features, int64_t group_size);

// Checks option values; the message names the offending option.
Status validate_options(const QuantizeOptions& options);

// Quantizes W [N, K] (float32, float16 or bfloat16) given H [K, K] (float32 or
// float64, symmetric). W and H are only read.
//
// Device: all tensors on the CPU, or all on one GPU (builds with a GPU
// backend; block_size <= 256 there). On a GPU the work is queued on `stream`
// (a cudaStream_t / hipStream_t; null = the default stream); the call returns
// after the results are complete (it reads the loss back). Mixed devices are
// an InvalidArgument; GPU tensors in a build without GPU support Unsupported.
//
// Group grids when group_size < block_size: a group that starts inside a lazy
// block takes its min/max from the weights as they stood at the start of that
// block (the rule of the reference GPTQ implementation), not from weights
// already updated by earlier columns of the same block.
Status quantize_weight(const TensorView& weight, const TensorView& hessian,
                       const QuantizeOptions& options, const QuantizeOutputs& out,
                       QuantizeStats* stats, void* stream = nullptr);

// H^-1 preparation on its own (used by quantize_weight; exposed for tests):
// fills upper [K, K] float32 with U, the upper Cholesky factor of
// (H + lambda I)^-1 (H^-1 = U^T U). Dead inputs must already have H_ii = 1.
// Both on the CPU or both on one GPU (as quantize_weight).
Status inverse_hessian_upper_factor(const TensorView& hessian, double damp_percent,
                                    int max_retries, const TensorView& upper,
                                    QuantizeStats* stats, void* stream = nullptr);

// Device memory the GPU solver holds (scratch of running calls and Hessian
// accumulators), in bytes: now, and at most since the last reset (torch's
// allocator does not see it). Zeros in builds without a GPU backend.
struct GpuSolverMemory {
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
};
GpuSolverMemory gpu_solver_memory(bool reset_peak = false);

}  // namespace gptqkit
