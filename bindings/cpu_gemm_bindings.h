// Python bindings of the CPU GEMM (gptqkit/cpu_gemm.h).
#pragma once

#include <pybind11/pybind11.h>

namespace gptqkit::bindings {

// Defines _C.CpuPreparedWeight, _C.cpu_gemm, _C.cpu_kernel_name and
// _C.cpu_kernels_available.
void register_cpu_gemm(pybind11::module_& m);

}  // namespace gptqkit::bindings
