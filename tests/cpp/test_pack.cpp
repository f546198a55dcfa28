// Tests for packing, unpacking and dequantization (docs/format.md).
// Only the public API is used; the expected words come either from literal
// hand-checked values or from an independent bit-by-bit reference packer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace {

using gptqkit::DType;
using gptqkit::make_view;
using gptqkit::packed_words;
using gptqkit::Status;
using gptqkit::StatusCode;
using gptqkit::TensorView;
using gptqkit::ZeroFormat;

// Independent reference: value j's bit b is stream bit j*bits + b; stream bit
// p is bit p % 32 of word p / 32.
std::vector<uint32_t> reference_stream(const std::vector<uint32_t>& values, int bits) {
  std::vector<uint32_t> words((values.size() * bits + 31) / 32, 0u);
  for (size_t j = 0; j < values.size(); ++j)
    for (int b = 0; b < bits; ++b)
      if ((values[j] >> b) & 1u) {
        const size_t p = j * bits + b;
        words[p / 32] |= 1u << (p % 32);
      }
  return words;
}

// Reference qweight [W, N] for codes [N, K].
std::vector<int32_t> reference_qweight(const std::vector<uint8_t>& codes, int64_t n_dim, int64_t k_dim,
                                       int bits) {
  const int64_t w_dim = (k_dim * bits + 31) / 32;
  std::vector<int32_t> q(static_cast<size_t>(w_dim * n_dim));
  for (int64_t n = 0; n < n_dim; ++n) {
    std::vector<uint32_t> column(codes.begin() + n * k_dim, codes.begin() + (n + 1) * k_dim);
    const std::vector<uint32_t> words = reference_stream(column, bits);
    for (int64_t w = 0; w < w_dim; ++w) q[w * n_dim + n] = static_cast<int32_t>(words[w]);
  }
  return q;
}

std::vector<uint8_t> random_codes(int64_t n_dim, int64_t k_dim, int bits, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(0, (1 << bits) - 1);
  std::vector<uint8_t> codes(static_cast<size_t>(n_dim * k_dim));
  for (auto& c : codes) c = static_cast<uint8_t>(dist(rng));
  return codes;
}

int32_t word(uint32_t w) { return static_cast<int32_t>(w); }

bool message_has(const Status& s, const std::string& part) {
  return s.message().find(part) != std::string::npos;
}

#define EXPECT_INVALID(expr, part)                                                  \
  do {                                                                              \
    const Status _s = (expr);                                                       \
    EXPECT_EQ(_s.code(), StatusCode::kInvalidArgument) << _s.message();             \
    EXPECT_TRUE(message_has(_s, part)) << "message: \"" << _s.message()            \
                                       << "\" lacks \"" << (part) << "\"";        \
  } while (0)

// ---------------------------------------------------------------------------
// packed_words

TEST(PackedWords, CeilOfBitsOver32) {
  EXPECT_EQ(packed_words(0, 4), 0);
  EXPECT_EQ(packed_words(1, 4), 1);
  EXPECT_EQ(packed_words(8, 4), 1);
  EXPECT_EQ(packed_words(9, 4), 2);
  EXPECT_EQ(packed_words(4096, 4), 512);
  EXPECT_EQ(packed_words(16, 2), 1);
  EXPECT_EQ(packed_words(17, 2), 2);
  EXPECT_EQ(packed_words(4, 8), 1);
  EXPECT_EQ(packed_words(5, 8), 2);
  EXPECT_EQ(packed_words(10, 3), 1);  // 30 bits
  EXPECT_EQ(packed_words(11, 3), 2);  // 33 bits
  EXPECT_EQ(packed_words(32, 3), 3);  // 96 bits
  EXPECT_EQ(packed_words(4096, 3), 384);
  EXPECT_EQ(packed_words(-1, 4), -1);
  EXPECT_EQ(packed_words(8, 0), -1);
}

// ---------------------------------------------------------------------------
// Hand-checked worked examples (the ones in docs/format.md)

TEST(PackQweight, FourBitWorkedExample) {
  // K = 8, N = 2: column 0 holds codes 0..7, column 1 holds 8..15.
  std::vector<uint8_t> codes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  std::vector<int32_t> q(2, 0);
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 2, 8), 4,
                                    make_view(q.data(), DType::kInt32, 1, 2))
                  .ok());
  EXPECT_EQ(q[0], word(0x76543210u));
  EXPECT_EQ(q[1], word(0xFEDCBA98u));
}

TEST(PackQweight, FourBitPartialWordIsZeroPadded) {
  // K = 9: the second word holds code 8 in its low nibble, the rest is padding.
  std::vector<uint8_t> codes = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<int32_t> q(2, -1);
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 1, 9), 4,
                                    make_view(q.data(), DType::kInt32, 2, 1))
                  .ok());
  EXPECT_EQ(q[0], word(0x87654321u));
  EXPECT_EQ(q[1], word(0x00000009u));
}

