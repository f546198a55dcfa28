// The software pipeline of the tensor-core kernels (the mma GEMM kernels and
// the tensor-core Hessian kernel): a ring of kStages shared-memory buffers
// filled by cp.async, kStages - 1 stages in flight ahead of the one being
// multiplied, one barrier per stage. sm_80+ only (inside
// GPTQKIT_NV_TENSOR_CORES, like the primitives it uses).
#pragma once

#ifndef GPTQKIT_GPU_EMULATION  // tests/gpu_emulation/emu_compat.h stands in for it on the CPU
#include "gpu_compat.h"
#endif

namespace gptqkit::gpu {

#if GPTQKIT_NV_TENSOR_CORES
// Runs stages 0 .. steps - 1: issue(s) starts the copies of stage s into
// buffer s % kStages (stages are issued in order, each exactly once);
// consume(s, s % kStages) reads that buffer once every thread's copies of
// stage s have landed. Every stage commits one cp.async group, empty ones
// too, so that wait_group<kStages - 2> always means "stage s is here"; the
// barrier before issuing stage s + kStages - 1 also guarantees that no
// thread still reads its buffer (the one of stage s - 1).
template <int kStages, typename Step, typename Issue, typename Consume>
__device__ __forceinline__ void run_cp_async_ring(Step steps, Issue&& issue, Consume&& consume) {
  static_assert(kStages >= 2, "a ring needs a buffer to fill while one is read");
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) issue(static_cast<Step>(s));
    cp_async_commit();
  }
  for (Step step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (step + kStages - 1 < steps) issue(step + kStages - 1);
    cp_async_commit();
    consume(step, static_cast<int>(step % kStages));
  }
  // Every group still pending is empty (nothing is issued past `steps`).
}
#endif

}  // namespace gptqkit::gpu
