// Argument validation shared by every public entry point. Each check returns
// a Status whose message names the argument, so errors reach users as e.g.
// "hessian: expected shape [512, 512], got [512, 256]".
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

#define GPTQKIT_RETURN_IF_ERROR(expr)      \
  do {                                     \
    ::gptqkit::Status _gptqkit_s = (expr); \
    if (!_gptqkit_s.ok()) return _gptqkit_s; \
  } while (0)

namespace gptqkit::checks {

// Non-null data (unless empty), CPU device, C-contiguous, ndim in range.
Status cpu_contiguous(const TensorView& t, const char* name);
Status dtype_is(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
// Exact shape; -1 in `expected` matches any extent.
Status shape_is(const TensorView& t, const char* name, std::initializer_list<int64_t> expected);
Status ndim_is(const TensorView& t, const char* name, int ndim);
// Every element finite (float32/64, float16, bfloat16 views).
Status all_finite(const TensorView& t, const char* name);
Status bits_supported(int bits);

}  // namespace gptqkit::checks