TEST(PackQweight, TwoAndEightBitWorkedExamples) {
  std::vector<uint8_t> two(16);
  for (int k = 0; k < 16; ++k) two[k] = static_cast<uint8_t>(k % 4);  // 0,1,2,3 -> byte 0b11100100
  std::vector<int32_t> q2(1, 0);
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(two.data(), DType::kUInt8, 1, 16), 2,
                                    make_view(q2.data(), DType::kInt32, 1, 1))
                  .ok());
  EXPECT_EQ(q2[0], word(0xE4E4E4E4u));

  std::vector<uint8_t> eight = {0x01, 0x02, 0x03, 0xAB, 0xFF};
  std::vector<int32_t> q8(2, 0);
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(eight.data(), DType::kUInt8, 1, 5), 8,
                                    make_view(q8.data(), DType::kInt32, 2, 1))
                  .ok());
  EXPECT_EQ(q8[0], word(0xAB030201u));
  EXPECT_EQ(q8[1], word(0x000000FFu));
}

TEST(PackQweight, ThreeBitStraddlingValues) {
  // Only values 10 and 21 (the two that straddle word boundaries) are 7 = 0b111.
  // Value 10: bits 30-31 of word 0 and bit 0 of word 1.
  // Value 21: bit 31 of word 1 and bits 0-1 of word 2.
  std::vector<uint8_t> codes(32, 0);
  codes[10] = 7;
  codes[21] = 7;
  std::vector<int32_t> q(3, 0);
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 1, 32), 3,
                                    make_view(q.data(), DType::kInt32, 3, 1))
                  .ok());
  EXPECT_EQ(q[0], word(0xC0000000u));
  EXPECT_EQ(q[1], word(0x80000001u));
  EXPECT_EQ(q[2], word(0x00000003u));

  // Value 10 = 2 = 0b010: bit 0 -> word 0 bit 30 (0), bit 1 -> word 0 bit 31
  // (1), bit 2 -> word 1 bit 0 (0). Value 21 = 5 = 0b101: bit 0 -> word 1 bit
  // 31 (1), bits 1-2 -> word 2 bits 0-1 (0b10).
  codes.assign(32, 0);
  codes[10] = 2;
  codes[21] = 5;
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 1, 32), 3,
                                    make_view(q.data(), DType::kInt32, 3, 1))
                  .ok());
  EXPECT_EQ(q[0], word(0x80000000u));
  EXPECT_EQ(q[1], word(0x80000000u));
  EXPECT_EQ(q[2], word(0x00000002u));

  std::vector<uint8_t> back(32, 99);
  ASSERT_TRUE(gptqkit::unpack_qweight(make_view(q.data(), DType::kInt32, 3, 1), 3,
                                      make_view(back.data(), DType::kUInt8, 1, 32))
                  .ok());
  EXPECT_EQ(back, codes);
}

TEST(PackQweight, ThreeBitRepeatingPattern) {
  // codes k % 8: every 8 values form the 24-bit group 0xFAC688 (octal
  // 76543210), so the 96-bit stream is that group repeated four times.
  std::vector<uint8_t> codes(32);
  for (int k = 0; k < 32; ++k) codes[k] = static_cast<uint8_t>(k % 8);
  std::vector<int32_t> q(3, 0);
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 1, 32), 3,
                                    make_view(q.data(), DType::kInt32, 3, 1))
                  .ok());
  EXPECT_EQ(q[0], word(0x88FAC688u));
  EXPECT_EQ(q[1], word(0xC688FAC6u));
  EXPECT_EQ(q[2], word(0xFAC688FAu));
}

TEST(PackQweight, ThreeBitShortStreamSpillsIntoSecondWord) {
  // K = 11: 33 bits, two words; value 10 = 7 straddles into word 1 bit 0.
  std::vector<uint8_t> codes(11, 0);
  codes[10] = 7;
  std::vector<int32_t> q(2, -1);
  ASSERT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 1, 11), 3,
                                    make_view(q.data(), DType::kInt32, 2, 1))
                  .ok());
  EXPECT_EQ(q[0], word(0xC0000000u));
  EXPECT_EQ(q[1], word(0x00000001u));
}

// ---------------------------------------------------------------------------
// Round trips against the reference packer

struct Shape {
  int64_t n, k;
};

const Shape kShapes[] = {{1, 1}, {7, 13}, {33, 100}, {64, 96}, {5, 257}, {100, 33},
                         {3, 64}, {17, 31}, {40, 1000}, {2, 11}};

TEST(PackQweight, MatchesReferenceAndRoundTrips) {
  std::mt19937 rng(1234);
  for (int bits : {2, 3, 4, 8}) {
    for (const Shape& s : kShapes) {
      SCOPED_TRACE("bits=" + std::to_string(bits) + " N=" + std::to_string(s.n) + " K=" + std::to_string(s.k));
      const int64_t w_dim = packed_words(s.k, bits);
      const std::vector<uint8_t> codes = random_codes(s.n, s.k, bits, rng);
      std::vector<int32_t> q(static_cast<size_t>(w_dim * s.n), -1);  // garbage: padding must be written 0
      ASSERT_TRUE(gptqkit::pack_qweight(make_view(const_cast<uint8_t*>(codes.data()), DType::kUInt8, s.n, s.k),
                                        bits, make_view(q.data(), DType::kInt32, w_dim, s.n))
                      .ok());
      EXPECT_EQ(q, reference_qweight(codes, s.n, s.k, bits));
      std::vector<uint8_t> back(codes.size(), 0xEE);
      ASSERT_TRUE(gptqkit::unpack_qweight(make_view(q.data(), DType::kInt32, w_dim, s.n), bits,
                                          make_view(back.data(), DType::kUInt8, s.n, s.k))
                      .ok());
      EXPECT_EQ(back, codes);
    }
  }
}

