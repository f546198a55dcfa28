// What the C++ emulation test (tests/cpp/test_gpu_emulation.cpp) needs from
// the emulated GPU, without the emulation's macros: device buffers (with a
// guard page after each, see emu_runtime.h), their accounting, allocation
// failures on demand and the emulated target.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace emu_device {

void* alloc(size_t bytes);
void free(void* p);
int64_t live_bytes();
size_t live_buffers();
// The next `skip` allocations succeed, the one after fails (out of memory);
// a negative value turns this off.
void fail_allocation_after(int skip);
int warp_size();
bool tensor_cores();
// Launches so far of kernels whose name (as written at the launch, e.g.
// "wgmma_kernel<BF16, BT>") starts with `prefix`.
int64_t launches(const char* prefix);
// Launches made so far as programmatic dependent launches (GPTQKIT_LAUNCH_OVERLAPPED
// with overlap on; the emulation runs them as ordinary ones).
int64_t overlapped_launches();
// The values atomicAdd on unsigned counters returned since the last call,
// per counter address, in the order they were taken; the log is cleared.
std::vector<std::vector<unsigned>> take_unsigned_atomic_adds();

}  // namespace emu_device
