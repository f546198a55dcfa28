// The order in which the GPTQ sweep quantizes input columns.
#pragma once

#include <cstdint>
#include <vector>

#include "gptqkit/solver.h"

namespace gptqkit {
namespace detail {

// perm[j] = the original column quantized j-th, from diag(H) (dead inputs
// already at 1):
//   * natural: identity;
//   * desc_act: descending diag, ties by index (a stable sort);
//   * act_group_aware: groups of group_size columns stay whole; within a
//     group columns by descending diag, the full groups by descending
//     max diag of the group (ties by index), a last partial group last, so
//     every run of group_size positions is exactly one original group.
// The GPU solver's perm kernel computes the same order as rank counts.
std::vector<int64_t> processing_order(const std::vector<double>& diag, const QuantizeOptions& o);

// Index of the group whose grid the sweep stores at position `pos` (a
// multiple of group_size): with desc_act groups are runs of positions
// (g_idx follows the permutation); otherwise a run of positions is one
// original group, perm[pos] / group_size (pos / group_size in natural order).
inline int64_t group_at_position(const QuantizeOptions& o, const int64_t* perm, int64_t pos) {
  return (o.desc_act ? pos : perm[pos]) / o.group_size;
}

}  // namespace detail
}  // namespace gptqkit
