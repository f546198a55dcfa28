// CPU stand-in for cuda/src/gpu_compat.h, used only by the emulation harness
// (emulate_gemm.cpp, which includes it before the kernels; it defines
// GPTQKIT_GPU_EMULATION, which makes gemm_common.cuh skip the real header) so
// that the kernel sources in cuda/src/*_kernel.cuh compile as plain C++: every GPU thread of a block is a fiber,
// __syncthreads is a yield to the block's scheduler, shared memory is a function-static array,
// and warp collectives (shuffles, and on the tensor-core path ldmatrix, mma,
// cp.async) are emulated with the exact lane semantics of the hardware. A
// kernel that races, reads out of bounds of a tile, or mixes up fragment
// layouts computes wrong numbers here, on a machine without a GPU.
//
// EMU_WARP (32 or 64) sets kWarpSize; EMU_TC=1 compiles the NVIDIA
// tensor-core path (warp 32 only).
#pragma once

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#include "half.h"  // cpp/src: exact fp16 conversions

#ifndef EMU_WARP
#define EMU_WARP 32
#endif
#ifndef EMU_TC
#define EMU_TC 0
#endif

#define GPTQKIT_GPU_EMULATION 1
#define GPTQKIT_GPU_IS_HIP 0
#define GPTQKIT_NV_TENSOR_CORES EMU_TC
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

namespace emu {
// One block at a time; its threads are cooperative fibers on the calling
// OS thread (ucontext), so a block of 256 threads costs no OS threads and
// runs deterministically. A fiber runs until it reaches a barrier (or ends);
// the scheduler then runs the next one, and a round over all fibers is one
// barrier phase.
struct Copy {
  void* dst;
  unsigned char data[16];
};
struct Fiber {
  ucontext_t ctx;
  dim3 thread_idx;
  bool done = false;
  std::vector<Copy> pending;                // cp.async issued, not committed
  std::deque<std::vector<Copy>> groups;     // committed, not yet landed
};
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline int current = 0;
inline ucontext_t scheduler;
inline dim3 block_idx, block_dim;
inline const std::function<void()>* body = nullptr;
alignas(16) inline unsigned char dynamic_smem[1 << 17];
// Lane exchange slots for warp collectives (one per thread of the block).
inline uint64_t xchg[1024][8];
inline const void* addr_xchg[1024];
inline int tid() { return current; }
inline void sync() { swapcontext(&fibers[current].ctx, &scheduler); }

inline void trampoline() {
  (*body)();
  fibers[current].done = true;
  swapcontext(&fibers[current].ctx, &scheduler);
}

// Runs body() as grid x block threads, one block at a time. Exits with a
// message when the threads of a block disagree about barriers (some ended
// while others wait), which on a GPU is undefined behaviour.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& fn) {
  const int n = static_cast<int>(block.x);
  block_dim = block;
  body = &fn;
  stacks.resize(static_cast<size_t>(n));
  for (auto& st : stacks) st.resize(256 * 1024);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      block_idx = dim3(bx, by);
      std::memset(dynamic_smem, 0xA5, sizeof dynamic_smem);  // stale garbage, not zeros
      fibers.assign(static_cast<size_t>(n), Fiber{});
      for (int t = 0; t < n; ++t) {
        Fiber& f = fibers[static_cast<size_t>(t)];
        f.thread_idx = dim3(static_cast<unsigned>(t));
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[static_cast<size_t>(t)].data();
        f.ctx.uc_stack.ss_size = stacks[static_cast<size_t>(t)].size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
      }
      for (;;) {
        int finished = 0;
        for (int t = 0; t < n; ++t) {
          current = t;
          swapcontext(&scheduler, &fibers[static_cast<size_t>(t)].ctx);
          finished += fibers[static_cast<size_t>(t)].done ? 1 : 0;
        }
        if (finished == n) break;
        if (finished != 0) {
          std::fprintf(stderr, "emulation: divergent barrier in block (%u, %u): %d of %d threads ended\n", bx, by,
                       finished, n);
          std::exit(3);
        }
      }
    }
}
}  // namespace emu

#define threadIdx (emu::fibers[static_cast<size_t>(emu::current)].thread_idx)
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
inline void __syncthreads() { emu::sync(); }