TEST(PackQweight, EmptyShapesAreFine) {
  std::vector<int32_t> q(4, 0);
  std::vector<uint8_t> codes(4, 0);
  EXPECT_TRUE(gptqkit::pack_qweight(make_view(nullptr, DType::kUInt8, 0, 16), 4,
                                    make_view(nullptr, DType::kInt32, 2, 0))
                  .ok());
  EXPECT_TRUE(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 4, 0), 4,
                                    make_view(q.data(), DType::kInt32, 0, 4))
                  .ok());
  EXPECT_TRUE(gptqkit::unpack_qweight(make_view(q.data(), DType::kInt32, 0, 4), 3,
                                      make_view(codes.data(), DType::kUInt8, 4, 0))
                  .ok());
}

// ---------------------------------------------------------------------------
// Zero points

TEST(PackQzeros, V1StoresZeroMinusOne) {
  std::vector<int32_t> zeros(8, 8);  // 4-bit symmetric zero point (maxq + 1) / 2
  std::vector<int32_t> qz(1, 0);
  ASSERT_TRUE(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 1, 8), 4, ZeroFormat::kV1,
                                   make_view(qz.data(), DType::kInt32, 1, 1))
                  .ok());
  EXPECT_EQ(qz[0], word(0x77777777u));
  ASSERT_TRUE(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 1, 8), 4, ZeroFormat::kV2,
                                   make_view(qz.data(), DType::kInt32, 1, 1))
                  .ok());
  EXPECT_EQ(qz[0], word(0x88888888u));

  std::vector<int32_t> back(8, 0);
  ASSERT_TRUE(gptqkit::unpack_qzeros(make_view(qz.data(), DType::kInt32, 1, 1), 4, ZeroFormat::kV2,
                                     make_view(back.data(), DType::kInt32, 1, 8))
                  .ok());
  EXPECT_EQ(back, zeros);
  // The same word read as v1 means zero 9 everywhere.
  ASSERT_TRUE(gptqkit::unpack_qzeros(make_view(qz.data(), DType::kInt32, 1, 1), 4, ZeroFormat::kV1,
                                     make_view(back.data(), DType::kInt32, 1, 8))
                  .ok());
  EXPECT_EQ(back, std::vector<int32_t>(8, 9));
}

TEST(PackQzeros, V1AllOnesFieldDecodesAsTwoToTheBits) {
  std::vector<int32_t> qz = {word(0xFFFFFFFFu)};
  std::vector<int32_t> zeros(8, 0);
  ASSERT_TRUE(gptqkit::unpack_qzeros(make_view(qz.data(), DType::kInt32, 1, 1), 4, ZeroFormat::kV1,
                                     make_view(zeros.data(), DType::kInt32, 1, 8))
                  .ok());
  EXPECT_EQ(zeros, std::vector<int32_t>(8, 16));
  ASSERT_TRUE(gptqkit::unpack_qzeros(make_view(qz.data(), DType::kInt32, 1, 1), 4, ZeroFormat::kV2,
                                     make_view(zeros.data(), DType::kInt32, 1, 8))
                  .ok());
  EXPECT_EQ(zeros, std::vector<int32_t>(8, 15));
  // And v1 accepts a zero of 2^bits on the way in.
  std::vector<int32_t> sixteen(8, 16);
  std::vector<int32_t> packed(1, 0);
  ASSERT_TRUE(gptqkit::pack_qzeros(make_view(sixteen.data(), DType::kInt32, 1, 8), 4, ZeroFormat::kV1,
                                   make_view(packed.data(), DType::kInt32, 1, 1))
                  .ok());
  EXPECT_EQ(packed[0], word(0xFFFFFFFFu));
}

TEST(PackQzeros, ThreeBitWorkedExample) {
  // v2, 3-bit, N = 11: zeros n % 8 -> 33-bit stream, two words per row.
  std::vector<int32_t> zeros(11);
  for (int n = 0; n < 11; ++n) zeros[n] = n % 8;
  std::vector<int32_t> qz(2, -1);
  ASSERT_TRUE(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 1, 11), 3, ZeroFormat::kV2,
                                   make_view(qz.data(), DType::kInt32, 1, 2))
                  .ok());
  // values 0..7 -> 0xFAC688; values 8, 9 (= 0, 1) -> bits 24..29 = 0b001000;
  // value 10 (= 2 = 0b010) -> bit 30 = 0, bit 31 = 1, word 1 bit 0 = 0.
  EXPECT_EQ(qz[0], word(0x88FAC688u));
  EXPECT_EQ(qz[1], word(0x00000000u));
}

