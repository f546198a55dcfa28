// CPU stand-in for cuda/src/gpu_compat.h, used only by the emulation
// harnesses (emulate_gemm.cpp, and the solver test tests/cpp/test_gpu_emulation.cpp
// through emu_unit.cpp). They include it before any GPU source and define
// GPTQKIT_GPU_EMULATION, which makes gemm_common.cuh and
// gpu_solver_internal.h skip the real header, so the sources in cuda/src
// (kernels and their host launchers) compile as plain C++:
//   * every GPU thread of a block is a cooperative fiber (ucontext, one OS
//     thread, deterministic); blocks of a grid run one after another;
//   * __syncthreads is a block barrier; warp collectives (shuffles, and on
//     the tensor-core path ldmatrix and mma) synchronise only the lanes of
//     their warp, with the hardware's lane semantics, so a warp may leave a
//     kernel early while the others go on;
//   * the order in which threads run between two barriers is ascending, or
//     reversed / shuffled per round with EMU_SCHEDULE=reverse / random
//     (random also shuffles the order of the blocks);
//   * a barrier that some threads of the block (or lanes of the warp) can no
//     longer reach is reported, with the kernel's block, and ends the
//     program: on a GPU it is undefined behaviour;
//   * __shared__ arrays are function statics, and the runtime API
//     (emu_runtime.h) works on host memory with a guard page after every
//     device buffer, so a kernel that reads or writes past the end of a
//     buffer faults.
// A kernel that races on shared memory, mixes up fragment layouts or reads a
// cp.async chunk before it has landed computes wrong numbers here.
//
// EMU_WARP (32 or 64) sets kWarpSize; EMU_TC=1 compiles the NVIDIA
// tensor-core paths (warp 32 only).
#pragma once

#include <ucontext.h>

#include <math.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <deque>
#include <numeric>
#include <random>
#include <string>
#include <functional>
#include <vector>

#include "half.h"  // cpp/src: exact fp16 / bf16 conversions

#ifndef EMU_WARP
#define EMU_WARP 32
#endif
#ifndef EMU_TC
#define EMU_TC 0
#endif
#if EMU_TC && EMU_WARP != 32
#error "the tensor-core path exists for 32-wide warps only"
#endif

#define GPTQKIT_GPU_EMULATION 1
#define GPTQKIT_GPU_IS_HIP 0
#define GPTQKIT_NV_TENSOR_CORES EMU_TC
#define GPTQKIT_NV_WGMMA EMU_TC
#define GPTQKIT_CUDA_HAS_SM90A EMU_TC
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
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
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

constexpr int kWarpSize = EMU_WARP;
constexpr int kMaxWarpSize = 64;

namespace emu {
// A fiber runs until it reaches a barrier (block or warp) or ends; the
// scheduler then runs the next runnable one. When every live fiber waits,
// warps whose live lanes all wait at a warp collective are released, else
// the block barrier is released once every thread has reached it.
enum class Wait : uint8_t { kNone, kBlock, kWarp, kWarpgroup };
struct Copy {
  void* dst;
  unsigned char data[16];
};
// One wgmma of a thread: where its accumulators and A registers live (read
// and written only when the group retires) and the B descriptor.
struct Wgmma {
  float* d;
  const uint32_t* a;
  uint64_t desc;
  int bn;
  bool bf16;
};
struct Fiber {
  ucontext_t ctx;
  dim3 thread_idx;
  bool done = false;
  Wait wait = Wait::kNone;
  std::vector<Copy> pending;                // cp.async issued, not committed
  std::deque<std::vector<Copy>> groups;     // committed, not yet landed
  std::vector<Wgmma> wgmma_pending;         // issued, not committed
  std::deque<std::vector<Wgmma>> wgmma_groups;  // committed, not yet retired
};
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline int current = 0;
inline ucontext_t scheduler;
inline dim3 block_idx, block_dim, grid_dim;
inline const char* kernel_name = "";
inline std::vector<std::string> launched;  // kernel names, in launch order (tests ask which kernel ran)
inline const std::function<void()>* body = nullptr;
constexpr size_t kDynamicSmemBytes = 1 << 17;
alignas(16) inline unsigned char dynamic_smem[kDynamicSmemBytes];
// Lane exchange slots for warp collectives (one per thread of the block).
inline uint64_t xchg[1024][8];
inline const void* addr_xchg[1024];
inline int tid() { return current; }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation: %s in %s, block (%u, %u, %u)\n", what, kernel_name, block_idx.x, block_idx.y,
               block_idx.z);
  std::fflush(stderr);
  std::exit(3);
}

