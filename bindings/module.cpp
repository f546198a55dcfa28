// gptqkit._C: the thin Python face of the C++ core. Arrays cross as DLPack
// views (no copies, no libtorch); outputs are allocated by the Python layer
// in the caller's array library and filled here; the GIL is released around
// every call into the core.
#include <cstdint>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dlpack_view.h"
#include "gptqkit/gptqkit.h"
#include "cpu_gemm_bindings.h"
#include "gpu_gemm_bindings.h"
#include "linear_bindings.h"

namespace py = pybind11;
using gptqkit::bindings::borrow;
using gptqkit::bindings::throw_if_error;

namespace {

// Runs a core call with the GIL released and turns its Status into an exception.
template <typename Call>
void call_core(Call&& call) {
  gptqkit::Status s;
  {
    py::gil_scoped_release release;
    s = call();
  }
  throw_if_error(s);
}

gptqkit::ZeroFormat zero_format(const std::string& name) {
  if (name == "v1") return gptqkit::ZeroFormat::kV1;
  if (name == "v2") return gptqkit::ZeroFormat::kV2;
  throw py::value_error("format: expected 'v1' (qzeros store zero - 1) or 'v2' (true zeros), got '" + name + "'");
}

py::dict stats_dict(const gptqkit::QuantizeStats& s) {
  py::dict d;
  d["loss"] = s.loss;
  d["damp_percent_used"] = s.damp_percent_used;
  d["damp_lambda"] = s.damp_lambda;
  d["damp_attempts"] = s.damp_attempts;
  d["dead_columns"] = s.dead_columns;
  return d;
}

class PyHessianAccumulator {
 public:
  PyHessianAccumulator(int64_t in_features, bool fp64)
      : acc_(in_features, fp64 ? gptqkit::AccumulateType::kFloat64 : gptqkit::AccumulateType::kFloat32) {
    if (in_features <= 0) throw py::value_error("in_features: must be positive, got " + std::to_string(in_features));
  }
  void add_batch(const py::handle& x, uintptr_t stream) {
    auto bx = borrow(x, "x", false);
    call_core([&] { return acc_.add_batch(bx.view, reinterpret_cast<void*>(stream)); });
  }
  void hessian(const py::handle& out, uintptr_t stream) const {
    auto bo = borrow(out, "out", true);
    call_core([&] { return acc_.hessian(bo.view, reinterpret_cast<void*>(stream)); });
  }
  void reset() { acc_.reset(); }
  int64_t n_samples() const { return acc_.n_samples(); }
  int64_t in_features() const { return acc_.in_features(); }
  bool fp64() const { return acc_.accumulate_type() == gptqkit::AccumulateType::kFloat64; }

 private:
  gptqkit::HessianAccumulator acc_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gptqkit native core (internal: use the gptqkit package API)";
  gptqkit::bindings::register_exceptions(m);
  gptqkit::bindings::register_linear(m);
  gptqkit::bindings::register_cpu_gemm(m);
  gptqkit::bindings::register_gpu_gemm(m);
  m.attr("__version__") = GPTQKIT_VERSION_STRING;
  m.attr("blas") = GPTQKIT_BLAS_NAME;

  py::class_<PyHessianAccumulator>(m, "HessianAccumulator")
      .def(py::init<int64_t, bool>(), py::arg("in_features"), py::arg("fp64") = false)
      .def("add_batch", &PyHessianAccumulator::add_batch, py::arg("x"), py::arg("stream") = 0)
      .def("hessian", &PyHessianAccumulator::hessian, py::arg("out"), py::arg("stream") = 0)
      .def("reset", &PyHessianAccumulator::reset)
      .def_property_readonly("n_samples", &PyHessianAccumulator::n_samples)
      .def_property_readonly("in_features", &PyHessianAccumulator::in_features)
      .def_property_readonly("fp64", &PyHessianAccumulator::fp64);

  m.def("num_groups", &gptqkit::num_groups, py::arg("in_features"), py::arg("group_size"));
  m.def(
      "gpu_solver_memory",
      [](bool reset_peak) {
        const gptqkit::GpuSolverMemory mem = gptqkit::gpu_solver_memory(reset_peak);
        py::dict d;
        d["current_bytes"] = mem.current_bytes;
        d["peak_bytes"] = mem.peak_bytes;
        return d;
      },
      py::arg("reset_peak") = false);
  m.def("packed_words", &gptqkit::packed_words, py::arg("count"), py::arg("bits"));

