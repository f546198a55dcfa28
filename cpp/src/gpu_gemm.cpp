// GPU GEMM front end (gptqkit/gpu_gemm.h): the layout's extents, the
// load-time repack (on the host), and validation of every matmul argument
// before the launchers in cuda/src/gemm_*.cu touch device memory. Compiled
// by the host compiler in every build; the launchers exist only when the
// library is built with a GPU backend (GPTQKIT_HAS_GPU).
#include "gptqkit/gpu_gemm.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "bitstream.h"
#include "checks.h"
#include "half.h"
#include "parallel.h"

#if defined(GPTQKIT_HAS_GPU)
#include "../../cuda/src/gpu_gemm_api.h"
static_assert(gptqkit::gpu::kGemvMaxRows == gptqkit::kGpuGemvMaxRows, "one GEMV row limit");
#endif

namespace gptqkit {
namespace {

constexpr const char* kNoGpu =
    "gptqkit was built without GPU support: rebuild with a GPU backend, e.g. "
    "`GPTQKIT_WITH_CUDA=1 pip install .` (NVIDIA, needs nvcc) or `GPTQKIT_WITH_HIP=1 pip install .` (ROCm), "
    "or cmake -DGPTQKIT_WITH_CUDA=ON / -DGPTQKIT_WITH_HIP=ON";

using checks::overlaps;
using checks::with_reason;

float load_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

bool is_gpu(const TensorView& t) { return t.device.type == DeviceType::kCUDA || t.device.type == DeviceType::kROCm; }

// Rank, non-negative extents, non-null data, C order: the device-agnostic part
// of checks::cpu_contiguous.
Status contiguous(const TensorView& t, const char* name) {
  if (t.ndim < 0 || t.ndim > kMaxTensorDims)
    return Status::InvalidArgument(std::string(name) + ": unsupported rank " + std::to_string(t.ndim));
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] < 0)
      return Status::InvalidArgument(std::string(name) + ": negative extent in shape " + shape_string(t));
  if (t.numel() > 0 && t.data == nullptr) return Status::InvalidArgument(std::string(name) + ": null data pointer");
  if (!t.is_contiguous())
    return Status::InvalidArgument(std::string(name) + ": expected a C-contiguous (row-major) array, got shape " +
                                   shape_string(t) + " with non-contiguous strides; call .contiguous() first");
  return Status::Ok();
}

std::string device_string(const Device& d) {
  switch (d.type) {
    case DeviceType::kCPU: return "cpu";
    case DeviceType::kCUDA: return "cuda:" + std::to_string(d.index);
    default: return "rocm:" + std::to_string(d.index);
  }
}

// A GPU array on `device` (the device of the first GPU argument), as this
// build's backend sees it: CUDA builds take CUDA memory, HIP builds ROCm
// memory (and "CUDA" memory, which is what some producers call it).
Status on_gpu(const TensorView& t, const char* name, const Device* device) {
  GPTQKIT_RETURN_IF_ERROR(contiguous(t, name));
  if (!is_gpu(t))
    return Status::InvalidArgument(std::string(name) + ": expected a GPU array, got one on " +
                                   device_string(t.device));
#if defined(GPTQKIT_HAS_GPU)
  if (std::string(gpu::backend_name()) == "cuda" && t.device.type != DeviceType::kCUDA)
    return Status::InvalidArgument(std::string(name) + ": expected CUDA memory (this build's backend is CUDA), got " +
                                   device_string(t.device));
#endif
  if (device != nullptr && t.device.index != device->index)
    return Status::InvalidArgument(std::string(name) + ": expected an array on GPU " + std::to_string(device->index) +
                                   " (where the other arguments are), got one on GPU " +
                                   std::to_string(t.device.index));
  return Status::Ok();
}

Status validate_checkpoint(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                           const TensorView& g_idx, int bits, ZeroFormat format) {
  return checks::packed_layer(qweight, qzeros, scales, g_idx, bits, format,
                              {DType::kFloat16, DType::kBFloat16, DType::kFloat32});
}

}  // namespace

bool gpu_backend_available() {
#if defined(GPTQKIT_HAS_GPU)
  return true;
#else
  return false;
#endif
}

const char* gpu_backend_name() {
#if defined(GPTQKIT_HAS_GPU)
  return gpu::backend_name();
#else
  return "none";
#endif
}

