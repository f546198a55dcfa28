#include "quantizer.h"

#include <algorithm>

namespace gptqkit {

Grid min_max_grid(const float* x, int64_t count, int maxq, bool sym) {
  float xmin = 0.0f, xmax = 0.0f;  // the range always includes 0
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
  Grid g;
  g.scale = (xmax - xmin) / static_cast<float>(maxq);
  g.zero = sym ? (maxq + 1) / 2 : static_cast<int32_t>(std::nearbyint(-xmin / g.scale));
  return g;
}

}  // namespace gptqkit