inline void wait_at(Wait w) {
  fibers[static_cast<size_t>(current)].wait = w;
  swapcontext(&fibers[static_cast<size_t>(current)].ctx, &scheduler);
}
inline void block_sync() { wait_at(Wait::kBlock); }
inline void warp_sync() { wait_at(Wait::kWarp); }
inline void warpgroup_sync() { wait_at(Wait::kWarpgroup); }

inline void trampoline() {
  (*body)();
  fibers[static_cast<size_t>(current)].done = true;
  swapcontext(&fibers[static_cast<size_t>(current)].ctx, &scheduler);
}

// Releases waiting fibers after a round in which every live fiber stopped;
// false when the block is finished.
inline bool release(int n) {
  int done = 0, at_block = 0;
  for (const Fiber& f : fibers) {
    done += f.done ? 1 : 0;
    at_block += (!f.done && f.wait == Wait::kBlock) ? 1 : 0;
  }
  if (done == n) return false;
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int w1 = w0 + kWarpSize < n ? w0 + kWarpSize : n;
    int waiting = 0, ended = 0;
    for (int t = w0; t < w1; ++t) {
      waiting += fibers[static_cast<size_t>(t)].wait == Wait::kWarp && !fibers[static_cast<size_t>(t)].done ? 1 : 0;
      ended += fibers[static_cast<size_t>(t)].done ? 1 : 0;
    }
    if (waiting == 0) continue;
    if (waiting != w1 - w0) {
      if (waiting + ended == w1 - w0) fail("warp collective with lanes that have left the kernel");
      continue;  // other lanes are still at a block barrier: reported below if nothing moves
    }
    for (int t = w0; t < w1; ++t) fibers[static_cast<size_t>(t)].wait = Wait::kNone;
    released = true;
  }
  if (released) return true;
  // Warpgroups (4 consecutive warps of 32) whose threads all wait at a
  // warpgroup collective (wgmma.wait_group).
  for (int g0 = 0; g0 < n; g0 += 128) {
    const int g1 = g0 + 128 < n ? g0 + 128 : n;
    int waiting = 0, ended = 0;
    for (int t = g0; t < g1; ++t) {
      waiting += fibers[static_cast<size_t>(t)].wait == Wait::kWarpgroup && !fibers[static_cast<size_t>(t)].done ? 1 : 0;
      ended += fibers[static_cast<size_t>(t)].done ? 1 : 0;
    }
    if (waiting == 0) continue;
    if (g1 - g0 != 128) fail("warpgroup collective in a block that is not a whole number of warpgroups");
    if (waiting != g1 - g0) {
      if (waiting + ended == g1 - g0) fail("warpgroup collective with threads that have left the kernel");
      continue;
    }
    for (int t = g0; t < g1; ++t) fibers[static_cast<size_t>(t)].wait = Wait::kNone;
    released = true;
  }
  if (released) return true;
  if (at_block == n - done) {
    if (done != 0) fail("__syncthreads that some threads of the block never reach (they returned)");
    for (Fiber& f : fibers) f.wait = Wait::kNone;
    return true;
  }
  fail("lanes of one warp wait at different barriers (warp collective vs __syncthreads)");
}

enum class Schedule { kForward, kReverse, kRandom };
inline Schedule schedule() {
  static const Schedule s = [] {
    const char* v = std::getenv("EMU_SCHEDULE");
    if (v != nullptr && std::strcmp(v, "reverse") == 0) return Schedule::kReverse;
    if (v != nullptr && std::strcmp(v, "random") == 0) return Schedule::kRandom;
    return Schedule::kForward;
  }();
  return s;
}