Status gpu_gemm_shape(const TensorView& g_idx, int64_t out_features, int64_t groups, int bits, GpuGemmShape* out) {
  try {
    if (out == nullptr) return Status::InvalidArgument("out: expected a GpuGemmShape to fill, got nullptr");
    GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
    GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(g_idx, "g_idx"));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(g_idx, "g_idx", {DType::kInt32}));
    GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(g_idx, "g_idx", 1));
    const int64_t k_dim = g_idx.shape[0];
    if (k_dim <= 0 || out_features <= 0)
      return Status::InvalidArgument("g_idx: expected K = g_idx.shape[0] > 0 and out_features > 0, got K = " +
                                     std::to_string(k_dim) + ", out_features = " + std::to_string(out_features));
    if (groups <= 0) return Status::InvalidArgument("groups: expected at least one group, got " + std::to_string(groups));
    // The kernels index with 32-bit integers in places (positions, columns).
    if (k_dim > (INT_MAX / 2) || out_features > (INT_MAX / 2) || groups > k_dim)
      return Status::InvalidArgument("g_idx: extents K = " + std::to_string(k_dim) + ", N = " +
                                     std::to_string(out_features) + ", G = " + std::to_string(groups) +
                                     " are out of the supported range (K, N < 2^30, G <= K)");
    const int32_t* gi = static_cast<const int32_t*>(g_idx.data);
    std::vector<int64_t> count(static_cast<size_t>(groups), 0);
    for (int64_t k = 0; k < k_dim; ++k) {
      if (gi[k] < 0 || gi[k] >= groups)
        return Status::InvalidArgument("g_idx: g_idx[" + std::to_string(k) + "] = " + std::to_string(gi[k]) +
                                       " is out of range [0, " + std::to_string(groups) + ")");
      ++count[gi[k]];
    }
    // Identity positions work when every chunk of 32 consecutive columns lies
    // in one group; otherwise (act-order, or groups not multiples of 32)
    // regroup and pad.
    bool identity = true;
    for (int64_t k0 = 0; k0 < k_dim && identity; k0 += kGpuChunk)
      for (int64_t k = k0 + 1; k < std::min(k_dim, k0 + kGpuChunk); ++k)
        if (gi[k] != gi[k0]) { identity = false; break; }
    GpuGemmShape s;
    s.in_features = k_dim;
    s.out_features = out_features;
    s.groups = groups;
    s.bits = bits;
    s.reordered = !identity;
    if (identity) {
      s.chunks = (k_dim + kGpuChunk - 1) / kGpuChunk;
    } else {
      for (int64_t g = 0; g < groups; ++g) s.chunks += (count[g] + kGpuChunk - 1) / kGpuChunk;
    }
    s.positions = s.chunks * kGpuChunk;
    s.padded_out = (out_features + kGpuColumnAlign - 1) / kGpuColumnAlign * kGpuColumnAlign;
    *out = s;
    return Status::Ok();
  } catch (const std::exception& e) {
    return Status::Internal(std::string("gpu_gemm_shape: ") + e.what());
  }
}

Status prepare_gpu_weight(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                          const TensorView& g_idx, int bits, ZeroFormat format, const GpuPreparedView& out,
                          void* stream) {
  try {
    GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(bits));
    GpuGemmShape s;
    GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(scales, "scales"));
    GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(scales, "scales", 2));
    GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(qweight, "qweight"));
    GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(qweight, "qweight", 2));
    GPTQKIT_RETURN_IF_ERROR(gpu_gemm_shape(g_idx, qweight.shape[1], scales.shape[0], bits, &s));
    GPTQKIT_RETURN_IF_ERROR(validate_checkpoint(qweight, qzeros, scales, g_idx, bits, format));

    // The outputs: all on the CPU, or all on one GPU.
    const bool to_gpu = is_gpu(out.qweight);
#if !defined(GPTQKIT_HAS_GPU)
    if (to_gpu || is_gpu(out.sz) || is_gpu(out.chunk_group) || is_gpu(out.perm))
      return Status::Unsupported(std::string("prepare_gpu_weight: GPU outputs: ") + kNoGpu);
