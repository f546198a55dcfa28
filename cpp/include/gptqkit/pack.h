// Packing of quantized layers to and from the GPTQ checkpoint layout.
// docs/format.md specifies the layout bit by bit.
#pragma once

#include <cstdint>

#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit {

enum class ZeroFormat : uint8_t {
  kV1,  // qzeros store zero - 1 (AutoGPTQ, GPTQModel "gptq", transformers, vLLM)
  kV2,  // qzeros store the true zero (GPTQModel "gptq_v2")
};

// Number of int32 words holding `count` values of `bits` bits packed LSB first
// as one continuous bit stream: ceil(count * bits / 32).
int64_t packed_words(int64_t count, int bits);

// codes uint8 [N, K] -> qweight int32 [packed_words(K, bits), N], packed along K.
// Both on the CPU, or (builds with a GPU backend) both on one GPU, then
// queued on `stream` (cudaStream_t / hipStream_t; null = default stream).
Status pack_qweight(const TensorView& codes, int bits, const TensorView& qweight, void* stream = nullptr);
// qweight int32 [packed_words(K, bits), N] -> codes uint8 [N, K].
Status unpack_qweight(const TensorView& qweight, int bits, const TensorView& codes);

// zeros int32 [G, N] (true zeros) -> qzeros int32 [G, packed_words(N, bits)].
// kV1 stores zero - 1; a zero of 0 cannot be stored in v1 and is an error.
// CPU or GPU as pack_qweight.
Status pack_qzeros(const TensorView& zeros, int bits, ZeroFormat format, const TensorView& qzeros,
                   void* stream = nullptr);
// qzeros int32 [G, packed_words(N, bits)] -> zeros int32 [G, N] (true zeros).
// For kV1 a stored field s decodes as s + 1 (so s = 2^bits - 1 decodes as 2^bits).
Status unpack_qzeros(const TensorView& qzeros, int bits, ZeroFormat format, const TensorView& zeros);

// Dense weight [N, K] (float32) from a packed layer:
//   W[n, k] = scales[g_idx[k], n] * (code[n, k] - zero[g_idx[k], n]).
// scales float16 or float32 [G, N]; g_idx int32 [K] with values in [0, G).
// This is the oracle every GEMM kernel is tested against.
Status dequantize(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                  const TensorView& g_idx, int bits, ZeroFormat format, const TensorView& weight);

}  // namespace gptqkit
