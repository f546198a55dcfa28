// Shared device helpers of the GEMM kernels (gemv, tiled, dequantize, mma, wgmma).
// The layout they read is described in docs/gpu_gemm.md:
//   qweight [C * BITS, Np] uint32: chunk c (32 positions of K, one group) of
//           column n is the GPTQ bit stream of its 32 codes, words
//           [c * BITS, c * BITS + BITS) of column n;
//   sz      [G, Np, 2] T: (scale, zero) per group and column;
//   chunk_group [C], perm [32 C] (or none: position p is column p).
#pragma once

#include <cstdint>
#include <string>

#ifndef GPTQKIT_GPU_EMULATION  // tests/gpu_emulation/emu_compat.h stands in for it on the CPU
#include "gpu_compat.h"
#endif
#include "gpu_gemm_api.h"
#include "gpu_util.h"

namespace gptqkit::gpu {

constexpr int kChunk = 32;

// Code j (0..31) of a chunk held in BITS words w[0..BITS). j is a
// compile-time constant after unrolling, so this folds to one shift and mask
// (two shifts and an OR for the two 3-bit codes that straddle words).
template <int BITS, int J>
__device__ __forceinline__ uint32_t chunk_code(const uint32_t* w) {
  constexpr int kBit = J * BITS;
  constexpr int kWord = kBit / 32;
  constexpr int kShift = kBit % 32;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  if constexpr (kShift + BITS <= 32) {
    return (w[kWord] >> kShift) & kMask;
  } else {
    return ((w[kWord] >> kShift) | (w[kWord + 1] << (32 - kShift))) & kMask;
  }
}

// The same with a run-time j (used where unrolling all 32 would bloat code).
template <int BITS>
__device__ __forceinline__ uint32_t chunk_code_rt(const uint32_t* w, int j) {
  const int bit = j * BITS;
  const int word = bit >> 5;
  const int shift = bit & 31;
  uint32_t v = w[word] >> shift;
  if (shift + BITS > 32) v |= w[word + 1] << (32 - shift);
  return v & ((1u << BITS) - 1u);
}

// Exact float of a code (< 2^23) without the slow int-to-float unit: OR it
// into the mantissa of 2^23 and subtract 2^23 later together with the zero
// point (bias_of_zero), so (magic(q) - bias) = q - zero exactly in fp32.
__device__ __forceinline__ float magic_code(uint32_t q) { return __uint_as_float(0x4B000000u | q); }
__device__ __forceinline__ float bias_of_zero(float zero) { return 8388608.0f + zero; }

// The magic number of the tensor-core kernels' 16-bit dequantization, twice
// (one per half of a 32-bit pair): 1024.0 in fp16, 128.0 in bf16. A code
// q < 16 OR-ed into its low mantissa bits is the value magic + q, exactly.
template <bool BF16>
constexpr uint32_t mma_magic2() {
  return BF16 ? 0x43004300u : 0x64006400u;
}

#if GPTQKIT_NV_TENSOR_CORES
// Component i (0..3, a constant after unrolling) of a 16-byte shared load.
__device__ __forceinline__ uint32_t uint4_part(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The register dequantization of the tensor-core kernels (mma, wgmma): the
// two codes of one byte of a packed word (code 2t in bits 0-3, code 2t+1 in
// bits 4-7 of byte t) to the 16-bit pair (scale (q_lo - zero), scale (q_hi -
// zero)), each rounded once, bit-identical to the oracle. Per column and
// chunk: `PairDecoder<BF16> decode(scale_zero)` from the column's (scale,
// zero) pair; per word: `decode(word, lane_byte)`, where lane_byte comes from
// lane_byte_selector(t).
//   fp16: PRMT puts byte t in both halves; one LOP3 keeps (q_lo, 16 q_hi)
//   under the magic 1024; one HFMA2 by (1, 1/16) minus (1024 + zero, 64 + zero)
//   gives both q - zero exactly; HMUL2 by the scale. Four instructions.
//   bf16: its 7-bit mantissa has no room for 16 q above 128, so the high
//   nibble is shifted down: (magic + q) - (magic + zero), then the scale.
__device__ __forceinline__ uint32_t lane_byte_selector(int byte) {
  return 0x4040u + 0x0101u * static_cast<uint32_t>(byte);  // PRMT: byte in bytes 0 and 2, zeros between
}

template <bool BF16>
struct PairDecoder {
  uint32_t scale2, bias2;
  __device__ __forceinline__ explicit PairDecoder(uint32_t scale_zero) {
    scale2 = __byte_perm(scale_zero, 0u, 0x1010u);  // (scale, scale)
    const uint32_t zero2 = __byte_perm(scale_zero, 0u, 0x3232u);
    if constexpr (BF16) {
      bias2 = hadd2_raw<true>(zero2, mma_magic2<true>());  // magic + zero, exact
    } else {
      bias2 = hsub2_raw<false>(0xD400E400u, zero2);  // (-1024 - zero, -64 - zero), exact: zero < 256
    }
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t word, uint32_t lane_byte) const {
    if constexpr (BF16) {
      const uint32_t codes = word >> (8 * (lane_byte & 3u));
      const uint32_t magic_q2 = (codes & 0xfu) | ((codes << 12) & 0xf0000u) | mma_magic2<true>();
      return hmul2_raw<true>(hsub2_raw<true>(magic_q2, bias2), scale2);
    } else {
      const uint32_t q2 = and_or_u32<0x00f0000fu, mma_magic2<false>()>(__byte_perm(word, 0u, lane_byte));
      return hmul2_raw<false>(hfma2_raw(q2, 0x2C003C00u /* (1, 1/16) */, bias2), scale2);
    }
  }
};
#endif  // GPTQKIT_NV_TENSOR_CORES

// The original column of position p, or -1 (padding). Out-of-range entries
// of a corrupt perm read as padding instead of reading outside x.
__device__ __forceinline__ int column_of(const int32_t* perm, int64_t p, int64_t k_dim) {
  if (perm == nullptr) return p < k_dim ? static_cast<int>(p) : -1;
  const int k = __ldg(perm + p);
  return (k >= 0 && k < k_dim) ? k : -1;
}

// The group of chunk c, clamped so a corrupt table cannot index outside sz.
__device__ __forceinline__ int group_of(const int32_t* chunk_group, int64_t c, int64_t groups) {
  const int g = __ldg(chunk_group + c);
  return (g >= 0 && g < groups) ? g : 0;
}

// Activations, scales and outputs are handled as raw 16-bit patterns
// (uint16_t) so that one kernel body serves fp16 and bf16 on both vendors
// and 128-bit vector loads can be split without type punning of class
// types. BF16 selects the interpretation.
template <bool BF16>
__device__ __forceinline__ float raw_to_float(uint32_t u16) {
  if constexpr (BF16) {
    return __uint_as_float(u16 << 16);  // bf16 is the top half of an fp32
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u16)));
  }
}

