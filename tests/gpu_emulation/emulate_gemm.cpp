// Runs the GPU GEMM kernels (cuda/src/*_kernel.cuh, unmodified) on the CPU
// through the emulation in ./emu_compat.h. Driven by
// tests/python/test_gpu_gemm.py, which writes a job file (layout, x, launch
// parameters chosen like the launchers do), runs this program and compares
// the result with gptqkit's dequantize oracle.
//
//   emulate_gemm JOB_IN RESULT_OUT
//
// Job file: int64 header [kernel (0 gemv, 1 tiled, 2 dequant), bf16, bits, m,
// k, n, np, chunks, groups, has_perm, has_bias, lanes (gemv), mf (tiled)],
// then x u16 [m*k], qweight u32 [chunks*bits*np], sz u16 [groups*np*2],
// chunk_group i32 [chunks], perm i32 [32*chunks] (if has_perm), bias u16 [n]
// (if has_bias). Result: u16 [m*n] (or [n*k] for dequant).
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "emu_compat.h"  // first: stands in for gpu_compat.h
#include "gemm_dequant_kernel.cuh"
#include "gemm_gemv_kernel.cuh"
#include "gemm_tiled_kernel.cuh"

using namespace gptqkit::gpu;

namespace {

struct Job {
  int64_t kernel, bf16, bits, m, k, n, np, chunks, groups, has_perm, has_bias, lanes, mf;
  std::vector<uint16_t> x, sz, bias;
  std::vector<uint32_t> qweight;
  std::vector<int32_t> chunk_group, perm;
};

template <typename T>
void read(std::ifstream& f, std::vector<T>& v, int64_t count) {
  v.resize(static_cast<size_t>(count));
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(T)));
}

template <bool BF16, int BITS, int MT>
void gemv(const Job& j, uint16_t* y) {
  emu::launch(dim3(static_cast<unsigned>(j.np / (4 * j.lanes))), dim3(kGemvThreads), 0, "gemv_kernel", [&] {
    gemv_kernel<BF16, BITS, MT>(j.x.data(), j.qweight.data(), j.sz.data(), j.chunk_group.data(),
                                j.has_perm ? j.perm.data() : nullptr, j.has_bias ? j.bias.data() : nullptr, y,
                                int(j.m), int(j.k), int(j.n), int(j.np), int(j.chunks), int(j.groups), int(j.lanes));
  });
}

template <bool BF16, int BITS, int MF>
void tiled(const Job& j, uint16_t* y) {
  const bool x_pairs = !j.has_perm && j.k % 2 == 0;
  emu::launch(dim3(static_cast<unsigned>(ceil_div(j.m, 16 * MF)), static_cast<unsigned>(j.np / kBN)),
              dim3(kTiledThreads), 0, "tiled_kernel", [&] {
                tiled_kernel<BF16, BITS, MF>(j.x.data(), j.qweight.data(), j.sz.data(), j.chunk_group.data(),
                                             j.has_perm ? j.perm.data() : nullptr,
                                             j.has_bias ? j.bias.data() : nullptr, y, int(j.m), int(j.k), int(j.n),
                                             int(j.np), int(j.chunks), int(j.groups), x_pairs);
              });
}

template <bool BF16, int BITS>
void dequant(const Job& j, uint16_t* out) {
  // The launcher's choice (gemm_dequant.cu): the tiled kernel for aligned rows without perm.
  if (!j.has_perm && j.k % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(j.n, kDequantTileCols)), static_cast<unsigned>(ceil_div(j.chunks, kDequantTileChunks)));
    emu::launch(grid, dim3(kDequantThreads), 0, "dequant_tile_kernel", [&] {
      dequant_tile_kernel<BF16, BITS>(j.qweight.data(), j.sz.data(), j.chunk_group.data(), out, int(j.k), int(j.n),
                                      int(j.np), int(j.chunks), int(j.groups));
    });
    return;
  }
  emu::launch(dim3(static_cast<unsigned>(ceil_div(j.n * j.chunks, kDequantThreads))), dim3(kDequantThreads), 0, "dequant_kernel", [&] {
    dequant_kernel<BF16, BITS>(j.qweight.data(), j.sz.data(), j.chunk_group.data(),
                               j.has_perm ? j.perm.data() : nullptr, out, int(j.k), int(j.n), int(j.np),
                               int(j.chunks), int(j.groups));
  });
}

template <bool BF16, int BITS>
bool run_bits(const Job& j, uint16_t* out) {
  if (j.kernel == 0) {
    switch (j.m <= 1 ? 1 : j.m <= 2 ? 2 : j.m <= 4 ? 4 : 8) {
      case 1: gemv<BF16, BITS, 1>(j, out); return true;
      case 2: gemv<BF16, BITS, 2>(j, out); return true;
      case 4: gemv<BF16, BITS, 4>(j, out); return true;
      default: gemv<BF16, BITS, 8>(j, out); return true;
    }
  }
  if (j.kernel == 1) {
    if (j.mf == 1) tiled<BF16, BITS, 1>(j, out); else tiled<BF16, BITS, 4>(j, out);
    return true;
  }
  dequant<BF16, BITS>(j, out);
  return true;
}

template <bool BF16>
bool run(const Job& j, uint16_t* out) {
  switch (j.bits) {
    case 2: return run_bits<BF16, 2>(j, out);
    case 3: return run_bits<BF16, 3>(j, out);
    case 4: return run_bits<BF16, 4>(j, out);
    case 8: return run_bits<BF16, 8>(j, out);
    default: return false;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s JOB_IN RESULT_OUT\n", argv[0]);
    return 2;
  }
  std::ifstream f(argv[1], std::ios::binary);
  Job j;
  int64_t* h = &j.kernel;
  for (int i = 0; i < 13; ++i) f.read(reinterpret_cast<char*>(h + i), 8);
  read(f, j.x, j.m * j.k);
  read(f, j.qweight, j.chunks * j.bits * j.np);
  read(f, j.sz, j.groups * j.np * 2);
  read(f, j.chunk_group, j.chunks);
  if (j.has_perm) read(f, j.perm, j.chunks * 32);
  if (j.has_bias) read(f, j.bias, j.n);
  if (!f) {
    std::fprintf(stderr, "truncated job file\n");
    return 2;
  }
  std::vector<uint16_t> out(static_cast<size_t>(j.kernel == 2 ? j.n * j.k : j.m * j.n), 0xFFFF);  // NaN fill
  if (!(j.bf16 ? run<true>(j, out.data()) : run<false>(j, out.data()))) return 2;
  std::ofstream o(argv[2], std::ios::binary);
  o.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * 2));
  return o ? 0 : 1;
}
