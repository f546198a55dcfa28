// Streaming accumulation of the GPTQ Hessian H = (2/n) * sum_i x_i x_i^T.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit {

enum class AccumulateType : uint8_t { kFloat32, kFloat64 };

// Accumulates H over batches of activations exactly as GPTQ's running
// formulation does: for a batch of b rows, H <- H * n/(n+b) + (2/(n+b)) X^T X
// and n <- n + b. Both steps happen inside one symmetric rank-k BLAS update
// (beta = n/(n+b), alpha = 2/(n+b)), which touches only one triangle and so
// costs half the flops of a general X^T X product.
class HessianAccumulator {
 public:
  // in_features: K, the width of every activation row.
  explicit HessianAccumulator(int64_t in_features, AccumulateType acc = AccumulateType::kFloat32);

  // x: [rows, K] or [batch, seq, K]; float32, float16 or bfloat16;
  // C-contiguous. Rows are activations of individual tokens; callers drop
  // padded tokens before calling. A batch with zero rows is a no-op.
  //
  // x on a GPU (builds with a GPU backend): the accumulator keeps H on that
  // device (float32 accumulation; allocated once, on the first batch) and
  // queues the update on `stream` (a cudaStream_t / hipStream_t; null = the
  // default stream) without synchronising; NaN / Inf inputs are then reported
  // by hessian(). One accumulator never mixes devices (InvalidArgument) until
  // reset(). Builds without a GPU backend return Unsupported for GPU input.
  // Each batch updates H in place: pass the same stream to every call of one
  // accumulator (Python passes torch's current stream), or order the streams
  // yourself; two streams in flight at once would race on H.
  Status add_batch(const TensorView& x, void* stream = nullptr);

  // Writes the full symmetric H into out: [K, K] float32 or float64,
  // contiguous, on the device the batches were added on.
  Status hessian(const TensorView& out, void* stream = nullptr) const;

  // Forgets all batches (a GPU buffer is kept for reuse on the same device).
  void reset();
  int64_t in_features() const { return k_; }
  int64_t n_samples() const { return n_; }
  AccumulateType accumulate_type() const { return acc_; }

 private:
  int64_t k_;
  int64_t n_ = 0;
  AccumulateType acc_;
  // Column-major upper triangle is valid (the BLAS syrk convention).
  std::vector<float> h32_;
  std::vector<double> h64_;
  std::vector<float> convert32_;   // scratch for 16-bit input
  std::vector<double> convert64_;  // scratch for float64 accumulation
  // GPU state (H and a deferred input check) when batches live on a GPU.
  struct DeviceBuffer;
  struct DeviceBufferDeleter {
    void operator()(DeviceBuffer* b) const;
  };
  Device device_{};  // device of the batches added since construction / reset
  std::unique_ptr<DeviceBuffer, DeviceBufferDeleter> gpu_;
};

}  // namespace gptqkit
