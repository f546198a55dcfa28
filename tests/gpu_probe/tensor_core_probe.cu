// Conformance probe of the tensor-core primitives the GPU kernels rely on
// (cuda/src/gpu_compat.h): ldmatrix.x4, mma.m16n8k16 (fp16, bf16), and on
// sm_90a wgmma.m64nNk16 with A from registers and B from shared memory in the
// 128-byte swizzle layout, stored and described exactly as the wgmma GEMM
// kernel does (sw128_offset, sw128_kmajor_desc). Each runs once on small
// integer inputs, so every product and sum is exact in fp32, and is compared
// bit for bit with a plain host product of the logical matrices. The lane
// layouts are restated here from the PTX ISA, independently of the kernels.
//
// Built twice:
//   * against the CPU emulation (ctest `tensor_core_probe`): the emulator's
//     model of the instructions agrees with the layouts the kernels assume;
//   * with nvcc on an NVIDIA GPU (scripts/gpu_checks.sh test): the hardware
//     agrees too. If the GEMM tests fail on a GPU and a line here fails as
//     well, that layout assumption is wrong in the kernels and the emulator.
//
// Exit status: 0 all probes passed (those the GPU cannot run are skipped, and
// said so), 1 a mismatch, 2 a runtime error.
#ifndef GPTQKIT_GPU_EMULATION
#include "gpu_compat.h"
#endif

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gemm_wgmma_kernel.cuh"
#include "half.h"

namespace {

using gptqkit::gpu::sw128_kmajor_desc;
using gptqkit::gpu::sw128_offset;

__device__ __forceinline__ uint32_t pack2(const uint16_t* m, int i0, int i1) {
  return static_cast<uint32_t>(m[i0]) | (static_cast<uint32_t>(m[i1]) << 16);
}

// One warp: a 16 x 16 row-major tile (row stride 24 elements) through
// ldmatrix.x4 (kTrans: .x4.trans, the Hessian kernel's loads of A and B
// fragments from k-major tiles) at the GEMM kernels' per-lane addresses;
// out[lane * 4 + i] = r[i].
template <bool kTrans>
__global__ void probe_ldmatrix_kernel(const uint16_t* __restrict__ a, uint32_t* __restrict__ out) {
#if GPTQKIT_NV_TENSOR_CORES
  constexpr int kStride = 24;
  uint16_t* tile = reinterpret_cast<uint16_t*>(gpu_dynamic_smem());
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) tile[(i / 16) * kStride + i % 16] = a[i];
  __syncthreads();
  uint32_t r[4];
  const uint16_t* p = tile + (lane % 16) * kStride + (lane / 16) * 8;
  if constexpr (kTrans) {
    ldmatrix_x4_trans(r, p);
  } else {
    ldmatrix_x4(r, p);
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
#else
  (void)a, (void)out;
#endif
}

// One warp: d (16 x 8) = a (16 x 16, row-major) * b (16 x 8, b[k * 8 + n]),
// fragments built from the PTX ISA's m16n8k16 layouts (g = lane / 4,
// t = lane % 4): a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..),
// a3 (g + 8, 2t + 8..); b0 (k 2t.., n g), b1 (k 2t + 8.., n g); d0, d1 at
// (g, 2t..), d2, d3 at (g + 8, 2t..).
template <bool BF16>
__global__ void probe_mma_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b,
                                 float* __restrict__ d) {
#if GPTQKIT_NV_TENSOR_CORES
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const uint32_t af[4] = {pack2(a, g * 16 + 2 * t, g * 16 + 2 * t + 1),
                          pack2(a, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1),
                          pack2(a, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9),
                          pack2(a, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9)};
  const uint32_t b0 = pack2(b, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
  const uint32_t b1 = pack2(b, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mma_16816<BF16>(acc, af, b0, b1);
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
#else
  (void)a, (void)b, (void)d;
#endif
}

// One warpgroup: d (64 x BN) = d0 + a (64 x 64, row-major) * b^T (b: BN x 64,
// K-major rows) as four chained wgmma over the k16 slabs. A fragments: warp
// w holds rows 16w..16w+15 in the m16n8k16 A layout; D: d[4i + e] at row
// 16w + g + 8 (e / 2), column 8i + 2t + e % 2. B: row n's 16-byte piece p at
// sw128_offset(n, p) of a 1024-aligned tile; slab s's descriptor 32 s bytes in.
template <bool BF16, int BN>
__global__ void probe_wgmma_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b,
                                   const float* __restrict__ d0, float* __restrict__ d) {
#if GPTQKIT_NV_WGMMA
  unsigned char* raw = gpu_dynamic_smem();
  unsigned char* tile = raw + (1024 - smem_addr(raw) % 1024) % 1024;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  for (int i = tid; i < BN * 8; i += 128) {  // piece i % 8 of row i / 8: 8 elements
    uint16_t* dst = reinterpret_cast<uint16_t*>(tile + sw128_offset(i / 8, i % 8));
    for (int e = 0; e < 8; ++e) dst[e] = b[(i / 8) * 64 + (i % 8) * 8 + e];
  }
  fence_proxy_async();  // ordinary stores, read next by the tensor cores
  __syncthreads();
  uint32_t af[4][4];
  const int r0 = 16 * warp + g;
  for (int s = 0; s < 4; ++s) {
    const int k0 = 16 * s + 2 * t;
    af[s][0] = pack2(a, r0 * 64 + k0, r0 * 64 + k0 + 1);
    af[s][1] = pack2(a, (r0 + 8) * 64 + k0, (r0 + 8) * 64 + k0 + 1);
    af[s][2] = pack2(a, r0 * 64 + k0 + 8, r0 * 64 + k0 + 9);
    af[s][3] = pack2(a, (r0 + 8) * 64 + k0 + 8, (r0 + 8) * 64 + k0 + 9);
  }
  float acc[BN / 2];
  for (int i = 0; i < BN / 8; ++i)
    for (int e = 0; e < 4; ++e) acc[4 * i + e] = d0[(r0 + 8 * (e / 2)) * BN + 8 * i + 2 * t + e % 2];
  const uint32_t base = smem_addr(tile);
  for (int s = 0; s < 4; ++s) {
    wgmma_fence();
    wgmma_rs<BF16, BN>(acc, af[s], sw128_kmajor_desc(base + 32u * static_cast<uint32_t>(s)));
  }
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < BN / 8; ++i)
    for (int e = 0; e < 4; ++e) d[(r0 + 8 * (e / 2)) * BN + 8 * i + 2 * t + e % 2] = acc[4 * i + e];
#else
  (void)a, (void)b, (void)d0, (void)d;
#endif
}

