// A non-owning view of a dense array, the only way tensors enter the library.
//
// The core never sees torch or numpy objects: the bindings (or a native
// caller) describe memory they own with a TensorView. Strides are in
// elements, as in DLPack; the library validates dtype, rank, shape and
// contiguity of every view before touching its memory.
#pragma once

#include <cstdint>
#include <string>

namespace gptqkit {

enum class DType : uint8_t { kFloat32, kFloat64, kFloat16, kBFloat16, kInt32, kInt64, kUInt8, kInt8 };

enum class DeviceType : uint8_t { kCPU, kCUDA, kROCm };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
};

constexpr int kMaxTensorDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int ndim = 0;
  int64_t shape[kMaxTensorDims] = {0, 0, 0, 0};
  int64_t strides[kMaxTensorDims] = {0, 0, 0, 0};  // in elements
  Device device{};

  int64_t numel() const;
  bool is_contiguous() const;  // row-major (C order)
};

// Convenience constructors for native callers holding contiguous buffers.
TensorView make_view(void* data, DType dtype, int64_t rows, int64_t cols);
TensorView make_view(void* data, DType dtype, int64_t length);

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);
std::string shape_string(const TensorView& t);

}  // namespace gptqkit
