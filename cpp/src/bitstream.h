// The GPTQ bit stream, 32 values at a time (internal). Values of BITS bits
// are packed LSB first as one continuous stream; 32 values fill exactly BITS
// int32 words, so a chunk of 32 values is the unit every packer, unpacker and
// kernel works in. docs/format.md specifies the layout.
#pragma once

#include <cstdint>

namespace gptqkit::bitstream {

constexpr int64_t kChunk = 32;  // values per chunk (= BITS words)

// 32 values of BITS bits -> BITS words.
template <int BITS>
inline void encode_chunk(const uint32_t* values, uint32_t* words) {
  if constexpr (32 % BITS == 0) {  // 2, 4, 8 bits: whole values per word
    constexpr int kPerWord = 32 / BITS;
    for (int w = 0; w < BITS; ++w) {
      uint32_t x = 0;
      for (int i = 0; i < kPerWord; ++i) x |= values[w * kPerWord + i] << (i * BITS);
      words[w] = x;
    }
  } else {  // 3 bits: values straddle words; write through a 64-bit window
    uint64_t acc = 0;
    int filled = 0;
    int out = 0;
    for (int i = 0; i < 32; ++i) {
      acc |= static_cast<uint64_t>(values[i]) << filled;
      filled += BITS;
      if (filled >= 32) {
        words[out++] = static_cast<uint32_t>(acc);
        acc >>= 32;
        filled -= 32;
      }
    }
  }
}

// BITS words -> 32 values of BITS bits (inverse of encode_chunk).
template <int BITS>
inline void decode_chunk(const uint32_t* words, uint32_t* values) {
  if constexpr (32 % BITS == 0) {  // 2, 4, 8 bits: no value straddles a word
    constexpr int kPerWord = 32 / BITS;
    constexpr uint32_t kMask = (1u << BITS) - 1u;
    for (int w = 0; w < BITS; ++w) {
      const uint32_t word = words[w];
      for (int i = 0; i < kPerWord; ++i) values[w * kPerWord + i] = (word >> (i * BITS)) & kMask;
    }
  } else {  // 3 bits: read through a 64-bit window
    constexpr uint64_t kMask = (uint64_t{1} << BITS) - 1u;
    uint64_t window = 0;
    int avail = 0;
    int next = 0;
    for (int i = 0; i < 32; ++i) {
      if (avail < BITS) {
        window |= static_cast<uint64_t>(words[next++]) << avail;
        avail += 32;
      }
      values[i] = static_cast<uint32_t>(window & kMask);
      window >>= BITS;
      avail -= BITS;
    }
  }
}

}  // namespace gptqkit::bitstream
