#include "quantizer.h"

#include <algorithm>
#include <cmath>

#include "half.h"

namespace gptqkit {
namespace {

// The range GPTQ's quantizer uses: always contains 0; symmetric ranges are
// mirrored; an all-zero row gets [-1, 1] so its scale is never 0.
void row_range(const float* x, int64_t count, bool sym, float* lo, float* hi) {
  float xmin = 0.0f, xmax = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    xmin = std::min(xmin, x[i]);
    xmax = std::max(xmax, x[i]);
  }
  if (sym) {
    xmax = std::max(-xmin, xmax);
    if (xmin < 0.0f) xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  *lo = xmin;
  *hi = xmax;
}

Grid grid_for_range(float xmin, float xmax, int maxq, bool sym, bool fp16_scales, int min_zero) {
  Grid g;
  g.scale = (xmax - xmin) / static_cast<float>(maxq);
  if (fp16_scales) g.scale = round_scale_fp16(g.scale);
  g.zero = sym ? (maxq + 1) / 2 : static_cast<int32_t>(std::nearbyint(-xmin / g.scale));
  if (!sym && g.zero < min_zero) {
    // Shift the grid up to the allowed zero and widen it to keep xmax and xmin.
    g.zero = min_zero;
    g.scale = std::max(xmax / static_cast<float>(maxq - min_zero), -xmin / static_cast<float>(min_zero));
    if (fp16_scales) g.scale = round_scale_fp16(g.scale);
  }
  g.zero = std::clamp(g.zero, 0, maxq);  // only a rounded scale can push it out
  return g;
}

double grid_error(const float* x, const float* weight, int64_t count, int maxq, const Grid& g, float norm) {
  double err = 0.0;
  for (int64_t j = 0; j < count; ++j) {
    const float d = std::fabs(dequantize_code(quantize_code(x[j], g, maxq), g) - x[j]);
    const float e = norm == 2.0f ? d * d : std::pow(d, norm);
    err += weight ? static_cast<double>(weight[j]) * e : static_cast<double>(e);
  }
  return err;
}

}  // namespace

float round_scale_fp16(float scale) {
  const float rounded = fp16_to_float(float_to_fp16(scale));
  return rounded > 0.0f ? rounded : fp16_to_float(1);  // smallest positive float16
}

Grid min_max_grid(const float* x, int64_t count, int maxq, bool sym) {
  float lo, hi;
  row_range(x, count, sym, &lo, &hi);
  return grid_for_range(lo, hi, maxq, sym, false, 0);
}

Grid search_grid(const float* x, const float* weight, int64_t count, int maxq, bool sym, const GridSearch& search) {
  float lo, hi;
  row_range(x, count, sym, &lo, &hi);
  Grid best = grid_for_range(lo, hi, maxq, sym, search.fp16_scales, search.min_zero);
  if (search.steps <= 0) return best;
  double best_err = grid_error(x, weight, count, maxq, best, search.norm);
  for (int i = 1; i <= search.steps; ++i) {
    const float p = 1.0f - (1.0f - search.min_ratio) * static_cast<float>(i) / static_cast<float>(search.steps);
    const Grid g = grid_for_range(p * lo, p * hi, maxq, sym, search.fp16_scales, search.min_zero);
    const double err = grid_error(x, weight, count, maxq, g, search.norm);
    if (err < best_err) {
      best_err = err;
      best = g;
    }
  }
  return best;
}

}  // namespace gptqkit
