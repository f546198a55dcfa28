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

}  // namespace gptqkit::bindings