#endif
    const TensorView* outs[] = {&out.qweight, &out.sz, &out.chunk_group, &out.perm};
    const char* names[] = {"out.qweight", "out.sz", "out.chunk_group", "out.perm"};
    for (int i = 0; i < 4; ++i) {
      if (i == 3 && !s.reordered) {
        if (out.perm.data != nullptr || out.perm.numel() > 1 || out.perm.ndim > 1)
          return Status::InvalidArgument("out.perm: expected an empty view, the layout is not reordered");
        continue;
      }
      if (i == 3 && out.perm.data == nullptr)
        return Status::InvalidArgument("out.perm: the layout is reordered (act-order, or groups that are not "
                                       "multiples of 32), so it needs an int32 perm buffer of Kp = " +
                                       std::to_string(s.positions) + " elements");
      if (to_gpu) {
        GPTQKIT_RETURN_IF_ERROR(on_gpu(*outs[i], names[i], &out.qweight.device));
      } else {
        GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(*outs[i], names[i]));
      }
    }
    if (out.bits != bits || out.in_features != s.in_features || out.out_features != s.out_features)
      return Status::InvalidArgument("out: bits/in_features/out_features = " + std::to_string(out.bits) + "/" +
                                     std::to_string(out.in_features) + "/" + std::to_string(out.out_features) +
                                     " do not match the checkpoint's " + std::to_string(bits) + "/" +
                                     std::to_string(s.in_features) + "/" + std::to_string(s.out_features));
    const std::string lay = "gpu_gemm_shape: C = " + std::to_string(s.chunks) + ", Np = " +
                            std::to_string(s.padded_out) + ", G = " + std::to_string(s.groups);
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(out.qweight, "out.qweight", {DType::kInt32}));
    GPTQKIT_RETURN_IF_ERROR(with_reason(checks::shape_is(out.qweight, "out.qweight", {s.chunks * bits, s.padded_out}),
                                        "[C * bits, Np] with " + lay));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(out.sz, "out.sz", {DType::kFloat16, DType::kBFloat16}));
    GPTQKIT_RETURN_IF_ERROR(
        with_reason(checks::shape_is(out.sz, "out.sz", {s.groups, s.padded_out, 2}), "[G, Np, 2] with " + lay));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(out.chunk_group, "out.chunk_group", {DType::kInt32}));
    GPTQKIT_RETURN_IF_ERROR(
        with_reason(checks::shape_is(out.chunk_group, "out.chunk_group", {s.chunks}), "[C] with " + lay));
    if (s.reordered) {
      GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(out.perm, "out.perm", {DType::kInt32}));
      GPTQKIT_RETURN_IF_ERROR(
          with_reason(checks::shape_is(out.perm, "out.perm", {s.positions}), "[Kp = 32 C] with " + lay));
    }
    for (int i = 0; i < 4; ++i)
      for (const TensorView* in : {&qweight, &qzeros, &scales, &g_idx})
        if (!to_gpu && overlaps(*outs[i], *in))
          return Status::InvalidArgument(std::string(names[i]) + ": overlaps an input; pass separate arrays");

    // ---- repack on the host
    const int64_t k_dim = s.in_features, n_dim = s.out_features, g_dim = s.groups, np = s.padded_out;
    const int32_t* gi = static_cast<const int32_t*>(g_idx.data);
    std::vector<int32_t> perm(static_cast<size_t>(s.positions), -1);
    std::vector<int32_t> chunk_group(static_cast<size_t>(s.chunks), 0);
    if (s.reordered) {  // stable sort of k by group, every group padded to whole chunks
      std::vector<int64_t> start(static_cast<size_t>(g_dim) + 1, 0), count(static_cast<size_t>(g_dim), 0);
      for (int64_t k = 0; k < k_dim; ++k) ++count[gi[k]];
      for (int64_t g = 0; g < g_dim; ++g) {
        const int64_t c = (count[g] + kGpuChunk - 1) / kGpuChunk;
        for (int64_t i = 0; i < c; ++i) chunk_group[start[g] / kGpuChunk + i] = static_cast<int32_t>(g);
        start[g + 1] = start[g] + c * kGpuChunk;
      }
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t k = 0; k < k_dim; ++k) perm[fill[gi[k]]++] = static_cast<int32_t>(k);
    } else {
      for (int64_t p = 0; p < k_dim; ++p) perm[p] = static_cast<int32_t>(p);
      for (int64_t c = 0; c < s.chunks; ++c) chunk_group[c] = gi[c * kGpuChunk];
    }

    // Codes. Without reordering the chunk rows are the checkpoint's rows (a
    // copy, the tail rows zero); otherwise decode each column's stream once
    // and re-encode it chunk by chunk in position order.
    const uint32_t* q = static_cast<const uint32_t*>(qweight.data);
    const int64_t w_dim = packed_words(k_dim, bits);
    std::vector<uint32_t> qw(static_cast<size_t>(s.chunks * bits * np), 0u);
    if (!s.reordered) {
      for (int64_t r = 0; r < w_dim; ++r) std::memcpy(&qw[r * np], q + r * n_dim, n_dim * sizeof(uint32_t));
    } else {
      parallel_for(n_dim, 64, [&](int64_t n0, int64_t n1) {
        std::vector<uint32_t> codes(static_cast<size_t>((w_dim + bits - 1) / bits * 32));
        uint32_t words[8], vals[32];
        for (int64_t n = n0; n < n1; ++n) {
          for (int64_t c0 = 0; c0 * bits < w_dim; ++c0) {
            for (int b = 0; b < bits; ++b) words[b] = c0 * bits + b < w_dim ? q[(c0 * bits + b) * n_dim + n] : 0u;
            switch (bits) {
              case 2: bitstream::decode_chunk<2>(words, codes.data() + c0 * 32); break;
              case 3: bitstream::decode_chunk<3>(words, codes.data() + c0 * 32); break;
              case 4: bitstream::decode_chunk<4>(words, codes.data() + c0 * 32); break;
              default: bitstream::decode_chunk<8>(words, codes.data() + c0 * 32); break;
            }
          }
          for (int64_t c = 0; c < s.chunks; ++c) {
            for (int j = 0; j < 32; ++j) {
              const int32_t k = perm[c * 32 + j];
              vals[j] = k >= 0 ? codes[k] : 0u;
            }
            switch (bits) {
              case 2: bitstream::encode_chunk<2>(vals, words); break;
              case 3: bitstream::encode_chunk<3>(vals, words); break;
              case 4: bitstream::encode_chunk<4>(vals, words); break;
              default: bitstream::encode_chunk<8>(vals, words); break;
            }
            for (int b = 0; b < bits; ++b) qw[(c * bits + b) * np + n] = words[b];
          }
        }
      });
    }

    // (scale, zero) pairs in the activation dtype; zero points (<= 256) are
    // exact in fp16 and bf16, the scale is rounded once like the activations.
    std::vector<int32_t> zeros(static_cast<size_t>(g_dim * n_dim));
    GPTQKIT_RETURN_IF_ERROR(unpack_qzeros(qzeros, bits, format, make_view(zeros.data(), DType::kInt32, g_dim, n_dim)));
    const bool bf16 = out.sz.dtype == DType::kBFloat16;
    std::vector<uint16_t> sz(static_cast<size_t>(g_dim * np * 2), 0);
    for (int64_t g = 0; g < g_dim; ++g)
      for (int64_t n = 0; n < n_dim; ++n) {
        const float sc = load_float(scales.data, scales.dtype, g * n_dim + n);
        const float zf = static_cast<float>(zeros[g * n_dim + n]);
        sz[(g * np + n) * 2 + 0] = bf16 ? float_to_bf16(sc) : float_to_fp16(sc);
        sz[(g * np + n) * 2 + 1] = bf16 ? float_to_bf16(zf) : float_to_fp16(zf);
      }

    if (!to_gpu) {
      std::memcpy(out.qweight.data, qw.data(), qw.size() * sizeof(uint32_t));
      std::memcpy(out.sz.data, sz.data(), sz.size() * sizeof(uint16_t));
      std::memcpy(out.chunk_group.data, chunk_group.data(), chunk_group.size() * sizeof(int32_t));
      if (s.reordered) std::memcpy(out.perm.data, perm.data(), perm.size() * sizeof(int32_t));
      return Status::Ok();
    }