// ---- host ---------------------------------------------------------------------------
bool g_runtime_error = false;

bool ok(gpuError_t e, const char* what) {
  if (e == gpuSuccess) return true;
  std::fprintf(stderr, "tensor_core_probe: %s: %s\n", what, gpuGetErrorString(e));
  g_runtime_error = true;
  return false;
}

template <typename T>
struct Buffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Buffer(size_t count) : n(count) { ok(gpuMalloc(reinterpret_cast<void**>(&ptr), count * sizeof(T)), "gpuMalloc"); }
  Buffer(const std::vector<T>& host) : Buffer(host.size()) {
    if (ptr) ok(gpuMemcpy(ptr, host.data(), n * sizeof(T), gpuMemcpyHostToDevice), "copy to device");
  }
  ~Buffer() { (void)gpuFree(ptr); }
  std::vector<T> host() const {
    std::vector<T> v(n);
    if (ptr) ok(gpuMemcpy(v.data(), ptr, n * sizeof(T), gpuMemcpyDeviceToHost), "copy to host");
    return v;
  }
};

// Small integers in [-3, 3] as fp16 / bf16 (exact).
std::vector<uint16_t> small_ints(size_t n, bool bf16, std::mt19937& rng, std::vector<double>* values) {
  std::uniform_int_distribution<int> dist(-3, 3);
  std::vector<uint16_t> bits(n);
  values->resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int v = dist(rng);
    (*values)[i] = v;
    bits[i] = bf16 ? gptqkit::float_to_bf16(static_cast<float>(v)) : gptqkit::float_to_fp16(static_cast<float>(v));
  }
  return bits;
}

int report(const std::string& name, int64_t mismatches, const std::string& first) {
  if (g_runtime_error) return 2;
  if (mismatches == 0) {
    std::printf("PASS  %s\n", name.c_str());
    return 0;
  }
  std::printf("FAIL  %s: %lld mismatches; first: %s\n", name.c_str(), static_cast<long long>(mismatches), first.c_str());
  return 1;
}

template <bool kTrans>
int probe_ldmatrix(std::mt19937& rng) {
  std::vector<double> av;
  const std::vector<uint16_t> a = small_ints(256, false, rng, &av);
  Buffer<uint16_t> ad(a);
  Buffer<uint32_t> out(128);
  GPTQKIT_LAUNCH(1, 32, 16 * 24 * 2, static_cast<gpuStream_t>(nullptr), probe_ldmatrix_kernel<kTrans>)(ad.ptr, out.ptr);
  ok(gpuGetLastError(), "launch");
  const std::vector<uint32_t> r = out.host();
  int64_t bad = 0;
  std::string first;
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      // Register i holds matrix i (rows 8 (i % 2) .., columns 8 (i / 2) ..): row lane / 4, elements
      // 2 (lane % 4), +1; transposed: column lane / 4, rows 2 (lane % 4), +1.
      const int row = (i % 2) * 8 + (kTrans ? 2 * (lane % 4) : lane / 4);
      const int col = (i / 2) * 8 + (kTrans ? lane / 4 : 2 * (lane % 4));
      const int next = kTrans ? (row + 1) * 16 + col : row * 16 + col + 1;
      const uint32_t want = static_cast<uint32_t>(a[row * 16 + col]) | (static_cast<uint32_t>(a[next]) << 16);
      if (r[lane * 4 + i] != want && bad++ == 0)
        first = "lane " + std::to_string(lane) + " register " + std::to_string(i);
    }
  return report(kTrans ? "ldmatrix.x4.trans (the Hessian kernel's fragment loads)"
                       : "ldmatrix.x4 (the GEMM and Hessian kernels' A-fragment loads)",
                bad, first);
}

