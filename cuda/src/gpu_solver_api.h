// Entry points of the GPU solver backend (cuda/src/gpu_*.cu) that the core
// (cpp/src/hessian.cpp, cpp/src/solver.cpp) calls for tensors that live on a
// GPU. Plain C++: no vendor type crosses this header, so the core compiles it
// with the host compiler. Streams are a cudaStream_t / hipStream_t passed as
// void* (nullptr: the legacy default stream). Every function validates its
// arguments before touching memory and returns a Status; none throws.
#pragma once

#include <cstdint>

#include "gptqkit/solver.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit::gpu {

// Device buffer of `bytes` on `device` for state that outlives one call (the
// Hessian accumulator): a plain, synchronous allocation, made once.
Status alloc_persistent(const Device& device, int64_t bytes, void** out);
void free_persistent(const Device& device, void* ptr, int64_t bytes);

// The Hessian accumulator's device state for K features: H (fp32 [K, K],
// upper triangle valid) and a deferred input check. Allocate
// hessian_state_bytes(k) with alloc_persistent; no initialisation needed.
int64_t hessian_state_bytes(int64_t k);

// H <- beta * H + alpha * X^T X for x [rows, K] (float32, float16 or bfloat16,
// contiguous, on the state's device). beta == 0 (the first batch) overwrites
// H without reading it. Non-finite inputs are recorded and reported by
// hessian_write: checking here would synchronise the host once per batch.
Status hessian_add_batch(const TensorView& x, void* state, int64_t k, double alpha, double beta, void* stream);

// out [K, K] float32 or float64 on the same device: the full symmetric H, or
// zeros when state is null (nothing added yet). Synchronises the stream once
// (to read the input check).
Status hessian_write(const void* state, int64_t k, const TensorView& out, void* stream);

// quantize_weight / inverse_hessian_upper_factor of gptqkit/solver.h with
// every tensor on one GPU. Same semantics and options as the CPU path.
Status quantize_weight(const TensorView& weight, const TensorView& hessian, const QuantizeOptions& options,
                       const QuantizeOutputs& out, QuantizeStats* stats, void* stream);
Status inverse_hessian_upper_factor(const TensorView& hessian, double damp_percent, int max_retries,
                                    const TensorView& upper, QuantizeStats* stats, void* stream);

// pack_qweight / pack_qzeros of gptqkit/pack.h with all tensors on one GPU
// (v1: qzeros store zero - 1). Values are range-checked first (one host
// synchronisation), so nothing is written on error.
Status pack_qweight(const TensorView& codes, int bits, const TensorView& qweight, void* stream);
Status pack_qzeros(const TensorView& zeros, int bits, bool v1, const TensorView& qzeros, void* stream);

// Bytes of device memory gptqkit's solver holds now and at most since the
// last reset (scratch and accumulators; torch's allocator does not see them).
struct MemoryStats {
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
};
MemoryStats memory_stats();
void reset_peak_memory();

}  // namespace gptqkit::gpu