#if defined(GPTQKIT_HAS_GPU)
    const int dev = out.qweight.device.index;
    std::string err = gpu::copy_to_device_sync(out.qweight.data, qw.data(), qw.size() * sizeof(uint32_t), dev, stream);
    if (err.empty()) err = gpu::copy_to_device_sync(out.sz.data, sz.data(), sz.size() * sizeof(uint16_t), dev, stream);
    if (err.empty())
      err = gpu::copy_to_device_sync(out.chunk_group.data, chunk_group.data(), chunk_group.size() * sizeof(int32_t),
                                     dev, stream);
    if (err.empty() && s.reordered)
      err = gpu::copy_to_device_sync(out.perm.data, perm.data(), perm.size() * sizeof(int32_t), dev, stream);
    // Load time is where per-device kernel setup belongs, not a first call
    // that may be inside a CUDA-graph capture.
    if (err.empty()) err = gpu::prepare_gemm_kernels(dev);
    if (!err.empty()) return Status::Internal("prepare_gpu_weight: " + err);
    return Status::Ok();
#else
    return Status::Unsupported(std::string("prepare_gpu_weight: ") + kNoGpu);
#endif
  } catch (const std::exception& e) {
    return Status::Internal(std::string("prepare_gpu_weight: ") + e.what());
  }
}