TEST(PackQzeros, MatchesReferenceAndRoundTrips) {
  std::mt19937 rng(99);
  const Shape kZeroShapes[] = {{1, 1}, {3, 13}, {2, 100}, {4, 257}, {1, 64}, {7, 33}};
  for (int bits : {2, 3, 4, 8}) {
    for (ZeroFormat format : {ZeroFormat::kV1, ZeroFormat::kV2}) {
      const int32_t offset = format == ZeroFormat::kV1 ? 1 : 0;
      std::uniform_int_distribution<int32_t> dist(offset, (1 << bits) - 1 + offset);
      for (const Shape& s : kZeroShapes) {
        const int64_t g_dim = s.n, n_dim = s.k;
        SCOPED_TRACE("bits=" + std::to_string(bits) + " v" + std::to_string(offset ? 1 : 2) +
                     " G=" + std::to_string(g_dim) + " N=" + std::to_string(n_dim));
        const int64_t w_dim = packed_words(n_dim, bits);
        std::vector<int32_t> zeros(static_cast<size_t>(g_dim * n_dim));
        for (auto& z : zeros) z = dist(rng);
        std::vector<int32_t> qz(static_cast<size_t>(g_dim * w_dim), -1);
        ASSERT_TRUE(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, g_dim, n_dim), bits, format,
                                         make_view(qz.data(), DType::kInt32, g_dim, w_dim))
                        .ok());
        for (int64_t g = 0; g < g_dim; ++g) {
          std::vector<uint32_t> fields(static_cast<size_t>(n_dim));
          for (int64_t n = 0; n < n_dim; ++n) fields[n] = static_cast<uint32_t>(zeros[g * n_dim + n] - offset);
          const std::vector<uint32_t> expected = reference_stream(fields, bits);
          for (int64_t w = 0; w < w_dim; ++w) EXPECT_EQ(qz[g * w_dim + w], word(expected[w])) << "g=" << g;
        }
        std::vector<int32_t> back(zeros.size(), -7);
        ASSERT_TRUE(gptqkit::unpack_qzeros(make_view(qz.data(), DType::kInt32, g_dim, w_dim), bits, format,
                                           make_view(back.data(), DType::kInt32, g_dim, n_dim))
                        .ok());
        EXPECT_EQ(back, zeros);
      }
    }
  }
}

TEST(PackQzeros, V1CannotStoreZeroOfZero) {
  std::vector<int32_t> zeros = {8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 0, 8, 8, 8, 8, 8};  // [2, 8], 0 at [1, 2]
  std::vector<int32_t> qz(2, 0);
  const Status s = gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 2, 8), 4, ZeroFormat::kV1,
                                        make_view(qz.data(), DType::kInt32, 2, 1));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(message_has(s, "g=1, n=2")) << s.message();
  EXPECT_TRUE(message_has(s, "v1")) << s.message();
  EXPECT_TRUE(message_has(s, "ZeroFormat::kV2")) << s.message();
  EXPECT_EQ(qz, std::vector<int32_t>(2, 0));  // nothing written
  // v2 stores it.
  EXPECT_TRUE(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 2, 8), 4, ZeroFormat::kV2,
                                   make_view(qz.data(), DType::kInt32, 2, 1))
                  .ok());
  EXPECT_EQ(qz[1], word(0x88888088u));
}

TEST(PackQzeros, RejectsZerosOutsideTheRange) {
  std::vector<int32_t> qz(1, 0);
  std::vector<int32_t> zeros(8, 3);
  zeros[5] = 16;  // fits v1 (field 15), not v2
  EXPECT_INVALID(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 1, 8), 4, ZeroFormat::kV2,
                                      make_view(qz.data(), DType::kInt32, 1, 1)),
                 "n=5");
  EXPECT_TRUE(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 1, 8), 4, ZeroFormat::kV1,
                                   make_view(qz.data(), DType::kInt32, 1, 1))
                  .ok());
  zeros[5] = 17;
  EXPECT_INVALID(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 1, 8), 4, ZeroFormat::kV1,
                                      make_view(qz.data(), DType::kInt32, 1, 1)),
                 "[1, 16]");
  zeros[5] = -1;
  EXPECT_INVALID(gptqkit::pack_qzeros(make_view(zeros.data(), DType::kInt32, 1, 8), 4, ZeroFormat::kV2,
                                      make_view(qz.data(), DType::kInt32, 1, 1)),
                 "[0, 15]");
}

// ---------------------------------------------------------------------------
// Dequantize

// A random fp16 scale (normal, positive or negative) as raw bits, and its
// exact value computed independently of the library.
uint16_t random_half(std::mt19937& rng) {
  const uint16_t sign = static_cast<uint16_t>(rng() & 1u) << 15;
  const uint16_t exponent = static_cast<uint16_t>(3 + rng() % 12);  // 2^-12 .. 2^-1
  const uint16_t mantissa = static_cast<uint16_t>(rng() & 0x3ffu);
  return static_cast<uint16_t>(sign | (exponent << 10) | mantissa);
}

float half_value(uint16_t h) {
  const float magnitude = std::ldexp(1.0f + static_cast<float>(h & 0x3ffu) / 1024.0f, ((h >> 10) & 0x1f) - 15);
  return (h & 0x8000u) ? -magnitude : magnitude;
}

struct Layer {
  int64_t n_dim = 0, k_dim = 0, g_dim = 0;
  int bits = 4;
  std::vector<uint8_t> codes;    // [N, K]
  std::vector<int32_t> zeros;    // [G, N]
  std::vector<float> scales;     // [G, N]
  std::vector<uint16_t> scales16;// [G, N]
  std::vector<int32_t> g_idx;    // [K]
  std::vector<int32_t> qweight;  // [W, N]
  std::vector<int32_t> qzeros;   // [G, Wz]
};

