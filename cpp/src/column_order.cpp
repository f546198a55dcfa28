#include "column_order.h"

#include <algorithm>
#include <numeric>

namespace gptqkit {
namespace detail {

std::vector<int64_t> processing_order(const std::vector<double>& diag, const QuantizeOptions& o) {
  const int64_t k = static_cast<int64_t>(diag.size());
  std::vector<int64_t> perm(static_cast<size_t>(k));
  std::iota(perm.begin(), perm.end(), 0);
  auto by_diag = [&](int64_t a, int64_t b) { return diag[a] > diag[b]; };
  if (o.desc_act) {
    std::stable_sort(perm.begin(), perm.end(), by_diag);
  } else if (o.act_group_aware && o.group_size > 0) {
    const int64_t gs = o.group_size, full = k / gs;
    std::vector<int64_t> groups(static_cast<size_t>(full));
    std::vector<double> group_max(static_cast<size_t>(full));
    for (int64_t g = 0; g < full; ++g) {
      groups[g] = g;
      group_max[g] = *std::max_element(diag.begin() + g * gs, diag.begin() + (g + 1) * gs);
    }
    std::stable_sort(groups.begin(), groups.end(), [&](int64_t a, int64_t b) { return group_max[a] > group_max[b]; });
    int64_t pos = 0;
    for (int64_t g = 0; g <= full; ++g) {
      const int64_t src = g < full ? groups[g] : full;  // the partial group, if any, stays last
      const int64_t c0 = src * gs, c1 = std::min(k, c0 + gs);
      auto first = perm.begin() + pos;
      std::iota(first, first + (c1 - c0), c0);
      std::stable_sort(first, first + (c1 - c0), by_diag);
      pos += c1 - c0;
    }
  }
  return perm;
}

}  // namespace detail
}  // namespace gptqkit
