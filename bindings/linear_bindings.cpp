// _C.quantized_linear: y = x · dequant(W)ᵀ + bias on the CPU. The output y is
// allocated by the caller (gptqkit.nn.QuantLinear) in the dtype of x; arrays
// cross as DLPack views and the GIL is released while the core runs.
#include "linear_bindings.h"

#include <optional>
#include <string>

#include "arguments.h"
#include "dlpack_view.h"
#include "gptqkit/linear.h"

namespace py = pybind11;

namespace gptqkit::bindings {

void register_linear(py::module_& m) {
  m.def(
      "quantized_linear",
      [](const py::handle& x, const py::handle& qweight, const py::handle& qzeros, const py::handle& scales,
         const py::handle& g_idx, const py::object& bias, int bits, const std::string& format,
         const py::handle& y) {
        const ZeroFormat f = parse_zero_format(format);
        auto bx = borrow(x, "x", false);
        auto bq = borrow(qweight, "qweight", false);
        auto bz = borrow(qzeros, "qzeros", false);
        auto bs = borrow(scales, "scales", false);
        auto bg = borrow(g_idx, "g_idx", false);
        std::optional<BorrowedTensor> bb;
        if (!bias.is_none()) bb = borrow(bias, "bias", false);
        auto by = borrow(y, "y", true);
        const TensorView* bias_view = bb ? &bb->view : nullptr;
        Status s;
        {
          py::gil_scoped_release release;
          s = quantized_linear(bx.view, bq.view, bz.view, bs.view, bg.view, bias_view, bits, f, by.view);
        }
        throw_if_error(s);
      },
      py::arg("x"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bias"),
      py::arg("bits"), py::arg("format"), py::arg("y"),
      "y[M, N] = x[M, K] @ dequantize(qweight, qzeros, scales, g_idx).T + bias (bias may be None).\n"
      "x and y: float32, float16 or bfloat16 (same dtype); scales float16/float32/bfloat16 [G, N];\n"
      "format 'v1' or 'v2'. Internal: use gptqkit.nn.QuantLinear.");
}

}  // namespace gptqkit::bindings