namespace {

// What a validated prepared view implies: its device, the layout's extents
// and the activation dtype (that of w.sz).
struct ValidatedLayer {
  const Device* device = nullptr;
  int64_t chunks = 0, np = 0, groups = 0;
  DType act = DType::kFloat16;
};

// Everything about a prepared view that can be checked without reading
// device memory. On success fills `out`.
Status validate_prepared(const GpuPreparedView& w, ValidatedLayer* out) {
  GPTQKIT_RETURN_IF_ERROR(checks::bits_supported(w.bits));
  const int bits = w.bits;
  if (w.in_features <= 0 || w.out_features <= 0)
    return Status::InvalidArgument("w: expected in_features > 0 and out_features > 0, got " +
                                   std::to_string(w.in_features) + " and " + std::to_string(w.out_features));
  GPTQKIT_RETURN_IF_ERROR(on_gpu(w.qweight, "w.qweight", nullptr));
  out->device = &w.qweight.device;
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(w.qweight, "w.qweight", {DType::kInt32}));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(w.qweight, "w.qweight", 2));
  GPTQKIT_RETURN_IF_ERROR(on_gpu(w.sz, "w.sz", out->device));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(w.sz, "w.sz", {DType::kFloat16, DType::kBFloat16}));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(w.sz, "w.sz", 3));
  GPTQKIT_RETURN_IF_ERROR(on_gpu(w.chunk_group, "w.chunk_group", out->device));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(w.chunk_group, "w.chunk_group", {DType::kInt32}));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(w.chunk_group, "w.chunk_group", 1));
  const int64_t c = w.chunk_group.shape[0];
  const int64_t n_pad = (w.out_features + kGpuColumnAlign - 1) / kGpuColumnAlign * kGpuColumnAlign;
  const int64_t g = w.sz.shape[0];
  const std::string lay = "C = w.chunk_group.shape[0] = " + std::to_string(c) + ", Np = " + std::to_string(n_pad) +
                          " for N = " + std::to_string(w.out_features) + ", bits = " + std::to_string(bits);
  GPTQKIT_RETURN_IF_ERROR(
      with_reason(checks::shape_is(w.qweight, "w.qweight", {c * bits, n_pad}), "[C * bits, Np] with " + lay));
  GPTQKIT_RETURN_IF_ERROR(with_reason(checks::shape_is(w.sz, "w.sz", {-1, n_pad, 2}), "[G, Np, 2] with " + lay));
  if (g <= 0 || g > w.in_features) return Status::InvalidArgument("w.sz: expected 1 <= G <= K groups, got " + std::to_string(g));
  const bool reordered = w.perm.data != nullptr || w.perm.ndim != 0;
  if (reordered) {
    GPTQKIT_RETURN_IF_ERROR(on_gpu(w.perm, "w.perm", out->device));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(w.perm, "w.perm", {DType::kInt32}));
    GPTQKIT_RETURN_IF_ERROR(with_reason(checks::shape_is(w.perm, "w.perm", {c * kGpuChunk}), "[32 C] with " + lay));
    if (c * kGpuChunk < w.in_features)
      return Status::InvalidArgument("w.chunk_group: C = " + std::to_string(c) + " chunks hold fewer than K = " +
                                     std::to_string(w.in_features) + " positions");
  } else if (c != (w.in_features + kGpuChunk - 1) / kGpuChunk) {
    return Status::InvalidArgument("w.chunk_group: expected C = ceil(K / 32) = " +
                                   std::to_string((w.in_features + kGpuChunk - 1) / kGpuChunk) +
                                   " chunks for a layout without perm, got " + std::to_string(c));
  }
  // The kernels read qweight and sz with 16-byte vector loads (and cp.async):
  // a view at an odd element offset of a larger buffer would fault.
  for (const TensorView* t : {&w.qweight, &w.sz})
    if (reinterpret_cast<uintptr_t>(t->data) % 16 != 0)
      return Status::InvalidArgument(std::string(t == &w.qweight ? "w.qweight" : "w.sz") +
                                     ": data must be 16-byte aligned (the kernels use 128-bit loads); "
                                     "pass a fresh tensor or .clone() of the view");
  if (w.in_features > INT_MAX / 2 || n_pad > INT_MAX / 2 || c * bits > INT_MAX / 2)
    return Status::InvalidArgument("w: extents out of the supported range (K, N < 2^30)");
  out->chunks = c;
  out->np = n_pad;
  out->groups = g;
  out->act = w.sz.dtype;
  return Status::Ok();
}

