// The in-memory CPU layout of a prepared (repacked) GPTQ weight and the
// interface between the driver (cpu_gemm.cpp) and the kernel variants
// (kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
// docs/format.md, section "In-memory CPU layout", describes the layout.
//
// This header is included by translation units compiled with different
// instruction-set flags (-mavx2, -mavx512f, ...). It must therefore stay free
// of inline functions, templates and anything else the compiler may emit as a
// COMDAT (weak) symbol: the linker keeps one copy of such a symbol for the
// whole program, and the copy it keeps could be the AVX-512 one, which would
// then run on CPUs without AVX-512. Plain structs, constants and function
// declarations only.
#pragma once

#include <cstdint>

namespace gptqkit::cpu {

// Output columns per panel. One word row of a panel is 16 x 32 bits = 64
// bytes: one cache line, two AVX2 registers or one AVX-512 register.
constexpr int kPanel = 16;

// A prepared weight as the kernels see it.
//
// K is padded and reordered into "rows": each group g owns the word rows
// [group_rows[g], group_rows[g + 1]), each word row holds `cpl` codes of one
// column (cpl = 16, 10, 8, 4 for 2, 3, 4, 8 bits). Code j of a word (j < cpl)
// sits in bits [bits * j, bits * j + bits). Padding codes are 0 and are
// multiplied by a zero input.
struct Layout {
  int bits;
  int cpl;             // codes per 32-bit word
  int64_t n;           // N, out_features
  int64_t k;           // K, in_features
  int64_t groups;      // G
  int64_t rows;        // word rows per panel (sum over groups of ceil(count_g / cpl))
  int64_t panels;      // ceil(N / kPanel)
  const uint32_t* qw;        // [panels][rows][kPanel] codes, 64-byte aligned
  const int32_t* group_rows; // [groups + 1] word-row offsets of the groups
  // Per panel and group, kPanel scales then kPanel zero points (true zeros,
  // as floats). half_meta: IEEE fp16 (uint16), else fp32. Padding columns
  // have scale 0 and zero 0.
  const void* meta;          // [panels][groups][2][kPanel]
  bool half_meta;
};

// One call of the fused kernel: rows [0, m) of the prepared input times one
// panel, written to out[m][kPanel] (float32, no bias).
//
// xs is the input reordered into the row order of the layout and padded, then
// pre-scaled per position: xs[i][r * cpl + j] = x[i][k] * 2^(-bits * j), except
// that the top code of a word (j = cpl - 1 when 32 % bits == 0) is not
// scaled. The kernel decodes code j of a word as the integer
// (word & (mask << bits * j)), i.e. code * 2^(bits * j), with a single AND, and
// the pre-scaling undoes the factor exactly. The top code is decoded with a
// shift (word >> (32 - bits)). xsum[i][g] is the plain sum of x[i][k] over
// the columns k of group g.
//
// out[i][c] = sum_g scale[g][c] * (sum_{k in g} x[i][k] * code[k][c])
//             - scale[g][c] * zero[g][c] * xsum[i][g]
struct PanelJob {
  const Layout* w;
  int64_t panel;
  int64_t m;
  const float* xs;    // [m][ldx], ldx >= rows * cpl
  int64_t ldx;
  const float* xsum;  // [m][ldsum], ldsum >= groups
  int64_t ldsum;
  float* out;         // [m][kPanel]
};

// Dense float32 weights of one panel: tile[(r * cpl + j) * ld + c] =
// scale * (code - zero) for every layout position r * cpl + j and column c of
// the panel (the same arithmetic as gptqkit::dequantize, so the values are
// bit-identical to it). Used by the large-M path (dequantize + BLAS sgemm).
struct DequantJob {
  const Layout* w;
  int64_t panel;
  float* tile;
  int64_t ld;  // >= kPanel
};

struct KernelTable {
  const char* name;
  void (*gemm_panel)(const PanelJob& job);
  void (*dequant_panel)(const DequantJob& job);
};

// Defined by the variant translation units. The x86 ones exist only in x86
// builds (GPTQKIT_HAVE_X86_KERNELS; AVX-512 also needs GPTQKIT_HAVE_AVX512).
const KernelTable* generic_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();

}  // namespace gptqkit::cpu