Layer make_layer(int64_t n_dim, int64_t k_dim, int bits, int64_t group_size, bool act_order, ZeroFormat format,
                 std::mt19937& rng) {
  Layer L;
  L.n_dim = n_dim;
  L.k_dim = k_dim;
  L.bits = bits;
  L.g_dim = group_size < 0 ? 1 : (k_dim + group_size - 1) / group_size;
  L.codes = random_codes(n_dim, k_dim, bits, rng);
  const int32_t offset = format == ZeroFormat::kV1 ? 1 : 0;
  std::uniform_int_distribution<int32_t> zdist(offset, (1 << bits) - 1 + offset);
  L.zeros.resize(static_cast<size_t>(L.g_dim * n_dim));
  for (auto& z : L.zeros) z = zdist(rng);
  L.scales16.resize(L.zeros.size());
  L.scales.resize(L.zeros.size());
  for (size_t i = 0; i < L.scales.size(); ++i) {
    L.scales16[i] = random_half(rng);
    L.scales[i] = half_value(L.scales16[i]);
  }
  // Act-order: columns processed in order perm; the i-th processed column
  // belongs to group i / group_size (as desc_act checkpoints record it).
  std::vector<int64_t> perm(static_cast<size_t>(k_dim));
  std::iota(perm.begin(), perm.end(), 0);
  if (act_order) std::shuffle(perm.begin(), perm.end(), rng);
  L.g_idx.resize(static_cast<size_t>(k_dim));
  for (int64_t i = 0; i < k_dim; ++i)
    L.g_idx[perm[i]] = group_size < 0 ? 0 : static_cast<int32_t>(i / group_size);

  const int64_t w_dim = packed_words(k_dim, bits), zw_dim = packed_words(n_dim, bits);
  L.qweight.assign(static_cast<size_t>(w_dim * n_dim), 0);
  L.qzeros.assign(static_cast<size_t>(L.g_dim * zw_dim), 0);
  EXPECT_TRUE(gptqkit::pack_qweight(make_view(L.codes.data(), DType::kUInt8, n_dim, k_dim), bits,
                                    make_view(L.qweight.data(), DType::kInt32, w_dim, n_dim))
                  .ok());
  EXPECT_TRUE(gptqkit::pack_qzeros(make_view(L.zeros.data(), DType::kInt32, L.g_dim, n_dim), bits, format,
                                   make_view(L.qzeros.data(), DType::kInt32, L.g_dim, zw_dim))
                  .ok());
  return L;
}

TensorView qweight_view(Layer& L) {
  return make_view(L.qweight.data(), DType::kInt32, packed_words(L.k_dim, L.bits), L.n_dim);
}
TensorView qzeros_view(Layer& L) {
  return make_view(L.qzeros.data(), DType::kInt32, L.g_dim, packed_words(L.n_dim, L.bits));
}
TensorView scales_view(Layer& L, bool half = false) {
  return half ? make_view(L.scales16.data(), DType::kFloat16, L.g_dim, L.n_dim)
              : make_view(L.scales.data(), DType::kFloat32, L.g_dim, L.n_dim);
}
TensorView g_idx_view(Layer& L) { return make_view(L.g_idx.data(), DType::kInt32, L.k_dim); }

// Straightforward reference, from the unpacked codes and zeros.
std::vector<float> reference_dequantize(const Layer& L) {
  std::vector<float> w(static_cast<size_t>(L.n_dim * L.k_dim));
  for (int64_t n = 0; n < L.n_dim; ++n)
    for (int64_t k = 0; k < L.k_dim; ++k) {
      const int64_t g = L.g_idx[k];
      const int diff = static_cast<int>(L.codes[n * L.k_dim + k]) - L.zeros[g * L.n_dim + n];
      w[n * L.k_dim + k] = L.scales[g * L.n_dim + n] * static_cast<float>(diff);
    }
  return w;
}

TEST(Dequantize, WorkedExample) {
  // 4-bit, one output row, K = 8, codes 0..7, zero 8 (v1 word 0x7), scale 0.5.
  std::vector<int32_t> qweight = {word(0x76543210u)};
  std::vector<int32_t> qzeros = {word(0x00000007u)};
  std::vector<float> scales = {0.5f};
  std::vector<int32_t> g_idx(8, 0);
  std::vector<float> w(8, 0.0f);
  ASSERT_TRUE(gptqkit::dequantize(make_view(qweight.data(), DType::kInt32, 1, 1),
                                  make_view(qzeros.data(), DType::kInt32, 1, 1),
                                  make_view(scales.data(), DType::kFloat32, 1, 1),
                                  make_view(g_idx.data(), DType::kInt32, 8), 4, ZeroFormat::kV1,
                                  make_view(w.data(), DType::kFloat32, 1, 8))
                  .ok());
  EXPECT_EQ(w, (std::vector<float>{-4.0f, -3.5f, -3.0f, -2.5f, -2.0f, -1.5f, -1.0f, -0.5f}));
}