#if defined(GPTQKIT_HAS_GPU)
// The launch arguments of a validated prepared layer (x, bias, y and M are
// the matmul's own).
gpu::GemmArgs layer_args(const GpuPreparedView& w, const ValidatedLayer& layer, void* stream) {
  gpu::GemmArgs a;
  a.qweight = static_cast<const uint32_t*>(w.qweight.data);
  a.sz = w.sz.data;
  a.chunk_group = static_cast<const int32_t*>(w.chunk_group.data);
  a.perm = w.perm.data != nullptr ? static_cast<const int32_t*>(w.perm.data) : nullptr;
  a.k = w.in_features;
  a.n = w.out_features;
  a.np = layer.np;
  a.chunks = layer.chunks;
  a.groups = layer.groups;
  a.bits = w.bits;
  a.act = layer.act == DType::kBFloat16 ? gpu::Act::kBFloat16 : gpu::Act::kFloat16;
  a.device = layer.device->index;
  a.stream = stream;
  return a;
}
#endif

}  // namespace

namespace {

// The checks of x against a validated layer: a GPU array on its device, its
// dtype, [M, K].
Status validate_x(const TensorView& x, const GpuPreparedView& w, const Device* device, DType act) {
  GPTQKIT_RETURN_IF_ERROR(on_gpu(x, "x", device));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(x, "x", 2));
  if (x.dtype != act)
    return Status::InvalidArgument(std::string("x: expected dtype ") + dtype_name(act) +
                                   " (the dtype the layer was prepared for, w.sz), got " + dtype_name(x.dtype));
  GPTQKIT_RETURN_IF_ERROR(with_reason(checks::shape_is(x, "x", {-1, w.in_features}),
                                      "[M, K] with K = " + std::to_string(w.in_features) +
                                          ", N = " + std::to_string(w.out_features)));
  if (x.shape[0] > INT_MAX / 2) return Status::InvalidArgument("x: M = " + std::to_string(x.shape[0]) + " rows exceed 2^30");
  return Status::Ok();
}

size_t byte_size(const TensorView& t) { return static_cast<size_t>(t.numel()) * dtype_size(t.dtype); }

}  // namespace

Status gpu_matmul_workspace_bytes(const TensorView& x, const GpuPreparedView& w, size_t* bytes) {
  try {
    if (bytes == nullptr) return Status::InvalidArgument("bytes: expected a size_t to fill, got nullptr");
    *bytes = 0;
#if !defined(GPTQKIT_HAS_GPU)
    return Status::Unsupported(std::string("gpu_matmul_workspace_bytes: ") + kNoGpu);
#else
    ValidatedLayer layer;
    GPTQKIT_RETURN_IF_ERROR(validate_prepared(w, &layer));
    GPTQKIT_RETURN_IF_ERROR(validate_x(x, w, layer.device, layer.act));
    gpu::GemmArgs a = layer_args(w, layer, nullptr);
    a.x = x.data;
    a.m = x.shape[0];
    const gpu::MmaPlan plan = gpu::plan_mma(a, SIZE_MAX);
    if (plan.usable) *bytes = plan.workspace_bytes();
    return Status::Ok();
#endif
  } catch (const std::exception& e) {
    return Status::Internal(std::string("gpu_matmul_workspace_bytes: ") + e.what());
  }
}

Status gpu_matmul_kernel(const TensorView& x, const GpuPreparedView& w, bool with_workspace, const char** kernel) {
  try {
    if (kernel == nullptr) return Status::InvalidArgument("kernel: expected a const char* to fill, got nullptr");
    *kernel = "";
#if !defined(GPTQKIT_HAS_GPU)
    (void)with_workspace;
    return Status::Unsupported(std::string("gpu_matmul_kernel: ") + kNoGpu);
#else
    ValidatedLayer layer;
    GPTQKIT_RETURN_IF_ERROR(validate_prepared(w, &layer));
    GPTQKIT_RETURN_IF_ERROR(validate_x(x, w, layer.device, layer.act));
    gpu::GemmArgs a = layer_args(w, layer, nullptr);
    a.x = x.data;
    a.m = x.shape[0];
    const gpu::MmaPlan plan = gpu::plan_mma(a, with_workspace ? SIZE_MAX : 0);
    if (plan.usable) {
      *kernel = plan.wgmma ? "wgmma" : plan.skinny ? "skinny" : "mma";
    } else {
      *kernel = a.m <= gpu::kGemvMaxRows ? "gemv" : "tiled";
    }
    return Status::Ok();
#endif
  } catch (const std::exception& e) {
    return Status::Internal(std::string("gpu_matmul_kernel: ") + e.what());
  }
}