  m.def(
      "quantize_weight",
      [](const py::handle& weight, const py::handle& hessian, const py::handle& codes, const py::handle& scales,
         const py::handle& zeros, const py::handle& g_idx, const py::handle& perm, int bits, int64_t group_size,
         bool sym, bool desc_act, bool static_groups, double damp_percent, int64_t block_size,
         int max_damp_retries, int clip_steps, double clip_min_ratio, double clip_norm, bool clip_hessian_weighted,
         bool fp16_scales, int min_zero_point, bool act_group_aware, uintptr_t stream) {
        gptqkit::QuantizeOptions o;
        o.bits = bits;
        o.group_size = group_size;
        o.sym = sym;
        o.desc_act = desc_act;
        o.static_groups = static_groups;
        o.damp_percent = damp_percent;
        o.block_size = block_size;
        o.max_damp_retries = max_damp_retries;
        o.clip_steps = clip_steps;
        o.clip_min_ratio = clip_min_ratio;
        o.clip_norm = clip_norm;
        o.clip_hessian_weighted = clip_hessian_weighted;
        o.fp16_scales = fp16_scales;
        o.min_zero_point = min_zero_point;
        o.act_group_aware = act_group_aware;
        throw_if_error(gptqkit::validate_options(o));
        auto bw = borrow(weight, "weight", false);
        auto bh = borrow(hessian, "hessian", false);
        auto bc = borrow(codes, "codes", true);
        auto bs = borrow(scales, "scales", true);
        auto bz = borrow(zeros, "zeros", true);
        auto bg = borrow(g_idx, "g_idx", true);
        auto bp = borrow(perm, "perm", true);
        gptqkit::QuantizeOutputs out{bc.view, bs.view, bz.view, bg.view, bp.view};
        gptqkit::QuantizeStats stats;
        call_core([&] {
          return gptqkit::quantize_weight(bw.view, bh.view, o, out, &stats, reinterpret_cast<void*>(stream));
        });
        return stats_dict(stats);
      },
      py::arg("weight"), py::arg("hessian"), py::arg("codes"), py::arg("scales"), py::arg("zeros"),
      py::arg("g_idx"), py::arg("perm"), py::arg("bits"), py::arg("group_size"), py::arg("sym"),
      py::arg("desc_act"), py::arg("static_groups"), py::arg("damp_percent"), py::arg("block_size"),
      py::arg("max_damp_retries"), py::arg("clip_steps") = 0, py::arg("clip_min_ratio") = 0.75,
      py::arg("clip_norm") = 2.0, py::arg("clip_hessian_weighted") = true, py::arg("fp16_scales") = false, py::arg("min_zero_point") = 0,
      py::arg("act_group_aware") = false, py::arg("stream") = 0);

  m.def(
      "inverse_hessian_upper_factor",
      [](const py::handle& hessian, const py::handle& upper, double damp_percent, int max_retries, uintptr_t stream) {
        auto bh = borrow(hessian, "hessian", false);
        auto bu = borrow(upper, "upper", true);
        gptqkit::QuantizeStats stats;
        call_core([&] {
          return gptqkit::inverse_hessian_upper_factor(bh.view, damp_percent, max_retries, bu.view, &stats,
                                                       reinterpret_cast<void*>(stream));
        });
        return stats_dict(stats);
      },
      py::arg("hessian"), py::arg("upper"), py::arg("damp_percent"), py::arg("max_retries"), py::arg("stream") = 0);

  m.def(
      "pack_qweight",
      [](const py::handle& codes, int bits, const py::handle& qweight, uintptr_t stream) {
        auto bc = borrow(codes, "codes", false);
        auto bq = borrow(qweight, "qweight", true);
        call_core([&] { return gptqkit::pack_qweight(bc.view, bits, bq.view, reinterpret_cast<void*>(stream)); });
      },
      py::arg("codes"), py::arg("bits"), py::arg("qweight"), py::arg("stream") = 0);
  m.def(
      "unpack_qweight",
      [](const py::handle& qweight, int bits, const py::handle& codes) {
        auto bq = borrow(qweight, "qweight", false);
        auto bc = borrow(codes, "codes", true);
        call_core([&] { return gptqkit::unpack_qweight(bq.view, bits, bc.view); });
      },
      py::arg("qweight"), py::arg("bits"), py::arg("codes"));
  m.def(
      "pack_qzeros",
      [](const py::handle& zeros, int bits, const std::string& format, const py::handle& qzeros, uintptr_t stream) {
        const auto f = zero_format(format);
        auto bz = borrow(zeros, "zeros", false);
        auto bq = borrow(qzeros, "qzeros", true);
        call_core([&] { return gptqkit::pack_qzeros(bz.view, bits, f, bq.view, reinterpret_cast<void*>(stream)); });
      },
      py::arg("zeros"), py::arg("bits"), py::arg("format"), py::arg("qzeros"), py::arg("stream") = 0);
  m.def(
      "unpack_qzeros",
      [](const py::handle& qzeros, int bits, const std::string& format, const py::handle& zeros) {
        const auto f = zero_format(format);
        auto bq = borrow(qzeros, "qzeros", false);
        auto bz = borrow(zeros, "zeros", true);
        call_core([&] { return gptqkit::unpack_qzeros(bq.view, bits, f, bz.view); });
      },
      py::arg("qzeros"), py::arg("bits"), py::arg("format"), py::arg("zeros"));
  m.def(
      "dequantize",
      [](const py::handle& qweight, const py::handle& qzeros, const py::handle& scales, const py::handle& g_idx,
         int bits, const std::string& format, const py::handle& weight) {
        const auto f = zero_format(format);
        auto bq = borrow(qweight, "qweight", false);
        auto bz = borrow(qzeros, "qzeros", false);
        auto bs = borrow(scales, "scales", false);
        auto bg = borrow(g_idx, "g_idx", false);
        auto bw = borrow(weight, "weight", true);
        call_core([&] { return gptqkit::dequantize(bq.view, bz.view, bs.view, bg.view, bits, f, bw.view); });
      },
      py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bits"),
      py::arg("format"), py::arg("weight"));
}
