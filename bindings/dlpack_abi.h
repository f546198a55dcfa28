// The DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), declared
// from the specification: the binary layout every producer (PyTorch, NumPy,
// JAX, CuPy) exports through __dlpack__.
#pragma once

#include <cstdint>

namespace gptqkit::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kROCm = 10, kROCmHost = 11, kCUDAManaged = 13 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};
struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct ManagedTensor {  // capsule name "dltensor" (DLPack < 1.0)
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};
struct Version {
  uint32_t major;
  uint32_t minor;
};
constexpr uint64_t kFlagReadOnly = 1ull << 0;
struct ManagedTensorVersioned {  // capsule name "dltensor_versioned" (DLPack >= 1.0)
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;
  Tensor dl_tensor;
};

}  // namespace gptqkit::dlpack
