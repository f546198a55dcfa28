#include "dlpack_view.h"

#include <string>
#include <utility>

#include "dlpack_abi.h"

namespace py = pybind11;

namespace gptqkit::bindings {
namespace {

PyObject* g_not_pd_error = nullptr;

bool to_dtype(const dlpack::DataType& t, DType* out) {
  if (t.lanes != 1) return false;
  switch (t.code) {
    case dlpack::kFloat:
      if (t.bits == 32) { *out = DType::kFloat32; return true; }
      if (t.bits == 64) { *out = DType::kFloat64; return true; }
      if (t.bits == 16) { *out = DType::kFloat16; return true; }
      return false;
    case dlpack::kBfloat:
      if (t.bits == 16) { *out = DType::kBFloat16; return true; }
      return false;
    case dlpack::kInt:
      if (t.bits == 32) { *out = DType::kInt32; return true; }
      if (t.bits == 64) { *out = DType::kInt64; return true; }
      if (t.bits == 8) { *out = DType::kInt8; return true; }
      return false;
    case dlpack::kUInt:
      if (t.bits == 8) { *out = DType::kUInt8; return true; }
      return false;
    default:
      return false;
  }
}

std::string describe(const dlpack::DataType& t) {
  static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const char* code = t.code < 7 ? codes[t.code] : "unknown";
  return std::string(code) + std::to_string(t.bits) + (t.lanes != 1 ? "x" + std::to_string(t.lanes) : "");
}

}  // namespace

BorrowedTensor borrow(const py::handle& obj, const char* name, bool writable) {
  if (!py::hasattr(obj, "__dlpack__"))
    throw py::type_error(std::string(name) + ": expected a torch.Tensor or numpy.ndarray (an object with "
                         "__dlpack__), got " + std::string(py::str(py::type::of(obj))));
  py::object capsule;
  try {
    capsule = obj.attr("__dlpack__")(py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;
    capsule = obj.attr("__dlpack__")();  // producer predates DLPack 1.0
  }
  return borrow_capsule(std::move(capsule), name, writable);
}

BorrowedTensor borrow_capsule(py::object capsule, const char* name, bool writable) {
  BorrowedTensor b;
  b.capsule = std::move(capsule);
  PyObject* cap = b.capsule.ptr();
  const dlpack::Tensor* t = nullptr;
  bool read_only = false;
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    if (m->version.major > 1)
      throw py::type_error(std::string(name) + ": unsupported DLPack major version " +
                           std::to_string(m->version.major));
    t = &m->dl_tensor;
    read_only = (m->flags & dlpack::kFlagReadOnly) != 0;
  } else if (PyCapsule_IsValid(cap, "dltensor")) {
    t = &static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"))->dl_tensor;
  } else {
    throw py::type_error(std::string(name) + ": __dlpack__ did not return a DLPack capsule");
  }
  if (writable && read_only)
    throw py::value_error(std::string(name) + ": the output array is read-only");
  if (t->ndim < 0 || t->ndim > kMaxTensorDims)
    throw py::value_error(std::string(name) + ": arrays of rank " + std::to_string(t->ndim) +
                          " are not supported (at most " + std::to_string(kMaxTensorDims) + ")");
  TensorView& v = b.view;
  if (!to_dtype(t->dtype, &v.dtype))
    throw py::value_error(std::string(name) + ": unsupported dtype " + describe(t->dtype));
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  v.ndim = t->ndim;
  int64_t compact = 1;
  for (int d = t->ndim - 1; d >= 0; --d) {
    v.shape[d] = t->shape[d];
    v.strides[d] = t->strides ? t->strides[d] : compact;
    compact *= t->shape[d];
  }
  switch (t->device.device_type) {
    case dlpack::kCPU: case dlpack::kCUDAHost: case dlpack::kROCmHost:
      v.device = {DeviceType::kCPU, 0}; break;
    case dlpack::kCUDA: case dlpack::kCUDAManaged:
      v.device = {DeviceType::kCUDA, t->device.device_id}; break;
    case dlpack::kROCm:
      v.device = {DeviceType::kROCm, t->device.device_id}; break;
    default:
      throw py::value_error(std::string(name) + ": unsupported device type " +
                            std::to_string(t->device.device_type));
  }
  return b;
}

void throw_if_error(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk: return;
    case StatusCode::kInvalidArgument: throw py::value_error(status.message());
    case StatusCode::kUnsupported:
      PyErr_SetString(PyExc_NotImplementedError, status.message().c_str());
      throw py::error_already_set();
    case StatusCode::kNotPositiveDefinite:
      PyErr_SetString(g_not_pd_error, status.message().c_str());
      throw py::error_already_set();
    case StatusCode::kInternal:
    default:
      throw std::runtime_error(status.message());
  }
}

void register_exceptions(py::module_& m) {
  // Created once per process and kept alive by the module attribute.
  g_not_pd_error = PyErr_NewExceptionWithDoc(
      "gptqkit._C.NotPositiveDefiniteError",
      "The Hessian is not positive definite even after the damping retries.", PyExc_RuntimeError, nullptr);
  if (!g_not_pd_error) throw py::error_already_set();
  m.attr("NotPositiveDefiniteError") = py::reinterpret_steal<py::object>(g_not_pd_error);
}

BorrowedTensor borrow_fast(const py::handle& obj, const char* name, bool writable) {
  static PyObject* tensor_type = nullptr;  // torch.Tensor, once torch is imported (never released)
  static PyObject* to_dlpack = nullptr;    // torch.utils.dlpack.to_dlpack
  if (tensor_type == nullptr) {
    PyObject* torch = PyImport_GetModule(py::str("torch").ptr());  // only if already imported
    if (torch != nullptr) {
      try {
        py::object t = py::reinterpret_steal<py::object>(torch);
        py::object fn = py::module_::import("torch.utils.dlpack").attr("to_dlpack");  // a new reference
        to_dlpack = fn.release().ptr();
        tensor_type = py::object(t.attr("Tensor")).release().ptr();
      } catch (py::error_already_set&) {
        to_dlpack = nullptr;
        tensor_type = nullptr;
      }
    } else if (PyErr_Occurred()) {
      PyErr_Clear();
    }
  }
  if (tensor_type != nullptr && reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr())) == tensor_type &&
      !obj.attr("requires_grad").cast<bool>()) {
    py::object capsule = py::reinterpret_borrow<py::object>(to_dlpack)(obj);
    return borrow_capsule(std::move(capsule), name, writable);
  }
  return borrow(obj, name, writable);
}

}  // namespace gptqkit::bindings
