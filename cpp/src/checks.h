// Argument validation shared by every public entry point. Each check returns
// a Status whose message names the argument, so errors reach users as e.g.
// "hessian: expected shape [512, 512], got [512, 256]".
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "gptqkit/pack.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"

#define GPTQKIT_RETURN_IF_ERROR(expr)      \
  do {                                     \
    ::gptqkit::Status _gptqkit_s = (expr); \
    if (!_gptqkit_s.ok()) return _gptqkit_s; \
  } while (0)

namespace gptqkit::checks {

// Non-null data (unless empty), CPU device, C-contiguous, ndim in range.
Status cpu_contiguous(const TensorView& t, const char* name);
Status dtype_is(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
// Exact shape; -1 in `expected` matches any extent.
Status shape_is(const TensorView& t, const char* name, std::initializer_list<int64_t> expected);
Status ndim_is(const TensorView& t, const char* name, int ndim);
// Every element finite (float32/64, float16, bfloat16 views).
Status all_finite(const TensorView& t, const char* name);
Status bits_supported(int bits);

// For a tensor that is not on the CPU: Ok when this build has a GPU backend
// for its kind of device; else Unsupported, saying how to get GPU support.
Status gpu_supported(const TensorView& t, const char* name);

// A GPTQ-packed layer held on the CPU, checked before anything reads it:
// bits and format supported; qweight int32 [packed_words(K, bits), N],
// qzeros int32 [G, packed_words(N, bits)], scales [G, N] of one of
// `scale_dtypes`, g_idx int32 [K] with every entry in [0, G), and G >= 1
// unless K == 0. K = g_idx.shape[0], N = qweight.shape[1]. Messages name the
// tensor and the expected shape in terms of K, N and G.
Status packed_layer(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                    const TensorView& g_idx, int bits, ZeroFormat format,
                    std::initializer_list<DType> scale_dtypes);

// `s` with " (why)" appended to its message when it is an error.
Status with_reason(Status s, const std::string& why);

// Whether the byte ranges of two contiguous arrays intersect (output aliasing checks).
bool overlaps(const TensorView& a, const TensorView& b);

// "cpu", "cuda:0", "rocm:1": for messages about mismatched devices.
std::string device_string(const Device& d);

}  // namespace gptqkit::checks
