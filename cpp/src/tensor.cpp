#include "gptqkit/tensor.h"

#include <sstream>

namespace gptqkit {

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // nothing to address, strides are meaningless
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    // Extents of 1 (and empty arrays) place no constraint on their stride.
    if (shape[d] == 0) return true;
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

TensorView make_view(void* data, DType dtype, int64_t rows, int64_t cols) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = 2;
  t.shape[0] = rows;
  t.shape[1] = cols;
  t.strides[0] = cols;
  t.strides[1] = 1;
  return t;
}

TensorView make_view(void* data, DType dtype, int64_t length) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = 1;
  t.shape[0] = length;
  t.strides[0] = 1;
  return t;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
    case DType::kInt8: return "int8";
  }
  return "unknown";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: case DType::kInt64: return 8;
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kUInt8: case DType::kInt8: return 1;
  }
  return 0;
}

std::string shape_string(const TensorView& t) {
  std::ostringstream s;
  s << "[";
  for (int d = 0; d < t.ndim; ++d) s << (d ? ", " : "") << t.shape[d];
  s << "]";
  return s.str();
}

}  // namespace gptqkit
