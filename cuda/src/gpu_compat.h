// The one compatibility header of gptqkit's GPU code.
//
// Every file under cuda/ is compiled either by nvcc (CUDA) or by clang as HIP
// (ROCm) from the same text; no hipify step writes files. This header is the
// only place that names vendor runtime calls and intrinsics. Rules for the
// rest of the tree:
//   * use the gpu* names below, never cuda* / hip* directly;
//   * never write a literal 32 for the warp: device code uses kWarpSize (a
//     compile-time constant per target: 32 on NVIDIA and RDNA (wave32), 64 on
//     CDNA), host code asks gpu_warp_size() at run time and sizes launches so
//     that they are correct for either width;
//   * NVIDIA-only code (inline PTX, mma.sync, ldmatrix, cp.async) sits inside
//     `#if GPTQKIT_NV_TENSOR_CORES` with a portable path in the #else branch,
//     which is what HIP builds (and pre-sm_80 NVIDIA builds) compile.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__) || defined(GPTQKIT_GPU_HIP)
#define GPTQKIT_GPU_IS_HIP 1
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#include <hip/hip_bfloat16.h>
#else
#define GPTQKIT_GPU_IS_HIP 0
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

// ---- runtime API ------------------------------------------------------------
#if GPTQKIT_GPU_IS_HIP
using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
using gpuEvent_t = hipEvent_t;
using gpuDeviceProp_t = hipDeviceProp_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuPeekAtLastError hipPeekAtLastError
#define gpuGetErrorString hipGetErrorString
#define gpuGetDevice hipGetDevice
#define gpuSetDevice hipSetDevice
#define gpuGetDeviceProperties hipGetDeviceProperties
#define gpuDeviceGetAttribute hipDeviceGetAttribute
#define gpuDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define gpuDevAttrWarpSize hipDeviceAttributeWarpSize
#define gpuDevAttrComputeCapabilityMajor hipDeviceAttributeComputeCapabilityMajor
#define gpuDevAttrComputeCapabilityMinor hipDeviceAttributeComputeCapabilityMinor
#define gpuDevAttrMaxSharedMemoryPerBlockOptin hipDeviceAttributeSharedMemPerBlockOptin
#define gpuFuncSetAttribute(f, attr, v) hipFuncSetAttribute(reinterpret_cast<const void*>(f), attr, v)
#define gpuFuncAttributeMaxDynamicSharedMemorySize hipFuncAttributeMaxDynamicSharedMemorySize
#define gpuMalloc hipMalloc
#define gpuFree hipFree
#define gpuMallocAsync hipMallocAsync
#define gpuFreeAsync hipFreeAsync
#define gpuMemcpy hipMemcpy
#define gpuMemcpyAsync hipMemcpyAsync
#define gpuMemsetAsync hipMemsetAsync
#define gpuMemcpyHostToDevice hipMemcpyHostToDevice
#define gpuMemcpyDeviceToHost hipMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define gpuStreamSynchronize hipStreamSynchronize
#define gpuPointerGetAttributes hipPointerGetAttributes
#define gpuEventCreate hipEventCreate
#define gpuEventRecord hipEventRecord
#define gpuEventSynchronize hipEventSynchronize
#define gpuEventElapsedTime hipEventElapsedTime
#define gpuEventDestroy hipEventDestroy
#else
using gpuStream_t = cudaStream_t;
using gpuError_t = cudaError_t;
using gpuEvent_t = cudaEvent_t;
using gpuDeviceProp_t = cudaDeviceProp;
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuPeekAtLastError cudaPeekAtLastError
#define gpuGetErrorString cudaGetErrorString
#define gpuGetDevice cudaGetDevice
#define gpuSetDevice cudaSetDevice
#define gpuGetDeviceProperties cudaGetDeviceProperties
#define gpuDeviceGetAttribute cudaDeviceGetAttribute
#define gpuDevAttrMultiProcessorCount cudaDevAttrMultiProcessorCount
#define gpuDevAttrWarpSize cudaDevAttrWarpSize
#define gpuDevAttrComputeCapabilityMajor cudaDevAttrComputeCapabilityMajor
#define gpuDevAttrComputeCapabilityMinor cudaDevAttrComputeCapabilityMinor
#define gpuDevAttrMaxSharedMemoryPerBlockOptin cudaDevAttrMaxSharedMemoryPerBlockOptin
#define gpuFuncSetAttribute(f, attr, v) cudaFuncSetAttribute(f, attr, v)
#define gpuFuncAttributeMaxDynamicSharedMemorySize cudaFuncAttributeMaxDynamicSharedMemorySize
#define gpuMalloc cudaMalloc
#define gpuFree cudaFree
#define gpuMallocAsync cudaMallocAsync
#define gpuFreeAsync cudaFreeAsync
#define gpuMemcpy cudaMemcpy
#define gpuMemcpyAsync cudaMemcpyAsync
#define gpuMemsetAsync cudaMemsetAsync
#define gpuMemcpyHostToDevice cudaMemcpyHostToDevice
#define gpuMemcpyDeviceToHost cudaMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice cudaMemcpyDeviceToDevice
#define gpuStreamSynchronize cudaStreamSynchronize
#define gpuPointerGetAttributes cudaPointerGetAttributes
#define gpuEventCreate cudaEventCreate
#define gpuEventRecord cudaEventRecord
#define gpuEventSynchronize cudaEventSynchronize
#define gpuEventElapsedTime cudaEventElapsedTime
#define gpuEventDestroy cudaEventDestroy
#endif

