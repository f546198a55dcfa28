// Forward pass of a GPTQ-quantized linear layer on the CPU.
//
// Interim path until a fused low-bit GEMM kernel lands: the output rows are
// split among gptqkit's worker threads (GPTQKIT_NUM_THREADS); each worker
// dequantizes its rows one tile at a time (scratch bounded to 16 MiB in all)
// and multiplies each tile by the input with a single-threaded BLAS sgemm in
// float32.
#pragma once

#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit {

// y = x · dequant(W)ᵀ + bias, with
//   dequant(W)[n, k] = scales[g_idx[k], n] * (code[n, k] - zero[g_idx[k], n])
// (the layout of docs/format.md, the same as dequantize()).
//
//   x       [M, K] float32, float16 or bfloat16
//   qweight int32 [packed_words(K, bits), N]
//   qzeros  int32 [G, packed_words(N, bits)]   (format says how zeros are stored)
//   scales  [G, N] float16, float32 or bfloat16
//   g_idx   int32 [K], every value in [0, G)
//   bias    [N] float32, float16 or bfloat16, or nullptr for none
//   y       [M, N] with the dtype of x (written, never read)
//
// K is taken from g_idx, N from qweight, G from scales, M from x; every other
// extent is checked against them and errors name the offending argument.
// All views must be C-contiguous CPU arrays. Accumulation is in float32;
// 16-bit inputs are converted on entry and the result rounded once on exit.
// y must not overlap any input.
Status quantized_linear(const TensorView& x, const TensorView& qweight, const TensorView& qzeros,
                        const TensorView& scales, const TensorView& g_idx, const TensorView* bias, int bits,
                        ZeroFormat format, const TensorView& y);

}  // namespace gptqkit
