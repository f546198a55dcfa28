// The SIMD kernels over the prepared layout (layout.h), written once against
// a vector-traits type `V` and included by kernels_avx2.cpp and
// kernels_avx512.cpp, each compiled with its own instruction-set flags.
//
// The including file opens an anonymous namespace, defines `V` and then
// includes this file, so everything here has internal linkage: no symbol of
// one variant can be merged with (or replace) the other's at link time.
// For the same reason this file uses no standard-library functions.
//
// V provides: kLanes (floats per register), kChains (independent FMA chains
// the core needs to hide the FMA latency), kMaxRows (rows of x per pass),
// types F (float vector) and I (int vector), and the operations used below.
//
// The decoding trick (see PanelJob in layout.h): code j of a 32-bit word is
// turned into a float as cvt(word & (mask << bits*j)) = code * 2^(bits*j);
// the input was pre-scaled by 2^(-bits*j), so the product is exact. One AND
// and one conversion per 8 (AVX2) or 16 (AVX-512) weights; the top code of a
// word is a single shift instead. Zero points are not subtracted per weight:
// the kernel accumulates sum(x * code) per group and applies
// scale * acc - scale * zero * sum(x) once per group and column.

constexpr int kRegs = kPanel / V::kLanes;  // registers per panel row

constexpr int codes_per_word(int bits) { return bits == 3 ? 10 : 32 / bits; }

template <int BITS, int J>
inline typename V::F decode_scaled(typename V::I w) {
  constexpr int kCpl = codes_per_word(BITS);
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  if constexpr (32 % BITS == 0 && J == kCpl - 1) {
    return V::cvt(V::srli(w, 32 - BITS));
  } else {
    return V::cvt(V::and_(w, V::set1(kMask << (BITS * J))));
  }
}

template <int BITS, int J>
inline typename V::F decode_exact(typename V::I w) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  return V::cvt(V::and_(V::srli(w, BITS * J), V::set1(kMask)));
}

// Calls f(Int<0>), ..., f(Int<N-1>): compile-time unrolling without <utility>.
template <int N>
struct Int {
  static constexpr int value = N;
};
template <int I, int N, typename Fn>
inline void unroll(Fn& f) {
  if constexpr (I < N) {
    f(Int<I>{});
    unroll<I + 1, N>(f);
  }
}

template <bool HALF>
inline void load_meta(const Layout& L, int64_t panel, int64_t g, typename V::F* s, typename V::F* z) {
  const int64_t off = (panel * L.groups + g) * 2 * kPanel;
  if constexpr (HALF) {
    const uint16_t* p = static_cast<const uint16_t*>(L.meta) + off;
#pragma GCC unroll 4
    for (int q = 0; q < kRegs; ++q) {
      s[q] = V::load_half(p + q * V::kLanes);
      z[q] = V::load_half(p + kPanel + q * V::kLanes);
    }
  } else {
    const float* p = static_cast<const float*>(L.meta) + off;
#pragma GCC unroll 4
    for (int q = 0; q < kRegs; ++q) {
      s[q] = V::loadu(p + q * V::kLanes);
      z[q] = V::loadu(p + kPanel + q * V::kLanes);
    }
  }
}