TEST(Dequantize, MatchesReferenceLoop) {
  std::mt19937 rng(7);
  const Shape kDqShapes[] = {{1, 1}, {7, 13}, {13, 300}, {33, 100}, {5, 257}, {64, 96}, {40, 640}};
  for (int bits : {2, 3, 4, 8})
    for (const Shape& s : kDqShapes)
      for (int64_t group_size : {int64_t{-1}, int64_t{32}, int64_t{48}, int64_t{128}})
        for (bool act_order : {false, true})
          for (ZeroFormat format : {ZeroFormat::kV1, ZeroFormat::kV2})
            for (bool half : {false, true}) {
              SCOPED_TRACE("bits=" + std::to_string(bits) + " N=" + std::to_string(s.n) +
                           " K=" + std::to_string(s.k) + " group_size=" + std::to_string(group_size) +
                           " act_order=" + std::to_string(act_order) +
                           (format == ZeroFormat::kV1 ? " v1" : " v2") + (half ? " fp16" : " fp32"));
              Layer L = make_layer(s.n, s.k, bits, group_size, act_order, format, rng);
              std::vector<float> w(static_cast<size_t>(s.n * s.k), std::nanf(""));
              const Status st = gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L, half),
                                                    g_idx_view(L), bits, format,
                                                    make_view(w.data(), DType::kFloat32, s.n, s.k));
              ASSERT_TRUE(st.ok()) << st.message();
              const std::vector<float> expected = reference_dequantize(L);
              // Products of a float with a small integer: exact agreement.
              ASSERT_EQ(w, expected);
            }
}

TEST(Dequantize, LargerLayerUsesThreads) {
  std::mt19937 rng(3);
  Layer L = make_layer(300, 1024, 4, 128, true, ZeroFormat::kV2, rng);
  std::vector<float> w(static_cast<size_t>(300 * 1024), 0.0f);
  ASSERT_TRUE(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 4,
                                  ZeroFormat::kV2, make_view(w.data(), DType::kFloat32, 300, 1024))
                  .ok());
  EXPECT_EQ(w, reference_dequantize(L));
}

// ---------------------------------------------------------------------------
// Error paths

TEST(PackErrors, UnsupportedBits) {
  std::vector<uint8_t> codes(8, 0);
  std::vector<int32_t> q(8, 0), z(8, 1);
  std::vector<float> s(1, 1.0f), w(8, 0.0f);
  std::vector<int32_t> g(8, 0);
  for (int bits : {5, 0, 1, 6, 16, 32, -4}) {
    SCOPED_TRACE(bits);
    EXPECT_INVALID(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 1, 8), bits,
                                         make_view(q.data(), DType::kInt32, 1, 1)),
                   "bits");
    EXPECT_INVALID(gptqkit::unpack_qweight(make_view(q.data(), DType::kInt32, 1, 1), bits,
                                           make_view(codes.data(), DType::kUInt8, 1, 8)),
                   "bits");
    EXPECT_INVALID(gptqkit::pack_qzeros(make_view(z.data(), DType::kInt32, 1, 8), bits, ZeroFormat::kV1,
                                        make_view(q.data(), DType::kInt32, 1, 1)),
                   "bits");
    EXPECT_INVALID(gptqkit::unpack_qzeros(make_view(q.data(), DType::kInt32, 1, 1), bits, ZeroFormat::kV1,
                                          make_view(z.data(), DType::kInt32, 1, 8)),
                   "bits");
    EXPECT_INVALID(gptqkit::dequantize(make_view(q.data(), DType::kInt32, 1, 1),
                                       make_view(z.data(), DType::kInt32, 1, 1),
                                       make_view(s.data(), DType::kFloat32, 1, 1),
                                       make_view(g.data(), DType::kInt32, 8), bits, ZeroFormat::kV1,
                                       make_view(w.data(), DType::kFloat32, 1, 8)),
                   "bits");
  }
}

TEST(PackErrors, UnknownZeroFormat) {
  std::vector<int32_t> q(1, 0), z(8, 1);
  const auto bad = static_cast<ZeroFormat>(7);
  EXPECT_INVALID(gptqkit::pack_qzeros(make_view(z.data(), DType::kInt32, 1, 8), 4, bad,
                                      make_view(q.data(), DType::kInt32, 1, 1)),
                 "format");
  EXPECT_INVALID(gptqkit::unpack_qzeros(make_view(q.data(), DType::kInt32, 1, 1), 4, bad,
                                        make_view(z.data(), DType::kInt32, 1, 8)),
                 "format");
  std::mt19937 rng(1);
  Layer L = make_layer(8, 32, 4, 32, false, ZeroFormat::kV2, rng);
  std::vector<float> w(8 * 32);
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 4, bad,
                                     make_view(w.data(), DType::kFloat32, 8, 32)),
                 "format");
}

TEST(PackErrors, CodeTooLargeForBits) {
  for (int bits : {2, 3, 4}) {
    SCOPED_TRACE(bits);
    std::vector<uint8_t> codes(5 * 40, 0);
    codes[2 * 40 + 3] = static_cast<uint8_t>(1 << bits);  // first offender at (n=2, k=3)
    codes[4 * 40 + 0] = 255;
    const int64_t w_dim = packed_words(40, bits);
    std::vector<int32_t> q(static_cast<size_t>(w_dim * 5), 42);
    EXPECT_INVALID(gptqkit::pack_qweight(make_view(codes.data(), DType::kUInt8, 5, 40), bits,
                                         make_view(q.data(), DType::kInt32, w_dim, 5)),
                   "n=2, k=3");
    EXPECT_EQ(q, std::vector<int32_t>(q.size(), 42)) << "qweight written despite the error";
  }
}