// Runs body() as grid x block threads, one block at a time.
inline void launch(dim3 grid, dim3 block, size_t smem, const char* name, const std::function<void()>& fn) {
  const int n = static_cast<int>(block.x);
  kernel_name = name;
  launched.emplace_back(name);
  if (block.y != 1 || block.z != 1) fail("unsupported launch shape (block.y or block.z > 1)");
  if (n < 1 || n > 1024) fail("block size outside 1..1024");
  if (smem > kDynamicSmemBytes) fail("dynamic shared memory larger than the emulation provides");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid (a launch error on a GPU)");
  block_dim = block;
  grid_dim = grid;
  body = &fn;
  stacks.resize(static_cast<size_t>(n));
  for (auto& st : stacks) st.resize(256 * 1024);
  // Blocks run one after another, in grid order or (EMU_SCHEDULE=random)
  // shuffled: a kernel whose blocks depend on each other's results is wrong
  // on a GPU, where they run in any order.
  std::vector<dim3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) blocks.emplace_back(bx, by, bz);
  if (schedule() == Schedule::kRandom)
    std::shuffle(blocks.begin(), blocks.end(), std::mt19937(grid.x * 31u + grid.y * 7u + grid.z));
  for (const dim3 b : blocks) {
    const unsigned bx = b.x, by = b.y * 131u + b.z;
    block_idx = b;
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
    std::vector<int> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::mt19937 rng(bx * 7919u + by);
    do {
      // Which thread runs first between two barriers is the hardware's
      // choice: EMU_SCHEDULE=reverse / random tries other orders, so code
      // that is right only for one of them shows up.
      if (schedule() == Schedule::kReverse) std::reverse(order.begin(), order.end());
      if (schedule() == Schedule::kRandom) std::shuffle(order.begin(), order.end(), rng);
      for (const int t : order) {
        Fiber& f = fibers[static_cast<size_t>(t)];
        if (f.done || f.wait != Wait::kNone) continue;
        current = t;
        swapcontext(&scheduler, &f.ctx);
      }
    } while (release(n));
  }
}

// GPTQKIT_LAUNCH(grid, block, smem, stream, kernel)(args...): the kernel's
// arguments are evaluated once, as for a real launch, and each thread gets
// its own copies of them.
template <typename Body>
struct Launch {
  dim3 grid, block;
  size_t smem;
  const char* name;
  Body body;
  template <typename... Args>
  void operator()(Args&&... args) const {
    launch(grid, block, smem, name, [&] { body(args...); });
  }
};
template <typename Body>
Launch<Body> make_launch(dim3 grid, dim3 block, size_t smem, const void* /*stream*/, const char* name, Body body) {
  return Launch<Body>{grid, block, smem, name, body};
}
}  // namespace emu

#define GPTQKIT_LAUNCH(grid, block, smem, stream, ...)                                                  \
  emu::make_launch(dim3(grid), dim3(block), static_cast<size_t>(smem), static_cast<const void*>(stream), \
                   #__VA_ARGS__, [](auto&... emu_args) { __VA_ARGS__(emu_args...); })

// Kernels run one after another, each after the previous one completed:
// every programmatic dependent launch is an ordinary one here. Those asked
// for are counted (tests check the routing that asks for them).
namespace emu {
inline int64_t overlapped_launches = 0;
inline void note_launch(bool overlap) { overlapped_launches += overlap ? 1 : 0; }
}  // namespace emu
#define GPTQKIT_LAUNCH_OVERLAPPED(overlap, grid, block, smem, stream, ...) \
  (emu::note_launch(overlap), GPTQKIT_LAUNCH(grid, block, smem, stream, __VA_ARGS__))
inline void wait_for_prior_grids() {}
inline void allow_dependent_grids() {}
inline void prefetch_l2(const void*) {}

#define threadIdx (emu::fibers[static_cast<size_t>(emu::current)].thread_idx)
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
inline void __syncthreads() { emu::block_sync(); }

// ---- device intrinsics -------------------------------------------------------------
// The emulation is compiled with -ffp-contract=off: no fused multiply-add
// where the source does not ask for one, as nvcc's _rn intrinsics promise.
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
// One OS thread runs every fiber and a fiber is never preempted inside an
// atomic, so plain read-modify-writes are atomic here.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
namespace emu {
// What every atomicAdd on an unsigned returned, with its address: blocks
// run one after another here, so a kernel that takes split-K tickets can
// be wrong in ways that only the tickets show (e.g. every block reducing,
// the last one correctly).
inline std::vector<std::pair<const void*, unsigned>> unsigned_atomic_adds;
}  // namespace emu
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  emu::unsigned_atomic_adds.emplace_back(p, old);
  return old;
}
inline unsigned atomicExch(unsigned* p, unsigned v) { const unsigned old = *p; *p = v; return old; }
// Blocks run one after another here, so every store of an earlier block is
// visible to a later one: the fence has nothing to order.
inline void __threadfence() {}
inline double atomicAdd(double* p, double v) { const double old = *p; *p = old + v; return old; }

