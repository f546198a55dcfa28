// Damped Cholesky preparation of H^-1 for the column sweep (internal).
#pragma once

#include <cstdint>

#include "gptqkit/solver.h"

namespace gptqkit::detail {

// Reads H (float32 or float64, row-major K x K, symmetric) through an optional
// permutation `perm` (processing order; null = identity) with the diagonal of
// inputs flagged in `dead` (indexed by original column; null = none) set to 1,
// adds lambda = percent * mean(diag) and writes U (row-major float32 K x K),
// the upper Cholesky factor of (H + lambda I)^-1. When the factorization fails
// the damping grows 3x per attempt (bounded by max_retries and by 100 % of the
// mean diagonal, or the requested percentage if that is larger).
Status inverse_upper_factor(const void* hessian, bool hessian_is_fp64, int64_t k, const int64_t* perm,
                            const uint8_t* dead, double damp_percent, int max_retries, float* upper,
                            QuantizeStats* stats);

}  // namespace gptqkit::detail
