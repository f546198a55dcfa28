// _C.CpuPreparedWeight / _C.cpu_gemm: the fused low-bit CPU GEMM. A
// CpuPreparedWeight owns the repacked copy of one layer (made once, GIL
// released); cpu_gemm fills a caller-allocated y. gptqkit.nn.QuantLinear
// prepares lazily on its first CPU forward.
#include "cpu_gemm_bindings.h"

#include <memory>
#include <utility>
#include <optional>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "arguments.h"
#include "dlpack_view.h"
#include "gptqkit/cpu_gemm.h"

namespace py = pybind11;

namespace gptqkit::bindings {
namespace {

CpuKernel parse_kernel(const std::string& name) {
  if (name == "auto") return CpuKernel::kAuto;
  if (name == "generic") return CpuKernel::kGeneric;
  if (name == "avx2") return CpuKernel::kAvx2;
  if (name == "avx512") return CpuKernel::kAvx512;
  throw py::value_error("kernel: expected 'auto', 'generic', 'avx2' or 'avx512', got '" + name + "'");
}

struct PyPrepared {
  PreparedWeight weight;
};


}  // namespace

void register_cpu_gemm(py::module_& m) {
  py::class_<PyPrepared, std::shared_ptr<PyPrepared>>(m, "CpuPreparedWeight",
                                                        "A GPTQ layer repacked for the CPU kernels "
                                                        "(docs/format.md, 'In-memory CPU layout').")
      .def(py::init([](const py::handle& qweight, const py::handle& qzeros, const py::handle& scales,
                       const py::handle& g_idx, int bits, const std::string& format) {
             const ZeroFormat f = parse_zero_format(format);
             auto bq = borrow(qweight, "qweight", false);
             auto bz = borrow(qzeros, "qzeros", false);
             auto bs = borrow(scales, "scales", false);
             auto bg = borrow(g_idx, "g_idx", false);
             auto out = std::make_shared<PyPrepared>();
             Status s;
             {
               py::gil_scoped_release release;
               s = prepare_cpu_weight(bq.view, bz.view, bs.view, bg.view, bits, f, &out->weight);
             }
             throw_if_error(s);
             return out;
           }),
           py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bits"),
           py::arg("format"))
      .def_property_readonly("in_features", [](const PyPrepared& p) { return p.weight.in_features(); })
      .def_property_readonly("out_features", [](const PyPrepared& p) { return p.weight.out_features(); })
      .def_property_readonly("bits", [](const PyPrepared& p) { return p.weight.bits(); })
      .def_property_readonly("groups", [](const PyPrepared& p) { return p.weight.groups(); })
      .def_property_readonly("reordered", [](const PyPrepared& p) { return p.weight.reordered(); })
      .def_property_readonly("nbytes", [](const PyPrepared& p) { return p.weight.size_bytes(); })
      .def("__repr__", [](const PyPrepared& p) {
        return "CpuPreparedWeight(in_features=" + std::to_string(p.weight.in_features()) +
               ", out_features=" + std::to_string(p.weight.out_features()) + ", bits=" +
               std::to_string(p.weight.bits()) + ", groups=" + std::to_string(p.weight.groups()) +
               ", nbytes=" + std::to_string(p.weight.size_bytes()) + ")";
      });

  m.def(
      "cpu_gemm",
      [](const py::handle& x, const PyPrepared& weight, const py::object& bias, const py::handle& y,
         const std::string& kernel, int64_t blas_min_rows) {
        CpuGemmOptions options;
        options.kernel = parse_kernel(kernel);
        options.blas_min_rows = blas_min_rows;
        auto bx = borrow_fast(x, "x", false);
        std::optional<BorrowedTensor> bb;
        if (!bias.is_none()) bb = borrow_fast(bias, "bias", false);
        auto by = borrow_fast(y, "y", true);
        const TensorView* bias_view = bb ? &bb->view : nullptr;
        Status s;
        {
          py::gil_scoped_release release;
          s = cpu_gemm(bx.view, weight.weight, bias_view, by.view, options);
        }
        throw_if_error(s);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("kernel") = "auto",
      py::arg("blas_min_rows") = -1,
      "y[M, N] = x[M, K] @ W.T + bias with W a CpuPreparedWeight (bias may be None).\n"
      "x and y: float32, float16 or bfloat16 (same dtype). kernel: 'auto' (the variant chosen at import),\n"
      "'generic', 'avx2' or 'avx512' (for tests). blas_min_rows: rows from which dequantize + BLAS is used\n"
      "(-1: built-in crossover). Internal: use gptqkit.nn.QuantLinear.");

  m.def("cpu_kernel_name", [] { return std::string(cpu_kernel_name()); },
        "The CPU GEMM variant chosen at start-up: 'avx512', 'avx2' or 'generic' (GPTQKIT_CPU_KERNEL overrides).");
  m.def(
      "cpu_kernels_available",
      [] {
        std::vector<std::string> names;
        for (CpuKernel k : {CpuKernel::kGeneric, CpuKernel::kAvx2, CpuKernel::kAvx512})
          if (cpu_kernel_supported(k)) names.emplace_back(cpu_kernel_name(k));
        return names;
      },
      "Variants that are built into this library and that this CPU can run.");
  m.def(
      "cpu_kernels_built",
      [] {
        std::vector<std::string> names;
        for (CpuKernel k : {CpuKernel::kGeneric, CpuKernel::kAvx2, CpuKernel::kAvx512})
          if (cpu_kernel_built(k)) names.emplace_back(cpu_kernel_name(k));
        return names;
      },
      "Variants compiled into this library (some may need instructions this CPU lacks).");
}

}  // namespace gptqkit::bindings