// ---- 16-bit floating point ---------------------------------------------------------
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
using gpu_half = __half;
using gpu_bfloat16 = __nv_bfloat16;
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return gptqkit::fp16_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {gptqkit::float_to_fp16(f)}; }
inline float gpu_to_float(gpu_half x) { return __half2float(x); }
inline float gpu_to_float(gpu_bfloat16 x) { return gptqkit::bf16_to_float(x.bits); }
inline float gpu_to_float(float x) { return x; }

// ---- warp collectives --------------------------------------------------------------
// Two warp barriers per exchange: every lane publishes, then reads, and no
// lane overwrites its slot before the whole warp has read.
template <typename T>
inline T emu_shuffle_from(T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "");
  const int t = emu::tid();
  std::memcpy(&emu::xchg[t][0], &value, sizeof(T));
  emu::warp_sync();
  const int src = (t / kWarpSize) * kWarpSize + (src_lane % kWarpSize);
  T out;
  std::memcpy(&out, &emu::xchg[src][0], sizeof(T));
  emu::warp_sync();
  return out;
}
template <typename T>
inline T gpu_shfl_xor(T value, int lane_mask) {
  return emu_shuffle_from(value, (emu::tid() % kWarpSize) ^ lane_mask);
}
template <typename T>
inline T gpu_shfl(T value, int src_lane) {
  return emu_shuffle_from(value, src_lane);
}
template <typename T>
inline T gpu_warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) value += gpu_shfl_xor(value, offset);
  return value;
}
template <typename T>
inline T gpu_warp_max(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    T other = gpu_shfl_xor(value, offset);
    value = other > value ? other : value;
  }
  return value;
}

inline unsigned char* gpu_dynamic_smem() { return emu::dynamic_smem; }

