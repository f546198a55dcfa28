// The min-max quantization grid of GPTQ (per output row, per group).
#pragma once

#include <cmath>
#include <cstdint>

namespace gptqkit {

struct Grid {
  float scale;
  int32_t zero;
};

// Grid for one row of weights x[0..count): the range always contains 0;
// symmetric grids are centred on zero point (maxq + 1) / 2; an all-zero row
// gets the range [-1, 1] so its scale is never 0.
Grid min_max_grid(const float* x, int64_t count, int maxq, bool sym);

struct GridSearch {
  int steps = 0;              // 0: plain min-max
  float min_ratio = 0.75f;    // smallest shrink factor tried
  float norm = 2.0f;          // error exponent
  bool fp16_scales = false;   // round the chosen scale to float16
  int min_zero = 0;           // asymmetric grids: smallest zero point allowed (0 or 1)
};

// min_max_grid, then (steps > 0) the shrunk range with the least weighted
// error sum_j weight[j] * |x_j - q_j|^norm (weight may be null: all 1).
Grid search_grid(const float* x, const float* weight, int64_t count, int maxq, bool sym, const GridSearch& search);

// Integer code of x on the grid: clamp(round_half_even(x / scale) + zero, 0, maxq).
// Why: the min-max grid of a row whose range is below float16's smallest
// subnormal would round to a zero scale; keep it representable instead.
float round_scale_fp16(float scale);

inline int32_t quantize_code(float x, const Grid& g, int maxq) {
  float q = std::nearbyint(x / g.scale) + static_cast<float>(g.zero);
  q = q < 0.0f ? 0.0f : (q > static_cast<float>(maxq) ? static_cast<float>(maxq) : q);
  return static_cast<int32_t>(q);
}

inline float dequantize_code(int32_t code, const Grid& g) {
  return g.scale * static_cast<float>(code - g.zero);
}

}  // namespace gptqkit