Status gpu_quantized_matmul(const TensorView& x, const GpuPreparedView& w, const TensorView* bias, const TensorView& y,
                            void* stream) {
  return gpu_quantized_matmul(x, w, bias, y, nullptr, stream);
}

Status gpu_quantized_matmul(const TensorView& x, const GpuPreparedView& w, const TensorView* bias, const TensorView& y,
                            const TensorView* workspace, void* stream) {
  return gpu_quantized_matmul(x, w, bias, y, workspace, nullptr, stream);
}

Status gpu_quantized_matmul(const TensorView& x, const GpuPreparedView& w, const TensorView* bias, const TensorView& y,
                            const TensorView* workspace, const TensorView* tile_counters, void* stream) {
  try {
#if !defined(GPTQKIT_HAS_GPU)
    return Status::Unsupported(std::string("gpu_quantized_matmul: ") + kNoGpu);
#endif
    ValidatedLayer layer;
    GPTQKIT_RETURN_IF_ERROR(validate_prepared(w, &layer));
    const Device* device = layer.device;
    const DType act = layer.act;
    GPTQKIT_RETURN_IF_ERROR(validate_x(x, w, device, act));
    const int64_t k_dim = w.in_features, n_dim = w.out_features, m_dim = x.shape[0];
    const std::string dims = "K = " + std::to_string(k_dim) + ", N = " + std::to_string(n_dim);
    if (bias != nullptr) {
      GPTQKIT_RETURN_IF_ERROR(on_gpu(*bias, "bias", device));
      GPTQKIT_RETURN_IF_ERROR(with_reason(checks::dtype_is(*bias, "bias", {act}), "the dtype of x"));
      GPTQKIT_RETURN_IF_ERROR(with_reason(checks::shape_is(*bias, "bias", {n_dim}), "[N] with " + dims));
    }
    GPTQKIT_RETURN_IF_ERROR(on_gpu(y, "y", device));
    GPTQKIT_RETURN_IF_ERROR(with_reason(checks::dtype_is(y, "y", {act}), "the dtype of x"));
    GPTQKIT_RETURN_IF_ERROR(with_reason(checks::shape_is(y, "y", {m_dim, n_dim}),
                                        "[M, N] with M = x.shape[0] = " + std::to_string(m_dim) + ", " + dims));
    const TensorView* inputs[] = {&x, bias, &w.qweight, &w.sz, &w.chunk_group, &w.perm};
    const char* names[] = {"x", "bias", "w.qweight", "w.sz", "w.chunk_group", "w.perm"};
    for (int i = 0; i < 6; ++i)
      if (inputs[i] != nullptr && overlaps(y, *inputs[i]))
        return Status::InvalidArgument(std::string("y: overlaps the memory of ") + names[i] +
                                       "; pass a separate output array");
    // Scratch the kernels write (workspace, tile counters) shares memory with nothing else of the call.
    auto scratch_apart = [&](const TensorView& t, const char* name) {
      for (int i = 0; i < 6; ++i)
        if (inputs[i] != nullptr && overlaps(t, *inputs[i]))
          return Status::InvalidArgument(std::string(name) + ": overlaps the memory of " + names[i]);
      if (overlaps(t, y)) return Status::InvalidArgument(std::string(name) + ": overlaps the memory of y");
      return Status::Ok();
    };
    size_t workspace_bytes = 0;
    if (workspace != nullptr && workspace->data != nullptr) {
      GPTQKIT_RETURN_IF_ERROR(on_gpu(*workspace, "workspace", device));
      if (reinterpret_cast<uintptr_t>(workspace->data) % 16 != 0)
        return Status::InvalidArgument("workspace: data must be 16-byte aligned");
      GPTQKIT_RETURN_IF_ERROR(scratch_apart(*workspace, "workspace"));
      workspace_bytes = byte_size(*workspace);
    }
    const bool with_counters = tile_counters != nullptr && tile_counters->data != nullptr;
    if (with_counters) {
      GPTQKIT_RETURN_IF_ERROR(on_gpu(*tile_counters, "tile_counters", device));
      GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(*tile_counters, "tile_counters", {DType::kInt32}));
      GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(*tile_counters, "tile_counters", 1));
      GPTQKIT_RETURN_IF_ERROR(scratch_apart(*tile_counters, "tile_counters"));
      if (workspace_bytes > 0 && overlaps(*tile_counters, *workspace))
        return Status::InvalidArgument("tile_counters: overlaps the memory of workspace");
    }
    if (m_dim == 0) return Status::Ok();