// ---- 16-bit floating point ---------------------------------------------------
#if GPTQKIT_GPU_IS_HIP
using gpu_half = __half;
using gpu_bfloat16 = hip_bfloat16;  // HIP 5.x: a struct with float conversions
__device__ __forceinline__ float gpu_to_float(gpu_half x) { return __half2float(x); }
__device__ __forceinline__ float gpu_to_float(gpu_bfloat16 x) { return static_cast<float>(x); }
template <typename T> __device__ __forceinline__ T gpu_from_float(float x);
template <> __device__ __forceinline__ gpu_half gpu_from_float<gpu_half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ gpu_bfloat16 gpu_from_float<gpu_bfloat16>(float x) { return gpu_bfloat16(x); }
#else
using gpu_half = __half;
using gpu_bfloat16 = __nv_bfloat16;
__device__ __forceinline__ float gpu_to_float(gpu_half x) { return __half2float(x); }
__device__ __forceinline__ float gpu_to_float(gpu_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T gpu_from_float(float x);
template <> __device__ __forceinline__ gpu_half gpu_from_float<gpu_half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ gpu_bfloat16 gpu_from_float<gpu_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif
__device__ __forceinline__ float gpu_to_float(float x) { return x; }
template <> __device__ __forceinline__ float gpu_from_float<float>(float x) { return x; }

// ---- warp / wavefront ------------------------------------------------------------
// kWarpSize is exact in device code. In host code it is only the upper bound
// (64) for sizing shared arrays; launches use gpu_warp_size() instead.
#if GPTQKIT_GPU_IS_HIP
#if defined(__AMDGCN_WAVEFRONT_SIZE)
constexpr int kWarpSize = __AMDGCN_WAVEFRONT_SIZE;
#elif defined(__HIP_DEVICE_COMPILE__)
// Guessing 64 here would silently break wave32 targets (RDNA): launches are
// sized by the run-time width, so kernels would skip half their rows.
#error "gptqkit: this HIP compiler does not define __AMDGCN_WAVEFRONT_SIZE; the device code needs the wavefront size at compile time"
#else
constexpr int kWarpSize = 64;  // host pass: the upper bound only
#endif
#else
constexpr int kWarpSize = 32;
#endif
constexpr int kMaxWarpSize = 64;

// Lane mask type wide enough for a full wavefront.
#if GPTQKIT_GPU_IS_HIP
using gpu_lane_mask_t = uint64_t;
#else
using gpu_lane_mask_t = unsigned;
#endif

template <typename T>
__device__ __forceinline__ T gpu_shfl_xor(T value, int lane_mask) {
#if GPTQKIT_GPU_IS_HIP
  return __shfl_xor(value, lane_mask, kWarpSize);
#else
  return __shfl_xor_sync(0xffffffffu, value, lane_mask, kWarpSize);
#endif
}

template <typename T>
__device__ __forceinline__ T gpu_shfl(T value, int src_lane) {
#if GPTQKIT_GPU_IS_HIP
  return __shfl(value, src_lane, kWarpSize);
#else
  return __shfl_sync(0xffffffffu, value, src_lane, kWarpSize);
#endif
}

// Sum over the whole warp/wavefront; every lane gets the result.
template <typename T>
__device__ __forceinline__ T gpu_warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) value += gpu_shfl_xor(value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ T gpu_warp_max(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    T other = gpu_shfl_xor(value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// ---- NVIDIA tensor-core guard -------------------------------------------------
// True only while nvcc compiles device code for sm_80 or newer; inline PTX
// (mma.sync, ldmatrix, cp.async) must sit behind it.
#if !GPTQKIT_GPU_IS_HIP && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define GPTQKIT_NV_TENSOR_CORES 1
#else
#define GPTQKIT_NV_TENSOR_CORES 0
#endif

#if GPTQKIT_NV_TENSOR_CORES
// The sm_80 primitives of the tensor-core kernels (GEMM tiles, Hessian
// tiles). The CPU emulation (tests/gpu_emulation/emu_compat.h) implements
// the same ones with the PTX ISA's lane semantics (and __byte_perm).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// A float4 read through L2 only (ld.global.cg): for data that other blocks
// of the running kernel wrote (split-K partial sums), which this SM's L1,
// not coherent with them, must not serve.
__device__ __forceinline__ float4 load_float4_l2(const float* p) {
  return __ldcg(reinterpret_cast<const float4*>(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  // .cg: cache in L2 only; streamed operands are read once per block.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
// The same, but when `valid` is false nothing is read and the 16 bytes are
// zero-filled (src-size 0): tiles that overhang a matrix edge load zeros
// without a branch around the copy. `src` must still be a valid address.
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// Four transposed 8 x 8 matrices: lane l receives elements (rows 2 (l % 4)
// and 2 (l % 4) + 1, column l / 4) of matrix i in register i. Turns
// tiles stored k-major (rows of X) into mma fragments that want pairs along k.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// d += A (16 x 16, row) * B (16 x 8, col) with fp16 or bf16 operands and fp32
// accumulators; fragments in the PTX ISA's m16n8k16 lane layout.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
// Lane-wise arithmetic on two 16-bit floats packed in a 32-bit word (fp16 or
// bf16, low half first), each result rounded once to nearest even: the
// register-resident dequantization of the mma GEMM kernel.
// `op` gets the two operands as __half2 or __nv_bfloat162.
template <bool BF16, typename Op>
__device__ __forceinline__ uint32_t half2_raw_op(uint32_t a, uint32_t b, Op op) {
  using Pair = typename std::conditional<BF16, __nv_bfloat162, __half2>::type;
  const Pair v = op(*reinterpret_cast<const Pair*>(&a), *reinterpret_cast<const Pair*>(&b));
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <bool BF16>
__device__ __forceinline__ uint32_t hadd2_raw(uint32_t a, uint32_t b) {
  return half2_raw_op<BF16>(a, b, [](auto x, auto y) { return __hadd2(x, y); });
}
template <bool BF16>
__device__ __forceinline__ uint32_t hsub2_raw(uint32_t a, uint32_t b) {
  return half2_raw_op<BF16>(a, b, [](auto x, auto y) { return __hsub2(x, y); });
}
template <bool BF16>
__device__ __forceinline__ uint32_t hmul2_raw(uint32_t a, uint32_t b) {
  return half2_raw_op<BF16>(a, b, [](auto x, auto y) { return __hmul2(x, y); });
}
// a * b + c, fp16 pairs, one rounding (one HFMA2).
__device__ __forceinline__ uint32_t hfma2_raw(uint32_t a, uint32_t b, uint32_t c) {
  const __half2 v = __hfma2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b),
                            *reinterpret_cast<const __half2*>(&c));
  return *reinterpret_cast<const uint32_t*>(&v);
}
// (a & mask) | bits in one LOP3. Written as C++ with two immediate
// constants, ptxas emits two logic operations (LOP3 takes one immediate);
// here the constants become operands it keeps in registers across a loop.
template <uint32_t kMask, uint32_t kBits>
__device__ __forceinline__ uint32_t and_or_u32(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "n"(kMask), "n"(kBits));
  return r;
}
#endif  // GPTQKIT_NV_TENSOR_CORES

// ---- NVIDIA Hopper warpgroup MMA guard ------------------------------------------
// True only while nvcc compiles device code for the arch-specific sm_90a
// target (CMAKE_CUDA_ARCHITECTURES "90a-real"): wgmma exists nowhere else,
// not in plain sm_90 code nor on newer GPUs. The host side knows whether that
// code was built from GPTQKIT_CUDA_HAS_SM90A (cuda/CMakeLists.txt) and runs
// it only on compute capability 9.0.
#if GPTQKIT_NV_TENSOR_CORES && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPTQKIT_NV_WGMMA 1
#else
#define GPTQKIT_NV_WGMMA 0
#endif

#if GPTQKIT_NV_WGMMA
// The sm_90a primitives of the wgmma GEMM kernel (gemm_wgmma_kernel.cuh);
// the CPU emulation implements the same ones, executing each group of
// wgmma as late as wgmma.wait_group allows.
// Orders this thread's generic-proxy shared-memory writes (cp.async
// included) before later async-proxy reads (wgmma operands from shared memory).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
#define GPTQKIT_WGMMA_N64_OPERANDS \
  "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
#define GPTQKIT_WGMMA_N64_PRED "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
#define GPTQKIT_WGMMA_D32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define GPTQKIT_WGMMA_N128_OPERANDS \
  "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
#define GPTQKIT_WGMMA_N128_PRED "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
#define GPTQKIT_WGMMA_D64(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// d (64 x BN, fp32) += A (64 x 16, from registers: each warp of the
// warpgroup holds 16 rows in the m16n8k16 A-fragment layout) * B (16 x BN,
// in shared memory, described by `desc`; K-major). Asynchronous: a, d and
// the shared memory must stay untouched until wgmma_wait retires the group.
template <bool BF16, int BN>
__device__ __forceinline__ void wgmma_rs(float (&d)[BN / 2], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(BN == 64 || BN == 128, "wgmma_rs: instantiated for 64 and 128 columns");
  if constexpr (BN == 64 && BF16) {
    asm volatile(GPTQKIT_WGMMA_N64_PRED "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " GPTQKIT_WGMMA_N64_OPERANDS
                 : GPTQKIT_WGMMA_D32(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
  } else if constexpr (BN == 64) {
    asm volatile(GPTQKIT_WGMMA_N64_PRED "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " GPTQKIT_WGMMA_N64_OPERANDS
                 : GPTQKIT_WGMMA_D32(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
  } else if constexpr (BF16) {
    asm volatile(GPTQKIT_WGMMA_N128_PRED "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " GPTQKIT_WGMMA_N128_OPERANDS
                 : GPTQKIT_WGMMA_D64(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
  } else {
    asm volatile(GPTQKIT_WGMMA_N128_PRED "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " GPTQKIT_WGMMA_N128_OPERANDS
                 : GPTQKIT_WGMMA_D64(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
  }
}
#endif  // GPTQKIT_NV_WGMMA

// ---- kernel launch -----------------------------------------------------------------
// GPTQKIT_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...) is
// kernel<<<grid, block, smem_bytes, stream>>>(args...). Every launch goes
// through it so that the CPU emulation (tests/gpu_emulation) can run the
// host code of cuda/src unchanged; the kernel comes last because its
// template arguments may contain commas.
#define GPTQKIT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>

// ---- programmatic dependent launch (sm_90+) ------------------------------------------
// GPTQKIT_LAUNCH_OVERLAPPED(overlap, grid, block, smem, stream, kernel)(args...)
// launches like GPTQKIT_LAUNCH, and with `overlap` (CUDA, compute capability
// 9.0+) as a programmatic dependent launch: the kernel may start while the
// kernel before it on the stream is still finishing (when that one calls
// allow_dependent_grids(), or as its blocks exit), instead of after it has
// completed. Such a kernel must call wait_for_prior_grids() before it reads
// anything an earlier kernel may write and before it writes any global
// memory (its output may reuse memory an earlier kernel still reads); what
// it does before -- L2 prefetches of the weights -- overlaps the previous
// kernel's tail. Both device calls are no-ops where the kernel was launched
// the ordinary way, below sm_90 and on ROCm (which launches ordinarily).
__device__ __forceinline__ void wait_for_prior_grids() {
#if !GPTQKIT_GPU_IS_HIP && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependent_grids() {
#if !GPTQKIT_GPU_IS_HIP && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Asks L2 for the 128-byte line at `p` (a read-only operand), without waiting.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if !GPTQKIT_GPU_IS_HIP && defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#else
  (void)p;
#endif
}

#if GPTQKIT_GPU_IS_HIP
#define GPTQKIT_LAUNCH_OVERLAPPED(overlap, grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#else
template <typename... Params>
struct OverlappedLaunch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  gpuStream_t stream;
  bool overlap;
  // Errors reach gpuGetLastError like those of <<<...>>>.
  template <typename... Args>
  void operator()(Args&&... args) const {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = overlap ? 1 : 0;
    (void)cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  }
};
template <typename... Params>
OverlappedLaunch<Params...> make_overlapped_launch(dim3 grid, dim3 block, size_t smem, gpuStream_t stream,
                                                   bool overlap, void (*kernel)(Params...)) {
  return OverlappedLaunch<Params...>{kernel, grid, block, smem, stream, overlap};
}
#define GPTQKIT_LAUNCH_OVERLAPPED(overlap, grid, block, smem, stream, ...) \
  make_overlapped_launch(dim3(grid), dim3(block), static_cast<size_t>(smem), stream, overlap, __VA_ARGS__)
#endif

// ---- host helpers -----------------------------------------------------------------
// Warp size of the current device (32 or 64), asked at run time.
inline int gpu_warp_size() {
  int dev = 0, size = 32;
  if (gpuGetDevice(&dev) != gpuSuccess) return 32;
  if (gpuDeviceGetAttribute(&size, gpuDevAttrWarpSize, dev) != gpuSuccess) return 32;
  return size;
}

// ---- kernel attributes (appended for the solver) ---------------------------------
// binaryVersion tells which compiled architecture the runtime picked for the
// current device (e.g. whether a kernel's sm_80+ tensor-core body is present).
#if GPTQKIT_GPU_IS_HIP
using gpuFuncAttributes = hipFuncAttributes;
#define gpuFuncGetAttributes(attr, f) hipFuncGetAttributes(attr, reinterpret_cast<const void*>(f))
#else
using gpuFuncAttributes = cudaFuncAttributes;
#define gpuFuncGetAttributes(attr, f) cudaFuncGetAttributes(attr, f)
#endif

// ---- dynamic shared memory (appended for the GEMM) -------------------------------
// The block's dynamic shared memory (the third launch argument), 16-byte
// aligned. One accessor instead of `extern __shared__` in each kernel, so the
// CPU emulation of the kernels (tests/gpu_emulation) can supply its own.
__device__ __forceinline__ unsigned char* gpu_dynamic_smem() {
  extern __shared__ __align__(16) unsigned char gptqkit_dynamic_smem[];
  return gptqkit_dynamic_smem;
}
