// Python bindings of the quantized linear layer op (gptqkit/linear.h).
#pragma once

#include <pybind11/pybind11.h>

namespace gptqkit::bindings {

// Defines _C.quantized_linear(x, qweight, qzeros, scales, g_idx, bias, bits, format, y).
void register_linear(pybind11::module_& m);

}  // namespace gptqkit::bindings
