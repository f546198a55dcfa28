// Fast CPU inference for GPTQ-packed linear layers:
//   y[M, N] = x[M, K] · dequant(W)ᵀ (+ bias)
// with the dequantization fused into the GEMM's inner loop.
//
// Usage: prepare each layer once, at load time, then call cpu_gemm per
// forward pass.
//
//   gptqkit::PreparedWeight w;
//   Status s = gptqkit::prepare_cpu_weight(qweight, qzeros, scales, g_idx, 4, ZeroFormat::kV1, &w);
//   ...
//   s = gptqkit::cpu_gemm(x, w, &bias, y);   // or nullptr for no bias
//
// prepare_cpu_weight repacks the checkpoint tensors (layout in
// docs/format.md, "GPTQ checkpoint format") into an in-memory layout the
// kernels stream through ("In-memory CPU layout" in the same document): about
// the size of the packed weight, never dense. act-order (g_idx) is resolved
// there too, by reordering the rows of K into group order once; each call
// then reorders x's columns, which is cheap.
//
// The kernel variant (AVX-512, AVX2/FMA, portable C++) is chosen once per
// process from the CPU's features; GPTQKIT_CPU_KERNEL=generic|avx2|avx512
// overrides it. Work is spread over GPTQKIT_NUM_THREADS threads (default:
// all hardware threads). For many rows (M >= 128 by default) cpu_gemm
// dequantizes tiles of the weight and multiplies them with BLAS sgemm,
// which is faster there.
#pragma once

#include <cstdint>
#include <memory>

#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit {

enum class CpuKernel : uint8_t {
  kAuto,     // the variant chosen at start-up (best for the CPU, or GPTQKIT_CPU_KERNEL)
  kGeneric,  // portable C++
  kAvx2,     // x86-64 AVX2 + FMA + F16C
  kAvx512,   // x86-64 AVX-512 F/BW/VL/DQ
};

// Name of the variant chosen at start-up: "avx512", "avx2" or "generic".
const char* cpu_kernel_name();
const char* cpu_kernel_name(CpuKernel kernel);
// Whether the variant is compiled into this library (x86 variants exist only
// in x86 builds), and whether it can run on this CPU.
bool cpu_kernel_built(CpuKernel kernel);
bool cpu_kernel_supported(CpuKernel kernel);

struct CpuGemmOptions;

// A GPTQ layer repacked for the CPU kernels. Move-only; empty until
// prepare_cpu_weight fills it. Immutable afterwards, so one prepared weight
// may serve concurrent cpu_gemm calls.
class PreparedWeight {
 public:
  PreparedWeight();
  ~PreparedWeight();
  PreparedWeight(PreparedWeight&&) noexcept;
  PreparedWeight& operator=(PreparedWeight&&) noexcept;
  PreparedWeight(const PreparedWeight&) = delete;
  PreparedWeight& operator=(const PreparedWeight&) = delete;

  bool empty() const;
  int64_t in_features() const;   // K
  int64_t out_features() const;  // N
  int bits() const;
  int64_t groups() const;        // G
  bool reordered() const;        // rows of K were reordered or padded (act-order, or groups not
                                 // aligned to the kernel's words): x is gathered per call
  int64_t size_bytes() const;    // memory held

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  friend Status prepare_cpu_weight(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                                   int, ZeroFormat, PreparedWeight*);
  friend Status cpu_gemm(const TensorView&, const PreparedWeight&, const TensorView*, const TensorView&,
                         const CpuGemmOptions&);
};

// Repacks one layer. Arguments as for gptqkit::dequantize (docs/format.md):
// qweight int32 [packed_words(K, bits), N], qzeros int32 [G, packed_words(N,
// bits)], scales float16/bfloat16/float32 [G, N], g_idx int32 [K] with
// values in [0, G). Every argument is checked before its memory is read; on
// error *out is left unchanged. The inputs are not referenced afterwards.
Status prepare_cpu_weight(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                          const TensorView& g_idx, int bits, ZeroFormat format, PreparedWeight* out);

struct CpuGemmOptions {
  // Kernel variant; kAuto is the one chosen at start-up. Naming a variant
  // this CPU cannot run returns Unsupported.
  CpuKernel kernel = CpuKernel::kAuto;
  // Rows of x from which dequantize + BLAS sgemm is used instead of the
  // fused kernel: -1 for the built-in crossover (128), 0 to always use BLAS,
  // a huge value to never use it.
  int64_t blas_min_rows = -1;
};

// y[M, N] = x[M, K] · Wᵀ (+ bias[N]). x float32/float16/bfloat16 [M, K]; y
// [M, N] in x's dtype (written, not accumulated); bias float32/float16/
// bfloat16 [N] or nullptr. All C-contiguous CPU arrays; y must not overlap
// x or bias. Accumulation is in float32.
Status cpu_gemm(const TensorView& x, const PreparedWeight& weight, const TensorView* bias, const TensorView& y,
                const CpuGemmOptions& options = CpuGemmOptions());

}  // namespace gptqkit
