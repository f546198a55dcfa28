// AVX-512 kernels (Skylake-SP / Ice Lake / Sapphire Rapids / Zen 4 and
// newer). Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma for
// this file alone and only run when the CPU (and OS) report AVX-512
// F/BW/VL/DQ (dispatch.cpp). The kernel code is kernels_simd.inl, shared
// with the AVX2 variant; this file supplies the vector traits. A panel row
// (16 columns) is one register, and the 32 registers allow 8 rows of x per
// pass over the weights.
//
// VNNI (vpdpbusd) and AVX512-BF16 (vdpbf16ps) are not used: VNNI multiplies
// int8 by uint8 and would need the activations quantized to int8, which
// changes the results beyond floating-point tolerance; vdpbf16ps would need
// the decoded weights re-packed into bf16 pairs, an extra shuffle per vector
// that costs more than the FMA it saves (the kernel is bound by decoding and
// memory, not by multiply throughput).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports the deliberately undefined pass-through operand of its own
// AVX-512 intrinsics (_mm512_undefined_ps) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "layout.h"

namespace gptqkit::cpu {
namespace {

struct V {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kChains = 8;
  static constexpr int kMaxRows = 8;
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline I load_words(const uint32_t* p) { return _mm512_load_si512(p); }
  static inline F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static inline I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static inline I set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static inline I srli(I a, int n) { return _mm512_srli_epi32(a, static_cast<unsigned>(n)); }
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static inline F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static inline F load_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

#include "kernels_simd.inl"

const KernelTable kTable = {"avx512", &gemm_panel, &dequant_panel};

}  // namespace

const KernelTable* avx512_kernels() { return &kTable; }

}  // namespace gptqkit::cpu
