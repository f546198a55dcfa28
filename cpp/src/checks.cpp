#include "checks.h"

#include <algorithm>
#include <cstring>
#include <sstream>

#include "gptqkit/gpu_gemm.h"
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

namespace {

// Index of the first element whose exponent bits are all ones (Inf or NaN),
// or -1. Why blocks of branch-free counting: an early-exit scalar loop does
// not vectorize, and this scan runs on every Hessian batch (a 512 x 576
// float32 batch took 0.3-0.6 ms that way, a quarter of the update itself).
template <typename Bits>
int64_t first_nonfinite(const void* data, int64_t n, Bits exponent_mask) {
  const unsigned char* bytes = static_cast<const unsigned char*>(data);
  const auto special = [&](int64_t i) {
    Bits v;  // memcpy: the buffer holds floats, read here as their bit patterns
    std::memcpy(&v, bytes + i * static_cast<int64_t>(sizeof(Bits)), sizeof(Bits));
    return (v & exponent_mask) == exponent_mask;
  };
  constexpr int64_t kBlock = 2048;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    int64_t hits = 0;
    for (int64_t i = b; i < e; ++i) hits += special(i);
    if (hits)
      for (int64_t i = b; i < e; ++i)
        if (special(i)) return i;
  }
  return -1;
}

}  // namespace

Status all_finite(const TensorView& t, const char* name) {
  const int64_t n = t.numel();
  int64_t bad = -1;
  switch (t.dtype) {
    case DType::kFloat32:
      bad = first_nonfinite<uint32_t>(t.data, n, 0x7f800000u);
      break;
    case DType::kFloat64:
      bad = first_nonfinite<uint64_t>(t.data, n, 0x7ff0000000000000ull);
      break;
    case DType::kFloat16:
      bad = first_nonfinite<uint16_t>(t.data, n, 0x7c00u);
      break;
    case DType::kBFloat16:
      bad = first_nonfinite<uint16_t>(t.data, n, 0x7f80u);
      break;
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

Status gpu_supported(const TensorView& t, const char* name) {
  const std::string backend = gpu_backend_name();
  if (!gpu_backend_available())
    return Status::Unsupported(std::string(name) + ": is on a GPU (" + device_string(t.device) +
                               "), but gptqkit was built without GPU support; reinstall with GPTQKIT_WITH_CUDA=1 "
                               "(NVIDIA) or GPTQKIT_WITH_HIP=1 (AMD ROCm) in the environment of `pip install` "
                               "(CMake: -DGPTQKIT_WITH_CUDA=ON / -DGPTQKIT_WITH_HIP=ON), or move the tensors to the CPU");
  if ((backend == "cuda" && t.device.type != DeviceType::kCUDA) ||
      (backend == "hip" && t.device.type != DeviceType::kROCm && t.device.type != DeviceType::kCUDA))
    return Status::Unsupported(std::string(name) + ": is on " + device_string(t.device) + ", but gptqkit was built for " +
                               backend);
  return Status::Ok();
}

std::string device_string(const Device& d) {
  switch (d.type) {
    case DeviceType::kCPU: return "cpu";
    case DeviceType::kCUDA: return "cuda:" + std::to_string(d.index);
    case DeviceType::kROCm: return "rocm:" + std::to_string(d.index);
  }
  return "unknown";
}

Status with_reason(Status s, const std::string& why) {
  return s.ok() ? s : Status::InvalidArgument(s.message() + " (" + why + ")");
}

bool overlaps(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = static_cast<const char*>(a.data);
  const char* a1 = a0 + a.numel() * static_cast<int64_t>(dtype_size(a.dtype));
  const char* b0 = static_cast<const char*>(b.data);
  const char* b1 = b0 + b.numel() * static_cast<int64_t>(dtype_size(b.dtype));
  return a0 < b1 && b0 < a1;
}

Status packed_layer(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                    const TensorView& g_idx, int bits, ZeroFormat format,
                    std::initializer_list<DType> scale_dtypes) {
  GPTQKIT_RETURN_IF_ERROR(bits_supported(bits));
  if (format != ZeroFormat::kV1 && format != ZeroFormat::kV2)
    return Status::InvalidArgument("format: expected ZeroFormat::kV1 or ZeroFormat::kV2, got value " +
                                   std::to_string(static_cast<int>(format)));
  // Each tensor on its own: device, contiguity, dtype, rank.
  GPTQKIT_RETURN_IF_ERROR(cpu_contiguous(qweight, "qweight"));
  GPTQKIT_RETURN_IF_ERROR(dtype_is(qweight, "qweight", {DType::kInt32}));
  GPTQKIT_RETURN_IF_ERROR(ndim_is(qweight, "qweight", 2));
  GPTQKIT_RETURN_IF_ERROR(cpu_contiguous(qzeros, "qzeros"));
  GPTQKIT_RETURN_IF_ERROR(dtype_is(qzeros, "qzeros", {DType::kInt32}));
  GPTQKIT_RETURN_IF_ERROR(ndim_is(qzeros, "qzeros", 2));
  GPTQKIT_RETURN_IF_ERROR(cpu_contiguous(scales, "scales"));
  GPTQKIT_RETURN_IF_ERROR(dtype_is(scales, "scales", scale_dtypes));
  GPTQKIT_RETURN_IF_ERROR(ndim_is(scales, "scales", 2));
  GPTQKIT_RETURN_IF_ERROR(cpu_contiguous(g_idx, "g_idx"));
  GPTQKIT_RETURN_IF_ERROR(dtype_is(g_idx, "g_idx", {DType::kInt32}));
  GPTQKIT_RETURN_IF_ERROR(ndim_is(g_idx, "g_idx", 1));

  // Extents: K from g_idx, N from qweight, G from scales.
  const int64_t k_dim = g_idx.shape[0];
  const int64_t n_dim = qweight.shape[1];
  const int64_t g_dim = scales.shape[0];
  const std::string dims =
      "K = g_idx.shape[0] = " + std::to_string(k_dim) + ", N = qweight.shape[1] = " + std::to_string(n_dim);
  GPTQKIT_RETURN_IF_ERROR(with_reason(shape_is(qweight, "qweight", {packed_words(k_dim, bits), n_dim}),
                                      "[packed_words(K, " + std::to_string(bits) + "), N] with " + dims));
  GPTQKIT_RETURN_IF_ERROR(with_reason(shape_is(scales, "scales", {-1, n_dim}), "[G, N] with " + dims));
  GPTQKIT_RETURN_IF_ERROR(with_reason(
      shape_is(qzeros, "qzeros", {g_dim, packed_words(n_dim, bits)}),
      "[G, packed_words(N, " + std::to_string(bits) + ")] with G = scales.shape[0] = " + std::to_string(g_dim) +
          ", " + dims));
  if (g_dim == 0 && k_dim > 0)
    return Status::InvalidArgument("scales: expected at least one group (G = scales.shape[0] = 0 with K = " +
                                   std::to_string(k_dim) + ")");
  const int32_t* gi = static_cast<const int32_t*>(g_idx.data);
  for (int64_t k = 0; k < k_dim; ++k) {
    if (gi[k] >= 0 && gi[k] < g_dim) continue;
    return Status::InvalidArgument("g_idx: g_idx[" + std::to_string(k) + "] = " + std::to_string(gi[k]) +
                                   " is out of range [0, " + std::to_string(g_dim) +
                                   ") (G = scales.shape[0] = " + std::to_string(g_dim) + ")");
  }
  return Status::Ok();
}

}  // namespace gptqkit::checks
