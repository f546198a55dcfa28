// AVX2 + FMA + F16C kernels (Haswell / Zen and newer). Compiled with
// -mavx2 -mfma -mf16c for this file alone and only run when the CPU reports
// those features (dispatch.cpp). The kernel code is kernels_simd.inl; this
// file supplies the vector traits. A panel row (16 columns) is two registers.
#include <immintrin.h>

#include <cstdint>

#include "layout.h"

namespace gptqkit::cpu {
namespace {

struct V {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kChains = 8;   // FMA latency 4-5 x 2 ports
  static constexpr int kMaxRows = 4;  // 16 registers: 8 accumulators + 4 results + words/values
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline I load_words(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static inline I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static inline I set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static inline I srli(I a, int n) { return _mm256_srli_epi32(a, n); }
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static inline F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static inline void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static inline F load_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

#include "kernels_simd.inl"

const KernelTable kTable = {"avx2", &gemm_panel, &dequant_panel};

}  // namespace

const KernelTable* avx2_kernels() { return &kTable; }

}  // namespace gptqkit::cpu
