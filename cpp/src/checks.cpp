#include "checks.h"

#include <sstream>

#include "half.h"

namespace gptqkit::checks {

Status cpu_contiguous(const TensorView& t, const char* name) {
  if (t.ndim < 0 || t.ndim > kMaxTensorDims)
    return Status::InvalidArgument(std::string(name) + ": unsupported rank " + std::to_string(t.ndim));
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] < 0)
      return Status::InvalidArgument(std::string(name) + ": negative extent in shape " + shape_string(t));
  if (t.device.type != DeviceType::kCPU)
    return Status::InvalidArgument(std::string(name) + ": expected a CPU tensor (this operation runs on the CPU)");
  if (t.numel() > 0 && t.data == nullptr)
    return Status::InvalidArgument(std::string(name) + ": null data pointer");
  if (!t.is_contiguous())
    return Status::InvalidArgument(std::string(name) + ": expected a C-contiguous (row-major) array, got shape " +
                                   shape_string(t) + " with non-contiguous strides; call .contiguous() first");
  return Status::Ok();
}

Status dtype_is(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  std::string list;
  for (DType d : allowed) {
    if (d == t.dtype) return Status::Ok();
    if (!list.empty()) list += ", ";
    list += dtype_name(d);
  }
  return Status::InvalidArgument(std::string(name) + ": expected dtype " + list + ", got " + dtype_name(t.dtype));
}

Status ndim_is(const TensorView& t, const char* name, int ndim) {
  if (t.ndim != ndim)
    return Status::InvalidArgument(std::string(name) + ": expected a " + std::to_string(ndim) +
                                   "-d array, got shape " + shape_string(t));
  return Status::Ok();
}

Status shape_is(const TensorView& t, const char* name, std::initializer_list<int64_t> expected) {
  bool match = t.ndim == static_cast<int>(expected.size());
  std::ostringstream want;
  want << "[";
  int d = 0;
  for (int64_t e : expected) {
    if (d) want << ", ";
    if (e < 0) want << "*"; else want << e;
    if (match && e >= 0 && t.shape[d] != e) match = false;
    ++d;
  }
  want << "]";
  if (!match)
    return Status::InvalidArgument(std::string(name) + ": expected shape " + want.str() + ", got " + shape_string(t));
  return Status::Ok();
}

Status all_finite(const TensorView& t, const char* name) {
  const int64_t n = t.numel();
  int64_t bad = -1;
  switch (t.dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(t.data);
      for (int64_t i = 0; i < n && bad < 0; ++i) if (!std::isfinite(p[i])) bad = i;
      break;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(t.data);
      for (int64_t i = 0; i < n && bad < 0; ++i) if (!std::isfinite(p[i])) bad = i;
      break;
    }
    case DType::kFloat16: {
      // exponent all ones = inf or nan
      const uint16_t* p = static_cast<const uint16_t*>(t.data);
      for (int64_t i = 0; i < n && bad < 0; ++i) if ((p[i] & 0x7c00u) == 0x7c00u) bad = i;
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(t.data);
      for (int64_t i = 0; i < n && bad < 0; ++i) if ((p[i] & 0x7f80u) == 0x7f80u) bad = i;
      break;
    }
    default:
      return Status::Ok();
  }
  if (bad >= 0)
    return Status::InvalidArgument(std::string(name) + ": contains NaN or Inf (first at flat index " +
                                   std::to_string(bad) + ")");
  return Status::Ok();
}

Status bits_supported(int bits) {
  if (bits == 2 || bits == 3 || bits == 4 || bits == 8) return Status::Ok();
  return Status::InvalidArgument("bits: expected 2, 3, 4 or 8, got " + std::to_string(bits));
}

}  // namespace gptqkit::checks
