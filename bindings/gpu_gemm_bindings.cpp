// _C.gpu_*: the GPU GEMM. The layout buffers are torch tensors that
// gptqkit.nn.QuantLinear allocates (on the CPU, filled by
// prepare_gpu_weight, then moved to the GPU once at load time); the matmul
// fills a caller-allocated y on the stream given as an integer
// (torch.cuda.current_stream().cuda_stream). Internal: use gptqkit.ops.
#include "gpu_gemm_bindings.h"

#include <optional>
#include <string>
#include <utility>

#include "arguments.h"
#include "dlpack_view.h"
#include "gptqkit/gpu_gemm.h"

namespace py = pybind11;

namespace gptqkit::bindings {
namespace {

struct Prepared {
  BorrowedTensor qweight, sz, chunk_group;
  std::optional<BorrowedTensor> perm;
  GpuPreparedView view;
};

Prepared borrow_prepared(const py::handle& qweight, const py::handle& sz, const py::handle& chunk_group,
                         const py::object& perm, int bits, int64_t in_features, int64_t out_features,
                         bool writable) {
  Prepared p{borrow_fast(qweight, "qweight", writable), borrow_fast(sz, "sz", writable),
             borrow_fast(chunk_group, "chunk_group", writable), std::nullopt, {}};
  if (!perm.is_none()) p.perm = borrow_fast(perm, "perm", writable);
  p.view.qweight = p.qweight.view;
  p.view.sz = p.sz.view;
  p.view.chunk_group = p.chunk_group.view;
  if (p.perm) p.view.perm = p.perm->view;
  p.view.bits = bits;
  p.view.in_features = in_features;
  p.view.out_features = out_features;
  return p;
}

void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

}  // namespace

void register_gpu_gemm(py::module_& m) {
  m.def("gpu_backend", [] { return std::string(gpu_backend_name()); },
        "The GPU backend compiled into this build: 'cuda', 'hip' or 'none'.");

  m.def(
      "gpu_gemm_shape",
      [](const py::handle& g_idx, int64_t out_features, int64_t groups, int bits) {
        auto bg = borrow(g_idx, "g_idx", false);
        GpuGemmShape s;
        throw_if_error(gpu_gemm_shape(bg.view, out_features, groups, bits, &s));
        py::dict d;
        d["chunks"] = s.chunks;
        d["positions"] = s.positions;
        d["padded_out"] = s.padded_out;
        d["reordered"] = s.reordered;
        return d;
      },
      py::arg("g_idx"), py::arg("out_features"), py::arg("groups"), py::arg("bits"),
      "Extents of the GPU kernels' layout for a layer (g_idx: a CPU int32 array): a dict with chunks (C),\n"
      "positions (Kp = 32 C), padded_out (Np) and reordered (whether perm is needed).");

  m.def(
      "prepare_gpu_weight",
      [](const py::handle& qweight, const py::handle& qzeros, const py::handle& scales, const py::handle& g_idx,
         int bits, const std::string& format, const py::handle& out_qweight, const py::handle& out_sz,
         const py::handle& out_chunk_group, const py::object& out_perm, uintptr_t stream) {
        const ZeroFormat f = parse_zero_format(format);
        auto bq = borrow(qweight, "qweight", false);
        auto bz = borrow(qzeros, "qzeros", false);
        auto bs = borrow(scales, "scales", false);
        auto bg = borrow(g_idx, "g_idx", false);
        if (bg.view.ndim != 1 || bq.view.ndim != 2)
          throw py::value_error("g_idx and qweight: expected a 1-d and a 2-d array");
        Prepared out = borrow_prepared(out_qweight, out_sz, out_chunk_group, out_perm, bits, bg.view.shape[0],
                                       bq.view.shape[1], true);
        Status s;
        {
          py::gil_scoped_release release;
          s = prepare_gpu_weight(bq.view, bz.view, bs.view, bg.view, bits, f, out.view, as_stream(stream));
        }
        throw_if_error(s);
      },
      py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bits"),
      py::arg("format"), py::arg("out_qweight"), py::arg("out_sz"), py::arg("out_chunk_group"),
      py::arg("out_perm"), py::arg("stream") = 0,
      "Repacks a layer's checkpoint tensors (CPU arrays) into the GPU kernels' layout (out_*: CPU arrays, or\n"
      "GPU arrays in GPU builds). Load-time work.");

  m.attr("GPU_GEMV_MAX_ROWS") = py::int_(kGpuGemvMaxRows);  // rows up to which the GEMV kernel can run

  m.def(
      "gpu_matmul_workspace_bytes",
      [](const py::handle& x, const py::handle& qweight, const py::handle& sz, const py::handle& chunk_group,
         const py::object& perm, int bits, int64_t in_features, int64_t out_features) {
        Prepared w = borrow_prepared(qweight, sz, chunk_group, perm, bits, in_features, out_features, false);
        auto bx = borrow_fast(x, "x", false);
        size_t bytes = 0;
        throw_if_error(gpu_matmul_workspace_bytes(bx.view, w.view, &bytes));
        return bytes;
      },
      py::arg("x"), py::arg("qweight"), py::arg("sz"), py::arg("chunk_group"), py::arg("perm"), py::arg("bits"),
      py::arg("in_features"), py::arg("out_features"),
      "Bytes of device scratch gpu_quantized_matmul would use for this x (split-K partial sums, gathered x);\n"
      "0 when it needs none.");

  m.def(
      "gpu_matmul_kernel",
      [](const py::handle& x, const py::handle& qweight, const py::handle& sz, const py::handle& chunk_group,
         const py::object& perm, int bits, int64_t in_features, int64_t out_features, bool with_workspace) {
        Prepared w = borrow_prepared(qweight, sz, chunk_group, perm, bits, in_features, out_features, false);
        auto bx = borrow_fast(x, "x", false);
        const char* kernel = "";
        throw_if_error(gpu_matmul_kernel(bx.view, w.view, with_workspace, &kernel));
        return std::string(kernel);
      },
      py::arg("x"), py::arg("qweight"), py::arg("sz"), py::arg("chunk_group"), py::arg("perm"), py::arg("bits"),
      py::arg("in_features"), py::arg("out_features"), py::arg("with_workspace") = true,
      "The kernel gpu_quantized_matmul runs for this x: 'gemv', 'wgmma', 'mma' or 'tiled'.");

  m.def(
      "gpu_quantized_matmul",
      [](const py::handle& x, const py::handle& qweight, const py::handle& sz, const py::handle& chunk_group,
         const py::object& perm, const py::object& bias, const py::handle& y, int bits, int64_t in_features,
         int64_t out_features, uintptr_t stream, const py::object& workspace, const py::object& tile_counters) {
        Prepared w = borrow_prepared(qweight, sz, chunk_group, perm, bits, in_features, out_features, false);
        auto bx = borrow_fast(x, "x", false);
        std::optional<BorrowedTensor> bb, bws, bc;
        if (!bias.is_none()) bb = borrow_fast(bias, "bias", false);
        if (!workspace.is_none()) bws = borrow_fast(workspace, "workspace", true);
        if (!tile_counters.is_none()) bc = borrow_fast(tile_counters, "tile_counters", true);
        auto by = borrow_fast(y, "y", true);
        const TensorView* bias_view = bb ? &bb->view : nullptr;
        const TensorView* ws_view = bws ? &bws->view : nullptr;
        const TensorView* counters_view = bc ? &bc->view : nullptr;
        Status s;
        {
          py::gil_scoped_release release;
          s = gpu_quantized_matmul(bx.view, w.view, bias_view, by.view, ws_view, counters_view, as_stream(stream));
        }
        throw_if_error(s);
      },
      py::arg("x"), py::arg("qweight"), py::arg("sz"), py::arg("chunk_group"), py::arg("perm"), py::arg("bias"),
      py::arg("y"), py::arg("bits"), py::arg("in_features"), py::arg("out_features"), py::arg("stream") = 0,
      py::arg("workspace") = py::none(), py::arg("tile_counters") = py::none(),
      "y[M, N] = x[M, K] @ W.T (+ bias) on the GPU, enqueued on `stream` (an integer cudaStream_t/hipStream_t);\n"
      "workspace: a device buffer of gpu_matmul_workspace_bytes(...) bytes, or None; tile_counters: int32\n"
      "zeros that the call leaves zero (split-K sums added in the GEMM kernel, see\n"
      "GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS), or None. Internal: use gptqkit.ops.quantized_matmul.");

  m.def(
      "gpu_dequantize_prepared",
      [](const py::handle& qweight, const py::handle& sz, const py::handle& chunk_group, const py::object& perm,
         const py::handle& weight, int bits, int64_t in_features, int64_t out_features, uintptr_t stream,
         bool positions) {
        Prepared w = borrow_prepared(qweight, sz, chunk_group, perm, bits, in_features, out_features, false);
        auto bw = borrow_fast(weight, "weight", true);
        Status s;
        {
          py::gil_scoped_release release;
          s = positions ? gpu_dequantize_prepared_positions(w.view, bw.view, as_stream(stream))
                        : gpu_dequantize_prepared(w.view, bw.view, as_stream(stream));
        }
        throw_if_error(s);
      },
      py::arg("qweight"), py::arg("sz"), py::arg("chunk_group"), py::arg("perm"), py::arg("weight"),
      py::arg("bits"), py::arg("in_features"), py::arg("out_features"), py::arg("stream") = 0,
      py::arg("positions") = false,
      "weight[N, K] = the dense weight of a prepared layer, in the dtype of sz, enqueued on `stream`;\n"
      "positions=True: weight[N, Kp] in the layout's position order (gpu_dequantize_prepared_positions).");
}

}  // namespace gptqkit::bindings