template <bool BF16>
int probe_mma(std::mt19937& rng) {
  std::vector<double> av, bv;
  const std::vector<uint16_t> a = small_ints(256, BF16, rng, &av), b = small_ints(128, BF16, rng, &bv);
  Buffer<uint16_t> ad(a), bd(b);
  Buffer<float> dd(128);
  GPTQKIT_LAUNCH(1, 32, 0, static_cast<gpuStream_t>(nullptr), probe_mma_kernel<BF16>)(ad.ptr, bd.ptr, dd.ptr);
  ok(gpuGetLastError(), "launch");
  const std::vector<float> d = dd.host();
  int64_t bad = 0;
  std::string first;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double want = 0;
      for (int k = 0; k < 16; ++k) want += av[m * 16 + k] * bv[k * 8 + n];
      if (d[m * 8 + n] != want && bad++ == 0)
        first = "d[" + std::to_string(m) + ", " + std::to_string(n) + "] = " + std::to_string(d[m * 8 + n]) +
                ", expected " + std::to_string(want);
    }
  return report(std::string("mma.m16n8k16 ") + (BF16 ? "bf16" : "fp16") + " (fragment layouts)", bad, first);
}

template <bool BF16, int BN>
int probe_wgmma(std::mt19937& rng) {
  std::vector<double> av, bv;
  const std::vector<uint16_t> a = small_ints(64 * 64, BF16, rng, &av), b = small_ints(BN * 64, BF16, rng, &bv);
  std::vector<float> d0(64 * BN);
  for (size_t i = 0; i < d0.size(); ++i) d0[i] = static_cast<float>(static_cast<int>(i % 7) - 3);
  Buffer<uint16_t> ad(a), bd(b);
  Buffer<float> d0d(d0), dd(64 * BN);
  const size_t smem = BN * 128 + 1024;
  GPTQKIT_LAUNCH(1, 128, smem, static_cast<gpuStream_t>(nullptr), probe_wgmma_kernel<BF16, BN>)(ad.ptr, bd.ptr,
                                                                                                d0d.ptr, dd.ptr);
  ok(gpuGetLastError(), "launch");
  const std::vector<float> d = dd.host();
  int64_t bad = 0;
  std::string first;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < BN; ++n) {
      double want = d0[m * BN + n];
      for (int k = 0; k < 64; ++k) want += av[m * 64 + k] * bv[n * 64 + k];
      if (d[m * BN + n] != want && bad++ == 0)
        first = "d[" + std::to_string(m) + ", " + std::to_string(n) + "] = " + std::to_string(d[m * BN + n]) +
                ", expected " + std::to_string(want);
    }
  return report(std::string("wgmma.m64n") + std::to_string(BN) + "k16 " + (BF16 ? "bf16" : "fp16") +
                    " (A fragments, 128-byte swizzle + descriptor, slab offsets, D layout)",
                bad, first);
}

}  // namespace

int main() {
  int device = 0, major = 0, minor = 0;
  if (!ok(gpuGetDevice(&device), "gpuGetDevice") ||
      !ok(gpuDeviceGetAttribute(&major, gpuDevAttrComputeCapabilityMajor, device), "compute capability") ||
      !ok(gpuDeviceGetAttribute(&minor, gpuDevAttrComputeCapabilityMinor, device), "compute capability"))
    return 2;
  std::mt19937 rng(2024);
  int worst = 0;
  auto take = [&](int rc) { worst = rc > worst ? rc : worst; };
  if (GPTQKIT_GPU_IS_HIP || major < 8) {
    std::printf("SKIP  mma / ldmatrix: compute capability %d.%d (needs 8.0+ NVIDIA)\n", major, minor);
  } else {
    take(probe_ldmatrix<false>(rng));
    take(probe_ldmatrix<true>(rng));
    take(probe_mma<false>(rng));
    take(probe_mma<true>(rng));
  }
#if GPTQKIT_CUDA_HAS_SM90A
  const bool hopper = major == 9 && minor == 0;
#else
  const bool hopper = false;
#endif
  if (!hopper) {
    std::printf("SKIP  wgmma: needs compute capability 9.0 and a build with sm_90a code (here %d.%d)\n", major, minor);
  } else {
    take(probe_wgmma<false, 64>(rng));
    take(probe_wgmma<false, 128>(rng));
    take(probe_wgmma<true, 128>(rng));
  }
  return worst;
}
