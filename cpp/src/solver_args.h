// Argument checks of quantize_weight shared by the CPU (solver.cpp) and GPU
// (cuda/src/gpu_solver.cu) paths, so that both accept the same calls and
// word their errors the same way. Host code only.
#pragma once

#include <cstdint>
#include <string>

#include "checks.h"
#include "gptqkit/solver.h"

namespace gptqkit::detail {

struct QuantizeShape {
  int64_t n = 0, k = 0, groups = 0;
};

// Every check but the size limits, which differ between the paths.
// placed(t, name) checks where a tensor lives and its layout (the CPU path:
// C-contiguous host memory; the GPU path: contiguous, on the weight's GPU).
template <typename Placed>
Status check_quantize_args(const TensorView& weight, const TensorView& hessian, const QuantizeOptions& o,
                           const QuantizeOutputs& out, Placed&& placed, QuantizeShape* shape) {
  GPTQKIT_RETURN_IF_ERROR(validate_options(o));
  GPTQKIT_RETURN_IF_ERROR(placed(weight, "weight"));
  GPTQKIT_RETURN_IF_ERROR(
      checks::dtype_is(weight, "weight", {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(weight, "weight", 2));
  const int64_t n = weight.shape[0], k = weight.shape[1];
  if (n <= 0 || k <= 0)
    return Status::InvalidArgument("weight: expected a non-empty [out_features, in_features] matrix, got " +
                                   shape_string(weight));
  GPTQKIT_RETURN_IF_ERROR(placed(hessian, "hessian"));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(hessian, "hessian", {DType::kFloat32, DType::kFloat64}));
  if (hessian.ndim != 2 || hessian.shape[0] != k || hessian.shape[1] != k)
    return Status::InvalidArgument("hessian: expected shape [" + std::to_string(k) + ", " + std::to_string(k) +
                                   "] to match weight " + shape_string(weight) + " (in_features = " +
                                   std::to_string(k) + "), got " + shape_string(hessian));
  const int64_t g = o.group_size > 0 ? num_groups(k, o.group_size) : 1;
  struct Output {
    const TensorView* t;
    const char* name;
    DType dtype;
    int64_t rows, cols;  // cols < 0: a vector
  };
  const Output outputs[] = {{&out.codes, "codes", DType::kUInt8, n, k},
                            {&out.scales, "scales", DType::kFloat32, g, n},
                            {&out.zeros, "zeros", DType::kInt32, g, n},
                            {&out.g_idx, "g_idx", DType::kInt32, k, -1},
                            {&out.perm, "perm", DType::kInt64, k, -1}};
  for (const Output& x : outputs) {
    GPTQKIT_RETURN_IF_ERROR(placed(*x.t, x.name));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(*x.t, x.name, {x.dtype}));
    if (x.cols < 0) GPTQKIT_RETURN_IF_ERROR(checks::shape_is(*x.t, x.name, {x.rows}));
    else GPTQKIT_RETURN_IF_ERROR(checks::shape_is(*x.t, x.name, {x.rows, x.cols}));
  }
  *shape = QuantizeShape{n, k, g};
  return Status::Ok();
}

}  // namespace gptqkit::detail