TEST(PackErrors, WrongDtype) {
  std::vector<int32_t> buf(4096, 0);
  void* p = buf.data();
  EXPECT_INVALID(gptqkit::pack_qweight(make_view(p, DType::kInt32, 2, 8), 4, make_view(p, DType::kInt32, 1, 2)),
                 "codes");
  EXPECT_INVALID(gptqkit::pack_qweight(make_view(p, DType::kUInt8, 2, 8), 4, make_view(p, DType::kFloat32, 1, 2)),
                 "qweight");
  EXPECT_INVALID(gptqkit::unpack_qweight(make_view(p, DType::kInt64, 1, 2), 4, make_view(p, DType::kUInt8, 2, 8)),
                 "qweight");
  EXPECT_INVALID(gptqkit::unpack_qweight(make_view(p, DType::kInt32, 1, 2), 4, make_view(p, DType::kInt8, 2, 8)),
                 "codes");
  EXPECT_INVALID(gptqkit::pack_qzeros(make_view(p, DType::kInt64, 1, 8), 4, ZeroFormat::kV2,
                                      make_view(p, DType::kInt32, 1, 1)),
                 "zeros");
  EXPECT_INVALID(gptqkit::pack_qzeros(make_view(p, DType::kInt32, 1, 8), 4, ZeroFormat::kV2,
                                      make_view(p, DType::kUInt8, 1, 1)),
                 "qzeros");
  EXPECT_INVALID(gptqkit::unpack_qzeros(make_view(p, DType::kFloat32, 1, 1), 4, ZeroFormat::kV2,
                                        make_view(p, DType::kInt32, 1, 8)),
                 "qzeros");
  EXPECT_INVALID(gptqkit::unpack_qzeros(make_view(p, DType::kInt32, 1, 1), 4, ZeroFormat::kV2,
                                        make_view(p, DType::kFloat32, 1, 8)),
                 "zeros");

  std::mt19937 rng(5);
  Layer L = make_layer(8, 64, 4, 32, true, ZeroFormat::kV1, rng);
  std::vector<float> w(8 * 64);
  const TensorView wv = make_view(w.data(), DType::kFloat32, 8, 64);
  TensorView t = qweight_view(L);
  t.dtype = DType::kUInt8;
  EXPECT_INVALID(gptqkit::dequantize(t, qzeros_view(L), scales_view(L), g_idx_view(L), 4, ZeroFormat::kV1, wv),
                 "qweight: expected dtype int32");
  t = qzeros_view(L);
  t.dtype = DType::kInt64;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), t, scales_view(L), g_idx_view(L), 4, ZeroFormat::kV1, wv),
                 "qzeros");
  t = scales_view(L);
  t.dtype = DType::kFloat64;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), t, g_idx_view(L), 4, ZeroFormat::kV1, wv),
                 "scales");
  t.dtype = DType::kBFloat16;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), t, g_idx_view(L), 4, ZeroFormat::kV1, wv),
                 "scales");
  t = g_idx_view(L);
  t.dtype = DType::kInt64;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), t, 4, ZeroFormat::kV1, wv),
                 "g_idx");
  TensorView wbad = wv;
  wbad.dtype = DType::kFloat16;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 4,
                                     ZeroFormat::kV1, wbad),
                 "weight");
}

TEST(PackErrors, WrongShape) {
  std::vector<int32_t> buf(4096, 0);
  void* p = buf.data();
  // qweight rows must be packed_words(K, bits): K = 40 at 3 bits -> 4 rows.
  EXPECT_INVALID(gptqkit::pack_qweight(make_view(p, DType::kUInt8, 2, 40), 3, make_view(p, DType::kInt32, 5, 2)),
                 "qweight: expected shape [4, 2], got [5, 2]");
  EXPECT_INVALID(gptqkit::pack_qweight(make_view(p, DType::kUInt8, 2, 40), 3, make_view(p, DType::kInt32, 4, 3)),
                 "qweight");
  EXPECT_INVALID(gptqkit::unpack_qweight(make_view(p, DType::kInt32, 4, 2), 4, make_view(p, DType::kUInt8, 2, 40)),
                 "qweight: expected shape [5, 2]");
  EXPECT_INVALID(gptqkit::pack_qweight(make_view(p, DType::kUInt8, 80), 4, make_view(p, DType::kInt32, 10, 1)),
                 "codes");
  EXPECT_INVALID(gptqkit::pack_qzeros(make_view(p, DType::kInt32, 2, 9), 4, ZeroFormat::kV2,
                                      make_view(p, DType::kInt32, 2, 1)),
                 "qzeros: expected shape [2, 2]");
  EXPECT_INVALID(gptqkit::unpack_qzeros(make_view(p, DType::kInt32, 3, 1), 4, ZeroFormat::kV2,
                                        make_view(p, DType::kInt32, 2, 8)),
                 "qzeros: expected shape [2, 1]");

  std::mt19937 rng(11);
  Layer L = make_layer(8, 100, 3, 32, true, ZeroFormat::kV2, rng);  // G = 4
  std::vector<float> w(8 * 128);
  const TensorView wv = make_view(w.data(), DType::kFloat32, 8, 100);
  const auto F = ZeroFormat::kV2;
  TensorView t = qweight_view(L);
  t.shape[0] -= 1;
  EXPECT_INVALID(gptqkit::dequantize(t, qzeros_view(L), scales_view(L), g_idx_view(L), 3, F, wv), "qweight");
  // K comes from weight: [8, 107] needs packed_words(107, 3) = 11 qweight rows, the layer has 10.
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 3, F,
                                     make_view(w.data(), DType::kFloat32, 8, 107)),
                 "qweight: expected shape [11, 8]");
  t = qzeros_view(L);
  t.shape[0] = 3;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), t, scales_view(L), g_idx_view(L), 3, F, wv),
                 "qzeros: expected shape [4, 1]");
  t = scales_view(L);
  t.shape[1] = 7;
  t.strides[0] = 7;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), t, g_idx_view(L), 3, F, wv), "scales");
  t = g_idx_view(L);
  t.shape[0] = 99;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), t, 3, F, wv),
                 "g_idx: expected shape [100]");
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 3, F,
                                     make_view(w.data(), DType::kFloat32, 800)),
                 "weight");
}