#if EMU_TC
// The sm_80 primitives of gpu_compat.h, with the PTX ISA's lane semantics.
// cp.async copies land as late as the ISA allows: when a cp.async.wait_group
// leaves fewer groups pending, never earlier.
inline void cp_async16_zfill(void* dst, const void* src, bool valid) {
  emu::Copy c;
  c.dst = dst;
  if (valid) {
    std::memcpy(c.data, src, 16);
  } else {
    std::memset(c.data, 0, 16);
  }
  emu::fibers[static_cast<size_t>(emu::current)].pending.push_back(c);
}
inline void cp_async16(void* dst, const void* src) { cp_async16_zfill(dst, src, true); }
inline float4 load_float4_l2(const float* p) { float4 v; std::memcpy(&v, p, sizeof(v)); return v; }
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
  emu::warp_sync();
  const int lane = t % 32, base = t - lane;
  for (int i = 0; i < 4; ++i) {
    const unsigned char* row = static_cast<const unsigned char*>(emu::addr_xchg[base + 8 * i + lane / 4]);
    std::memcpy(&r[i], row + 4 * (lane % 4), 4);
  }
  emu::warp_sync();
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const int t = emu::tid();
  emu::addr_xchg[t] = p;
  emu::warp_sync();
  const int lane = t % 32, base = t - lane;
  for (int i = 0; i < 4; ++i) {
    // Matrix i's rows are the addresses of lanes 8 i .. 8 i + 7; this lane
    // takes column lane / 4 of rows 2 (lane % 4) and 2 (lane % 4) + 1.
    const int row0 = 2 * (lane % 4), col = lane / 4;
    uint16_t lo, hi;
    std::memcpy(&lo, static_cast<const unsigned char*>(emu::addr_xchg[base + 8 * i + row0]) + 2 * col, 2);
    std::memcpy(&hi, static_cast<const unsigned char*>(emu::addr_xchg[base + 8 * i + row0 + 1]) + 2 * col, 2);
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  emu::warp_sync();
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
  emu::warp_sync();
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
  emu::warp_sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
// Two 16-bit floats per word, lane-wise, each result rounded once (the
// operands the mma kernel uses make every float intermediate exact).
template <bool BF16>
inline uint32_t emu_half2_op(uint32_t a, uint32_t b, int op) {
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const float x = emu_half<BF16>(a, h), y = emu_half<BF16>(b, h);
    const float r = op == 0 ? x + y : op == 1 ? x - y : x * y;
    const uint16_t bits = BF16 ? gptqkit::float_to_bf16(r) : gptqkit::float_to_fp16(r);
    out |= static_cast<uint32_t>(bits) << (16 * h);
  }
  return out;
}
// ---- sm_90a warpgroup MMA ----------------------------------------------------------
// Shared addresses are offsets into the dynamic shared memory plus a base
// that is 16- but not 1024-aligned, so a kernel that assumes an aligned
// window for the 128-byte swizzle gets the hardware's (address-based)
// pattern wrong here.
constexpr uint32_t kEmuSmemWindowBase = 0x90;
inline uint32_t smem_addr(const void* p) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  if (b < emu::dynamic_smem || b > emu::dynamic_smem + emu::kDynamicSmemBytes)
    emu::fail("smem_addr of a pointer outside the dynamic shared memory");
  return kEmuSmemWindowBase + static_cast<uint32_t>(b - emu::dynamic_smem);
}
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
// Records the operation; it runs when a wgmma_wait retires its group: the
// A registers, the accumulators and the shared-memory B are read then (the
// latest the ISA allows), so inputs changed before the wait give wrong sums.
template <bool BF16, int BN>
inline void wgmma_rs(float (&d)[BN / 2], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(BN == 64 || BN == 128, "wgmma_rs: instantiated for 64 and 128 columns");
  emu::fibers[static_cast<size_t>(emu::current)].wgmma_pending.push_back(emu::Wgmma{d, a, desc, BN, BF16});
}
inline void wgmma_commit() {
  emu::Fiber& f = emu::fibers[static_cast<size_t>(emu::current)];
  f.wgmma_groups.push_back(f.wgmma_pending);
  f.wgmma_pending.clear();
}
// B element (k, n) of a K-major operand in the 128-byte swizzle layout:
// row n at (n / 8) * stride + (n % 8) * 128 from the start, k at 2k bytes,
// then the 16-byte piece (address bits 4-6) XOR the row in the atom (bits 7-9).
inline const unsigned char* emu_sw128_element(uint64_t desc, int k, int n) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  if ((desc >> 62) != 1u) emu::fail("wgmma descriptor: only the 128-byte swizzle layout is emulated");
  if (((desc >> 49) & 7u) != 0u) emu::fail("wgmma descriptor: a non-zero base offset is not emulated");
  uint32_t addr = start + static_cast<uint32_t>(n / 8) * stride + static_cast<uint32_t>(n % 8) * 128u + 2u * k;
  addr ^= ((addr >> 7) & 7u) << 4;
  if (addr < kEmuSmemWindowBase || addr + 2 > kEmuSmemWindowBase + emu::kDynamicSmemBytes)
    emu::fail("wgmma B operand outside the dynamic shared memory");
  return emu::dynamic_smem + (addr - kEmuSmemWindowBase);
}
// Retires the warpgroup's oldest groups until at most N are pending: one
// thread computes every thread's accumulators (A in the m16n8k16 layout per
// warp; D: d[4i + e] at row 16 warp + lane / 4 + 8 (e / 2), column
// 8i + 2 (lane % 4) + e % 2).
template <int N>
inline void wgmma_wait() {
  const int t = emu::tid(), g0 = t - t % 128;
  emu::warpgroup_sync();
  if (t == g0) {
    auto& lead = emu::fibers[static_cast<size_t>(g0)].wgmma_groups;
    while (static_cast<int>(lead.size()) > N) {
      const size_t ops = lead.front().size();
      for (int u = g0; u < g0 + 128; ++u) {
        const auto& q = emu::fibers[static_cast<size_t>(u)].wgmma_groups;
        if (q.size() != lead.size() || q.front().size() != ops) emu::fail("wgmma groups differ between the threads of a warpgroup");
      }
      for (size_t op = 0; op < ops; ++op) {
        const emu::Wgmma& w0 = lead.front()[op];
        auto A = [&](int row, int k) {
          const int warp = row / 16, r = row % 16;
          const int lane = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
          const uint32_t word = emu::fibers[static_cast<size_t>(g0 + warp * 32 + lane)].wgmma_groups.front()[op].a[reg];
          return w0.bf16 ? emu_half<true>(word, k % 2) : emu_half<false>(word, k % 2);
        };
        auto B = [&](int k, int n) {
          uint16_t h;
          std::memcpy(&h, emu_sw128_element(w0.desc, k, n), 2);
          return w0.bf16 ? gptqkit::bf16_to_float(h) : gptqkit::fp16_to_float(h);
        };
        std::vector<float> out(static_cast<size_t>(64 * w0.bn));
        for (int row = 0; row < 64; ++row)
          for (int n = 0; n < w0.bn; ++n) {
            const int warp = row / 16, r = row % 16;
            const int lane = (r % 8) * 4 + (n % 8) / 2, e = (r >= 8 ? 2 : 0) + n % 2;
            const emu::Wgmma& mine = emu::fibers[static_cast<size_t>(g0 + warp * 32 + lane)].wgmma_groups.front()[op];
            if (mine.desc != w0.desc || mine.bn != w0.bn) emu::fail("wgmma operands differ between the threads of a warpgroup");
            float acc = mine.d[4 * (n / 8) + e];
            for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, n);
            out[static_cast<size_t>(row * w0.bn + n)] = acc;
          }
        for (int row = 0; row < 64; ++row)
          for (int n = 0; n < w0.bn; ++n) {
            const int warp = row / 16, r = row % 16;
            const int lane = (r % 8) * 4 + (n % 8) / 2, e = (r >= 8 ? 2 : 0) + n % 2;
            emu::fibers[static_cast<size_t>(g0 + warp * 32 + lane)].wgmma_groups.front()[op].d[4 * (n / 8) + e] =
                out[static_cast<size_t>(row * w0.bn + n)];
          }
      }
      for (int u = g0; u < g0 + 128; ++u) emu::fibers[static_cast<size_t>(u)].wgmma_groups.pop_front();
    }
  }
  emu::warpgroup_sync();
}
template <bool BF16> inline uint32_t hadd2_raw(uint32_t a, uint32_t b) { return emu_half2_op<BF16>(a, b, 0); }
template <bool BF16> inline uint32_t hsub2_raw(uint32_t a, uint32_t b) { return emu_half2_op<BF16>(a, b, 1); }
template <bool BF16> inline uint32_t hmul2_raw(uint32_t a, uint32_t b) { return emu_half2_op<BF16>(a, b, 2); }
template <uint32_t kMask, uint32_t kBits> inline uint32_t and_or_u32(uint32_t a) { return (a & kMask) | kBits; }
// fp16 a * b + c: the product of two fp16 values is exact in float, and the
// kernels use the sum only where it is exact too (then both roundings agree).
inline uint32_t hfma2_raw(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const float r = std::fma(emu_half<false>(a, h), emu_half<false>(b, h), emu_half<false>(c, h));
    out |= static_cast<uint32_t>(gptqkit::float_to_fp16(r)) << (16 * h);
  }
  return out;
}
#endif

// Byte i of the result is byte (selector nibble i) of the 8-byte value b:a.
inline uint32_t __byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<uint32_t>((v >> (8 * ((selector >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return out;
}

#include "emu_runtime.h"
