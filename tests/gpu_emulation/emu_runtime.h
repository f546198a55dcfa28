// The GPU runtime API of gpu_compat.h (the gpu* names), emulated on the host
// for the CPU emulation of cuda/src (see emu_compat.h, which includes this).
//
// "Device memory" is host memory mapped so that every buffer ends right
// before an inaccessible guard page: a kernel or a copy that runs past the
// end of a device buffer faults at once (as compute-sanitizer's memcheck
// would report it). Buffers start filled with a garbage pattern, never zeros,
// so reading memory nobody wrote gives nonsense instead of plausible zeros.
// Live buffers and bytes are counted, so tests can check that every call
// frees what it allocates. Streams are ignored: work runs at the call, in
// order, which is one legal schedule of a single stream.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>

using gpuStream_t = struct emu_stream*;
using gpuError_t = int;
constexpr gpuError_t gpuSuccess = 0;
constexpr gpuError_t gpuErrorMemoryAllocation = 2;
constexpr gpuError_t gpuErrorInvalidValue = 1;
enum gpuMemcpyKind { gpuMemcpyHostToDevice, gpuMemcpyDeviceToHost, gpuMemcpyDeviceToDevice };
enum gpuDeviceAttr {
  gpuDevAttrMultiProcessorCount,
  gpuDevAttrWarpSize,
  gpuDevAttrMaxSharedMemoryPerBlockOptin,
  gpuDevAttrComputeCapabilityMajor,
  gpuDevAttrComputeCapabilityMinor
};
struct gpuFuncAttributes {
  int binaryVersion;
};

namespace emu {
struct Mapping {
  void* base;
  size_t length;
  size_t bytes;
};
inline std::map<const void*, Mapping> device_buffers;
inline int64_t live_bytes = 0;
inline int fail_after = -1;  // tests: allocations left before one fails (< 0: never)

inline gpuError_t device_alloc(void** out, size_t bytes) {
  *out = nullptr;
  if (fail_after == 0) {
    fail_after = -1;
    return gpuErrorMemoryAllocation;
  }
  if (fail_after > 0) --fail_after;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t rounded = (bytes + 15) / 16 * 16;  // 16-byte aligned start, like cudaMalloc (which gives 256)
  const size_t data_pages = (rounded + page - 1) / page;
  const size_t length = (data_pages + 1) * page;
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return gpuErrorMemoryAllocation;
  unsigned char* guard = static_cast<unsigned char*>(base) + data_pages * page;
  mprotect(guard, page, PROT_NONE);
  unsigned char* p = guard - rounded;
  std::memset(p, 0xA5, rounded);
  device_buffers[p] = Mapping{base, length, bytes};
  live_bytes += static_cast<int64_t>(bytes);
  *out = p;
  return gpuSuccess;
}

inline gpuError_t device_free(void* p) {
  if (p == nullptr) return gpuSuccess;
  auto it = device_buffers.find(p);
  if (it == device_buffers.end()) return gpuErrorInvalidValue;
  live_bytes -= static_cast<int64_t>(it->second.bytes);
  munmap(it->second.base, it->second.length);
  device_buffers.erase(it);
  return gpuSuccess;
}
}  // namespace emu

inline gpuError_t gpuGetLastError() { return gpuSuccess; }
inline gpuError_t gpuPeekAtLastError() { return gpuSuccess; }
inline const char* gpuGetErrorString(gpuError_t e) {
  return e == gpuSuccess ? "no error" : e == gpuErrorMemoryAllocation ? "out of memory (emulated)" : "invalid value";
}
inline gpuError_t gpuGetDevice(int* d) { *d = 0; return gpuSuccess; }
inline gpuError_t gpuSetDevice(int d) { return d == 0 ? gpuSuccess : gpuErrorInvalidValue; }
inline gpuError_t gpuDeviceGetAttribute(int* value, gpuDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case gpuDevAttrMultiProcessorCount: *value = 4; break;
    case gpuDevAttrWarpSize: *value = kWarpSize; break;
    case gpuDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(emu::kDynamicSmemBytes); break;
    // The tensor-core target is an H100 (9.0: the wgmma kernel runs), the other a T4-class GPU.
    case gpuDevAttrComputeCapabilityMajor: *value = EMU_TC ? 9 : 7; break;
    case gpuDevAttrComputeCapabilityMinor: *value = EMU_TC ? 0 : 5; break;
  }
  return gpuSuccess;
}
// binaryVersion 80 when the tensor-core bodies are compiled in (as the
// runtime reports for an sm_80+ binary), else that of an older target.
template <typename F>
inline gpuError_t gpuFuncGetAttributes(gpuFuncAttributes* attr, F /*kernel*/) {
  attr->binaryVersion = EMU_TC ? 80 : 75;
  return gpuSuccess;
}
template <typename F>
inline gpuError_t gpuFuncSetAttribute(F /*kernel*/, int /*attr*/, int /*value*/) { return gpuSuccess; }
constexpr int gpuFuncAttributeMaxDynamicSharedMemorySize = 0;

inline gpuError_t gpuMalloc(void** p, size_t bytes) { return emu::device_alloc(p, bytes); }
template <typename T>
inline gpuError_t gpuMalloc(T** p, size_t bytes) {
  return emu::device_alloc(reinterpret_cast<void**>(p), bytes);
}
inline gpuError_t gpuFree(void* p) { return emu::device_free(p); }
inline gpuError_t gpuMallocAsync(void** p, size_t bytes, gpuStream_t) { return emu::device_alloc(p, bytes); }
inline gpuError_t gpuFreeAsync(void* p, gpuStream_t) { return emu::device_free(p); }
inline gpuError_t gpuMemcpy(void* dst, const void* src, size_t bytes, gpuMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return gpuSuccess;
}
inline gpuError_t gpuMemcpyAsync(void* dst, const void* src, size_t bytes, gpuMemcpyKind kind, gpuStream_t) {
  return gpuMemcpy(dst, src, bytes, kind);
}
inline gpuError_t gpuMemsetAsync(void* dst, int value, size_t bytes, gpuStream_t) {
  if (bytes) std::memset(dst, value, bytes);
  return gpuSuccess;
}
inline gpuError_t gpuStreamSynchronize(gpuStream_t) { return gpuSuccess; }

inline int gpu_warp_size() { return kWarpSize; }
