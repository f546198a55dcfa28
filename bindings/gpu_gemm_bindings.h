// Python bindings of the GPU GEMM (gptqkit/gpu_gemm.h).
#pragma once

#include <pybind11/pybind11.h>

namespace gptqkit::bindings {

// Defines _C.gpu_backend, _C.gpu_gemm_shape, _C.prepare_gpu_weight,
// _C.gpu_quantized_matmul and _C.gpu_dequantize_prepared.
void register_gpu_gemm(pybind11::module_& m);

}  // namespace gptqkit::bindings