// Rows [m0, m0 + MB) of the job.
template <int BITS, int MB, bool HALF>
void gemm_rows(const PanelJob& job, int64_t m0) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int kCpl = codes_per_word(BITS);
  constexpr int kSets0 = V::kChains / (MB * kRegs) > 0 ? V::kChains / (MB * kRegs) : 1;
  constexpr int kSets = kSets0 < kCpl ? kSets0 : kCpl;  // accumulator sets, code j feeds set j % kSets
  constexpr int64_t kFlushRows = 256 / kCpl;
  const Layout& L = *job.w;
  const uint32_t* qw = L.qw + job.panel * L.rows * kPanel;
  const int64_t total_rows = L.panels * L.rows;
  const float* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = job.xs + (m0 + i) * job.ldx;

  // Results live in job.out (L1) and are updated once per group, which
  // leaves the registers to the accumulators.
  float* out = job.out + m0 * kPanel;
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < kRegs; ++q) V::storeu(out + i * kPanel + q * V::kLanes, V::zero());

  for (int64_t g = 0; g < L.groups; ++g) {
    const int64_t r0 = L.group_rows[g], r1 = L.group_rows[g + 1];
    if (r0 == r1) continue;
    F s[kRegs], z[kRegs];
    load_meta<HALF>(L, job.panel, g, s, z);
    // Long groups (group_size -1, say) are summed in blocks of about 256
    // columns, each folded into the result on its own: the codes are all
    // positive, so one long float32 sum would lose more bits than needed.
    for (int64_t rb = r0; rb < r1; rb += kFlushRows) {
      const int64_t re = rb + kFlushRows < r1 ? rb + kFlushRows : r1;
      F acc[kSets][MB][kRegs];
#pragma GCC unroll 16
      for (int a = 0; a < kSets; ++a)
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
          for (int q = 0; q < kRegs; ++q) acc[a][i][q] = V::zero();

      for (int64_t r = rb; r < re; ++r) {
        // 4 KiB ahead in the weight stream (measured: cuts the M = 1 time from DRAM by
        // ~12 % on Zen 3). Panels are consecutive, so this runs on into the next one.
        if (job.panel * L.rows + r + 64 < total_rows) V::prefetch(qw + (r + 64) * kPanel);
        I w[kRegs];
#pragma GCC unroll 4
        for (int q = 0; q < kRegs; ++q) w[q] = V::load_words(qw + r * kPanel + q * V::kLanes);
        const int64_t base = r * kCpl;
        auto step = [&](auto jc) {
          constexpr int J = decltype(jc)::value;
          constexpr int A = J % kSets;
          F v[kRegs];
#pragma GCC unroll 4
          for (int q = 0; q < kRegs; ++q) v[q] = decode_scaled<BITS, J>(w[q]);
#pragma GCC unroll 16
          for (int i = 0; i < MB; ++i) {
            const F xb = V::bcast(x[i] + base + J);
#pragma GCC unroll 4
            for (int q = 0; q < kRegs; ++q) acc[A][i][q] = V::fma(xb, v[q], acc[A][i][q]);
          }
        };
        unroll<0, kCpl>(step);
      }

#pragma GCC unroll 16
      for (int a = 1; a < kSets; ++a)
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
          for (int q = 0; q < kRegs; ++q) acc[0][i][q] = V::add(acc[0][i][q], acc[a][i][q]);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
        for (int q = 0; q < kRegs; ++q) {
          float* o = out + i * kPanel + q * V::kLanes;
          V::storeu(o, V::fma(s[q], acc[0][i][q], V::loadu(o)));
        }
    }

#pragma GCC unroll 4
    for (int q = 0; q < kRegs; ++q) z[q] = V::mul(s[q], z[q]);  // scale * zero
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const F xg = V::bcast(job.xsum + (m0 + i) * job.ldsum + g);
#pragma GCC unroll 4
      for (int q = 0; q < kRegs; ++q) {
        float* o = out + i * kPanel + q * V::kLanes;
        V::storeu(o, V::fnma(z[q], xg, V::loadu(o)));
      }
    }
  }
}

template <int BITS, bool HALF, int MB>
inline void gemm_tail(const PanelJob& job, int64_t m0, int64_t left) {
  if constexpr (MB > 0) {
    if (left == MB) {
      gemm_rows<BITS, MB, HALF>(job, m0);
    } else {
      gemm_tail<BITS, HALF, MB - 1>(job, m0, left);
    }
  }
}

template <int BITS, bool HALF>
void gemm_bits(const PanelJob& job) {
  int64_t m0 = 0;
  for (; m0 + V::kMaxRows <= job.m; m0 += V::kMaxRows) gemm_rows<BITS, V::kMaxRows, HALF>(job, m0);
  if (m0 < job.m) gemm_tail<BITS, HALF, V::kMaxRows - 1>(job, m0, job.m - m0);
}

void gemm_panel(const PanelJob& job) {
  const bool half = job.w->half_meta;
  switch (job.w->bits) {
    case 2: half ? gemm_bits<2, true>(job) : gemm_bits<2, false>(job); break;
    case 3: half ? gemm_bits<3, true>(job) : gemm_bits<3, false>(job); break;
    case 4: half ? gemm_bits<4, true>(job) : gemm_bits<4, false>(job); break;
    default: half ? gemm_bits<8, true>(job) : gemm_bits<8, false>(job); break;
  }
}

template <int BITS, bool HALF>
void dequant_bits(const DequantJob& job) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int kCpl = codes_per_word(BITS);
  const Layout& L = *job.w;
  const uint32_t* qw = L.qw + job.panel * L.rows * kPanel;
  for (int64_t g = 0; g < L.groups; ++g) {
    const int64_t r0 = L.group_rows[g], r1 = L.group_rows[g + 1];
    if (r0 == r1) continue;
    F s[kRegs], z[kRegs];
    load_meta<HALF>(L, job.panel, g, s, z);
    for (int64_t r = r0; r < r1; ++r) {
      I w[kRegs];
#pragma GCC unroll 4
      for (int q = 0; q < kRegs; ++q) w[q] = V::load_words(qw + r * kPanel + q * V::kLanes);
      float* dst = job.tile + r * kCpl * job.ld;
      auto step = [&](auto jc) {
        constexpr int J = decltype(jc)::value;
#pragma GCC unroll 4
        for (int q = 0; q < kRegs; ++q)  // scale * (code - zero): the arithmetic of gptqkit::dequantize
          V::storeu(dst + J * job.ld + q * V::kLanes, V::mul(s[q], V::sub(decode_exact<BITS, J>(w[q]), z[q])));
      };
      unroll<0, kCpl>(step);
    }
  }
}

void dequant_panel(const DequantJob& job) {
  const bool half = job.w->half_meta;
  switch (job.w->bits) {
    case 2: half ? dequant_bits<2, true>(job) : dequant_bits<2, false>(job); break;
    case 3: half ? dequant_bits<3, true>(job) : dequant_bits<3, false>(job); break;
    case 4: half ? dequant_bits<4, true>(job) : dequant_bits<4, false>(job); break;
    default: half ? dequant_bits<8, true>(job) : dequant_bits<8, false>(job); break;
  }
}