TEST(PackErrors, GIdxOutOfRange) {
  std::mt19937 rng(13);
  Layer L = make_layer(8, 64, 4, 16, false, ZeroFormat::kV2, rng);  // G = 4
  std::vector<float> w(8 * 64, 1.0f);
  const TensorView wv = make_view(w.data(), DType::kFloat32, 8, 64);
  L.g_idx[5] = 4;
  L.g_idx[9] = -1;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 4,
                                     ZeroFormat::kV2, wv),
                 "g_idx[5] = 4");
  L.g_idx[5] = 0;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 4,
                                     ZeroFormat::kV2, wv),
                 "g_idx[9] = -1");
  EXPECT_EQ(w, std::vector<float>(w.size(), 1.0f)) << "weight written despite the error";
}

TEST(PackErrors, NonContiguousStrides) {
  std::vector<int32_t> buf(4096, 0);
  void* p = buf.data();
  TensorView codes_t = make_view(p, DType::kUInt8, 4, 8);
  codes_t.strides[0] = 1;  // a transposed [8, 4] array
  codes_t.strides[1] = 4;
  EXPECT_INVALID(gptqkit::pack_qweight(codes_t, 4, make_view(p, DType::kInt32, 1, 4)), "codes: expected a C-contiguous");
  TensorView q_padded = make_view(p, DType::kInt32, 2, 4);
  q_padded.strides[0] = 8;  // row pitch larger than the row
  EXPECT_INVALID(gptqkit::unpack_qweight(q_padded, 4, make_view(p, DType::kUInt8, 4, 16)),
                 "qweight: expected a C-contiguous");
  TensorView z_t = make_view(p, DType::kInt32, 2, 8);
  z_t.strides[0] = 1;
  z_t.strides[1] = 2;
  EXPECT_INVALID(gptqkit::pack_qzeros(z_t, 4, ZeroFormat::kV2, make_view(p, DType::kInt32, 2, 1)),
                 "zeros: expected a C-contiguous");

  std::mt19937 rng(17);
  Layer L = make_layer(8, 64, 4, 32, false, ZeroFormat::kV1, rng);
  std::vector<float> w(8 * 64 * 2);
  TensorView wv = make_view(w.data(), DType::kFloat32, 8, 64);
  wv.strides[0] = 128;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g_idx_view(L), 4,
                                     ZeroFormat::kV1, wv),
                 "weight: expected a C-contiguous");
  TensorView s = scales_view(L);
  s.strides[0] = 1;
  s.strides[1] = 2;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), s, g_idx_view(L), 4, ZeroFormat::kV1,
                                     make_view(w.data(), DType::kFloat32, 8, 64)),
                 "scales: expected a C-contiguous");
  TensorView g = g_idx_view(L);
  g.strides[0] = 2;
  g.shape[0] = 32;
  EXPECT_INVALID(gptqkit::dequantize(qweight_view(L), qzeros_view(L), scales_view(L), g, 4, ZeroFormat::kV1,
                                     make_view(w.data(), DType::kFloat32, 8, 64)),
                 "g_idx: expected a C-contiguous");
}

TEST(PackErrors, DeviceAndNullPointer) {
  std::vector<int32_t> buf(64, 0);
  TensorView codes = make_view(buf.data(), DType::kUInt8, 2, 8);
  codes.device.type = gptqkit::DeviceType::kCUDA;
  EXPECT_INVALID(gptqkit::pack_qweight(codes, 4, make_view(buf.data(), DType::kInt32, 1, 2)), "codes");
  EXPECT_INVALID(gptqkit::pack_qweight(make_view(buf.data(), DType::kUInt8, 2, 8), 4,
                                       make_view(nullptr, DType::kInt32, 1, 2)),
                 "qweight: null data pointer");
  std::mt19937 rng(19);
  Layer L = make_layer(8, 64, 4, 32, false, ZeroFormat::kV1, rng);
  std::vector<float> w(8 * 64);
  TensorView q = qweight_view(L);
  q.device.type = gptqkit::DeviceType::kCUDA;
  EXPECT_INVALID(gptqkit::dequantize(q, qzeros_view(L), scales_view(L), g_idx_view(L), 4, ZeroFormat::kV1,
                                     make_view(w.data(), DType::kFloat32, 8, 64)),
                 "qweight: expected a CPU tensor");
}

}  // namespace