#if defined(GPTQKIT_HAS_GPU)
    gpu::GemmArgs a = layer_args(w, layer, stream);
    a.x = x.data;
    a.bias = bias != nullptr ? bias->data : nullptr;
    a.y = y.data;
    a.m = m_dim;
    if (with_counters) {
      a.tile_counters = static_cast<unsigned*>(tile_counters->data);
      a.tile_counter_count = tile_counters->shape[0];
    }
    std::string err;
    const gpu::MmaPlan plan = gpu::plan_mma(a, workspace_bytes);
    if (plan.usable) {
      err = gpu::launch_mma(a, plan, workspace_bytes > 0 ? workspace->data : nullptr);
    } else {
      err = m_dim <= gpu::kGemvMaxRows ? gpu::launch_gemv(a) : gpu::launch_tiled(a);
    }
    if (!err.empty()) return Status::Internal("gpu_quantized_matmul: " + err);
    return Status::Ok();
#else
    (void)workspace_bytes;
    return Status::Unsupported(std::string("gpu_quantized_matmul: ") + kNoGpu);
#endif
  } catch (const std::exception& e) {
    return Status::Internal(std::string("gpu_quantized_matmul: ") + e.what());
  }
}

namespace {

// gpu_dequantize_prepared (positions false: [N, K], act-order undone) and
// gpu_dequantize_prepared_positions (true: [N, Kp], the layout's order).
Status dequantize_prepared(const GpuPreparedView& w, const TensorView& weight, bool positions, void* stream,
                           const char* fn) {
  try {
#if !defined(GPTQKIT_HAS_GPU)
    (void)w, (void)weight, (void)positions, (void)stream;
    return Status::Unsupported(std::string(fn) + ": " + kNoGpu);
#else
    ValidatedLayer layer;
    GPTQKIT_RETURN_IF_ERROR(validate_prepared(w, &layer));
    GPTQKIT_RETURN_IF_ERROR(on_gpu(weight, "weight", layer.device));
    GPTQKIT_RETURN_IF_ERROR(with_reason(checks::dtype_is(weight, "weight", {layer.act}), "the dtype of w.sz"));
    const int64_t kp = layer.chunks * kGpuChunk;
    GPTQKIT_RETURN_IF_ERROR(positions ? with_reason(checks::shape_is(weight, "weight", {w.out_features, kp}),
                                                    "[N, Kp] with Kp = 32 * chunks = " + std::to_string(kp))
                                      : checks::shape_is(weight, "weight", {w.out_features, w.in_features}));
    for (const TensorView* in : {&w.qweight, &w.sz, &w.chunk_group, &w.perm})
      if (overlaps(weight, *in)) return Status::InvalidArgument("weight: overlaps the prepared layer's memory");
    gpu::GemmArgs a = layer_args(w, layer, stream);
    if (positions) {  // every position in place: the kernels' own order, no scatter
      a.perm = nullptr;
      a.k = kp;
    }
    const std::string err = gpu::launch_dequantize(a, weight.data);
    if (!err.empty()) return Status::Internal(std::string(fn) + ": " + err);
    return Status::Ok();
#endif
  } catch (const std::exception& e) {
    return Status::Internal(std::string(fn) + ": " + e.what());
  }
}

}  // namespace

Status gpu_dequantize_prepared(const GpuPreparedView& w, const TensorView& weight, void* stream) {
  return dequantize_prepared(w, weight, false, stream, "gpu_dequantize_prepared");
}

Status gpu_dequantize_prepared_positions(const GpuPreparedView& w, const TensorView& weight, void* stream) {
  return dequantize_prepared(w, weight, true, stream, "gpu_dequantize_prepared_positions");
}

}  // namespace gptqkit
