// Portable C++ kernels over the prepared layout (layout.h): the fallback for
// CPUs without AVX2 and the only variant built on non-x86 targets. Written so
// that compilers can vectorize the 16-column inner loops with the baseline
// instruction set (SSE2 on x86-64, NEON on AArch64).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../half.h"
#include "layout.h"

namespace gptqkit::cpu {
namespace {

constexpr int codes_per_word(int bits) { return bits == 3 ? 10 : 32 / bits; }
constexpr int kMaxRows = 4;  // rows of x per pass over a panel

inline void load_meta(const Layout& L, int64_t panel, int64_t g, float* s, float* z) {
  const int64_t off = (panel * L.groups + g) * 2 * kPanel;
  if (L.half_meta) {
    const uint16_t* p = static_cast<const uint16_t*>(L.meta) + off;
    for (int c = 0; c < kPanel; ++c) {
      s[c] = fp16_to_float(p[c]);
      z[c] = fp16_to_float(p[kPanel + c]);
    }
  } else {
    const float* p = static_cast<const float*>(L.meta) + off;
    std::memcpy(s, p, kPanel * sizeof(float));
    std::memcpy(z, p + kPanel, kPanel * sizeof(float));
  }
}

// Code j of each word, times 2^(bits * j) (masked in place), or the plain
// top code for j = cpl - 1 when 32 % bits == 0. See PanelJob in layout.h.
template <int BITS>
inline void decode(const uint32_t* w, int j, float* v) {
  constexpr int kCpl = codes_per_word(BITS);
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  if (32 % BITS == 0 && j == kCpl - 1) {
    for (int c = 0; c < kPanel; ++c) v[c] = static_cast<float>(static_cast<int32_t>(w[c] >> (32 - BITS)));
  } else {
    const uint32_t mask = kMask << (BITS * j);
    for (int c = 0; c < kPanel; ++c) v[c] = static_cast<float>(static_cast<int32_t>(w[c] & mask));
  }
}

template <int BITS, int MB>
void gemm_rows(const PanelJob& job, int64_t m0) {
  constexpr int kCpl = codes_per_word(BITS);
  constexpr int64_t kFlushRows = 256 / kCpl;
  const Layout& L = *job.w;
  const uint32_t* qw = L.qw + job.panel * L.rows * kPanel;
  const float* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = job.xs + (m0 + i) * job.ldx;
  float res[MB][kPanel] = {};
  float acc[MB][kPanel];
  float v[kPanel], s[kPanel], z[kPanel];
  for (int64_t g = 0; g < L.groups; ++g) {
    const int64_t r0 = L.group_rows[g], r1 = L.group_rows[g + 1];
    if (r0 == r1) continue;
    load_meta(L, job.panel, g, s, z);
    for (int64_t rb = r0; rb < r1; rb += kFlushRows) {  // long groups in blocks of ~256 columns
      const int64_t re = std::min(r1, rb + kFlushRows);
      std::memset(acc, 0, sizeof acc);
      for (int64_t r = rb; r < re; ++r) {
        const uint32_t* w = qw + r * kPanel;
        for (int j = 0; j < kCpl; ++j) {
          decode<BITS>(w, j, v);
          for (int i = 0; i < MB; ++i) {
            const float xv = x[i][r * kCpl + j];
            for (int c = 0; c < kPanel; ++c) acc[i][c] += xv * v[c];
          }
        }
      }
      for (int i = 0; i < MB; ++i)
        for (int c = 0; c < kPanel; ++c) res[i][c] += s[c] * acc[i][c];
    }
    for (int i = 0; i < MB; ++i) {
      const float xg = job.xsum[(m0 + i) * job.ldsum + g];
      for (int c = 0; c < kPanel; ++c) res[i][c] -= (s[c] * z[c]) * xg;
    }
  }
  for (int i = 0; i < MB; ++i) std::memcpy(job.out + (m0 + i) * kPanel, res[i], sizeof res[i]);
}

template <int BITS>
void gemm_bits(const PanelJob& job) {
  int64_t m0 = 0;
  for (; m0 + kMaxRows <= job.m; m0 += kMaxRows) gemm_rows<BITS, kMaxRows>(job, m0);
  switch (job.m - m0) {
    case 1: gemm_rows<BITS, 1>(job, m0); break;
    case 2: gemm_rows<BITS, 2>(job, m0); break;
    case 3: gemm_rows<BITS, 3>(job, m0); break;
    default: break;
  }
}

void gemm_panel(const PanelJob& job) {
  switch (job.w->bits) {
    case 2: gemm_bits<2>(job); break;
    case 3: gemm_bits<3>(job); break;
    case 4: gemm_bits<4>(job); break;
    default: gemm_bits<8>(job); break;
  }
}

template <int BITS>
void dequant_bits(const DequantJob& job) {
  constexpr int kCpl = codes_per_word(BITS);
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const Layout& L = *job.w;
  const uint32_t* qw = L.qw + job.panel * L.rows * kPanel;
  float s[kPanel], z[kPanel];
  for (int64_t g = 0; g < L.groups; ++g) {
    const int64_t r0 = L.group_rows[g], r1 = L.group_rows[g + 1];
    if (r0 == r1) continue;
    load_meta(L, job.panel, g, s, z);
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* w = qw + r * kPanel;
      for (int j = 0; j < kCpl; ++j) {
        float* dst = job.tile + (r * kCpl + j) * job.ld;
        for (int c = 0; c < kPanel; ++c)
          dst[c] = s[c] * (static_cast<float>((w[c] >> (BITS * j)) & kMask) - z[c]);
      }
    }
  }
}

void dequant_panel(const DequantJob& job) {
  switch (job.w->bits) {
    case 2: dequant_bits<2>(job); break;
    case 3: dequant_bits<3>(job); break;
    case 4: dequant_bits<4>(job); break;
    default: dequant_bits<8>(job); break;
  }
}

const KernelTable kTable = {"generic", &gemm_panel, &dequant_panel};

}  // namespace

const KernelTable* generic_kernels() { return &kTable; }

}  // namespace gptqkit::cpu
