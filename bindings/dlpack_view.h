// Borrowing torch tensors / numpy arrays as gptqkit::TensorView via DLPack.
#pragma once

#include <pybind11/pybind11.h>

#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

namespace gptqkit::bindings {

// A TensorView over a Python array's memory. Holds the DLPack capsule, which
// owns the producer's reference, so the memory stays alive while this lives.
struct BorrowedTensor {
  pybind11::object capsule;
  TensorView view;
};

// Calls obj.__dlpack__() and describes the result. `name` appears in errors;
// `writable` rejects read-only exports (outputs).
BorrowedTensor borrow(const pybind11::handle& obj, const char* name, bool writable);

// The same for a DLPack capsule already obtained from the producer
// ("dltensor" or "dltensor_versioned"), which the result keeps alive.
BorrowedTensor borrow_capsule(pybind11::object capsule, const char* name, bool writable);

// Raises the Python exception matching a non-OK status.
void throw_if_error(const Status& status);

// Registers gptqkit._C.NotPositiveDefiniteError on the module.
void register_exceptions(pybind11::module_& m);

// borrow() with a fast path for plain torch tensors: torch.utils.dlpack.to_dlpack
// (the C function behind Tensor.__dlpack__) costs ~0.4 us per call instead of
// ~3 us, and a decoding step makes hundreds of layer calls with several
// arguments each. It never synchronises streams, which a captured CUDA graph
// needs. Tensors that require grad, subclasses and other arrays take borrow()
// (which raises the producer's own errors).
BorrowedTensor borrow_fast(const pybind11::handle& obj, const char* name, bool writable);

}  // namespace gptqkit::bindings