constexpr int kWarpSize = EMU_WARP;
constexpr int kMaxWarpSize = 64;

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
template <typename T> inline T __ldg(const T* p) { return *p; }
struct __half { uint16_t bits; };
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return gptqkit::fp16_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {gptqkit::float_to_fp16(f)}; }

// Shuffles: every thread of the block calls them the same number of times
// (true of the kernels), so a block barrier orders the exchange.
template <typename T>
inline T gpu_shfl_xor(T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "");
  const int t = emu::tid();
  std::memcpy(&emu::xchg[t][0], &value, sizeof(T));
  emu::sync();
  const int src = (t / kWarpSize) * kWarpSize + ((t % kWarpSize) ^ lane_mask);
  T out;
  std::memcpy(&out, &emu::xchg[src][0], sizeof(T));
  emu::sync();
  return out;
}
template <typename T>
inline T gpu_warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) value += gpu_shfl_xor(value, offset);
  return value;
}

inline unsigned char* gpu_dynamic_smem() { return emu::dynamic_smem; }

#if EMU_TC
// The sm_80 primitives of gemm_tiled_kernel.cuh, with the PTX ISA's lane
// semantics. cp.async copies land as late as the ISA allows: when a
// cp.async.wait_group leaves fewer groups pending, never earlier.
inline void cp_async16(void* dst, const void* src) {
  emu::Copy c;
  c.dst = dst;
  std::memcpy(c.data, src, 16);
  emu::fibers[static_cast<size_t>(emu::current)].pending.push_back(c);
}
inline void cp_async_commit() {
  emu::Fiber& f = emu::fibers[static_cast<size_t>(emu::current)];
  f.groups.push_back(f.pending);
  f.pending.clear();
}
template <int N>
inline void cp_async_wait() {
  emu::Fiber& f = emu::fibers[static_cast<size_t>(emu::current)];
  while (static_cast<int>(f.groups.size()) > N) {
    for (auto& c : f.groups.front()) std::memcpy(c.dst, c.data, 16);
    f.groups.pop_front();
  }
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const int t = emu::tid();
  emu::addr_xchg[t] = p;
  emu::sync();
  const int lane = t % 32, base = t - lane;
  for (int i = 0; i < 4; ++i) {
    const unsigned char* row = static_cast<const unsigned char*>(emu::addr_xchg[base + 8 * i + lane / 4]);
    std::memcpy(&r[i], row + 4 * (lane % 4), 4);
  }
  emu::sync();
}
template <bool BF16>
inline float emu_half(uint32_t word, int hi) {
  const uint16_t h = static_cast<uint16_t>(hi ? word >> 16 : word & 0xffffu);
  return BF16 ? gptqkit::bf16_to_float(h) : gptqkit::fp16_to_float(h);
}
template <bool BF16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int t = emu::tid();
  for (int i = 0; i < 4; ++i) emu::xchg[t][i] = a[i];
  emu::xchg[t][4] = b0;
  emu::xchg[t][5] = b1;
  emu::sync();
  const int lane = t % 32, base = t - lane, g = lane / 4, q = lane % 4;
  auto A = [&](int row, int k) {  // a0: (g, 2q..), a1: (g+8, 2q..), a2: (g, 2q+8..), a3: (g+8, 2q+8..)
    const int src = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return emu_half<BF16>(static_cast<uint32_t>(emu::xchg[base + src][reg]), k % 2);
  };
  auto B = [&](int k, int n) {  // b0: (k 2q.., n g), b1: (k 2q+8.., n g)
    const int src = n * 4 + (k % 8) / 2, reg = k >= 8 ? 5 : 4;
    return emu_half<BF16>(static_cast<uint32_t>(emu::xchg[base + src][reg]), k % 2);
  };
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(rows[i], k) * B(k, cols[i]);
    out[i] = acc;
  }
  emu::sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
#endif

// Runtime names used by the launch helpers in gemm_common.cuh (never called).
using gpuError_t = int;
constexpr int gpuSuccess = 0;
inline int gpuGetLastError() { return 0; }
inline const char* gpuGetErrorString(int) { return ""; }
inline int gpuGetDevice(int* d) { *d = 0; return 0; }
inline int gpuSetDevice(int) { return 0; }