template <bool BF16>
__device__ __forceinline__ uint16_t float_to_raw(float f) {
  if constexpr (BF16) {  // round to nearest even, NaN kept quiet (as torch)
    const uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  } else {
    return static_cast<uint16_t>(__half_as_ushort(__float2half_rn(f)));
  }
}

// Low / high 16-bit half of a 32-bit word as float.
template <bool BF16>
__device__ __forceinline__ float lo_float(uint32_t w) { return raw_to_float<BF16>(w & 0xffffu); }
template <bool BF16>
__device__ __forceinline__ float hi_float(uint32_t w) { return raw_to_float<BF16>(w >> 16); }

// An output element: the fp32 sum (+ bias[n]) rounded once to the output
// type, as every GEMM kernel ends.
template <bool BF16>
__device__ __forceinline__ uint16_t output_value(float sum, const uint16_t* bias, int n) {
  if (bias != nullptr) sum += raw_to_float<BF16>(bias[n]);
  return float_to_raw<BF16>(sum);
}

// The message for a launch that failed (empty when it did not).
inline std::string launch_error(const char* what) {
  const gpuError_t e = gpuGetLastError();
  if (e == gpuSuccess) return std::string();
  return std::string(what) + ": " + gpuGetErrorString(e);
}

// Multiprocessor count of a device, asked once per device.
int multiprocessor_count(int device);

}  // namespace gptqkit::gpu
