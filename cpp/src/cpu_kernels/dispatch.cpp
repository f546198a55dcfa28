// Chooses the kernel variant once per process from the CPU's features:
// AVX-512 (F, BW, VL, DQ) > AVX2 (with FMA and F16C) > generic. The
// environment variable GPTQKIT_CPU_KERNEL=generic|avx2|avx512 overrides the
// choice (for tests and comparisons); a variant the CPU cannot run is refused
// with a message on stderr and the automatic choice is kept.
#include "dispatch.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(_MSC_VER) && !defined(__clang__) && (defined(_M_X64) || defined(_M_IX86))
#include <intrin.h>
#endif

namespace gptqkit {
namespace cpu {
namespace {

#if defined(GPTQKIT_HAVE_X86_KERNELS)
#if defined(__GNUC__) || defined(__clang__)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
  __builtin_cpu_init();
  // libgcc / compiler-rt also check that the OS saves the AVX-512 state (XCR0).
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_has_avx2();
}
#elif defined(_MSC_VER)
bool os_saves(unsigned long long mask) {
  int r[4];
  __cpuid(r, 1);
  if ((r[2] & (1 << 27)) == 0) return false;  // OSXSAVE
  return (_xgetbv(0) & mask) == mask;
}
bool cpu_has_avx2() {
  int r[4];
  __cpuid(r, 1);
  const bool fma = (r[2] & (1 << 12)) != 0, f16c = (r[2] & (1 << 29)) != 0;
  __cpuidex(r, 7, 0);
  return fma && f16c && (r[1] & (1 << 5)) != 0 && os_saves(0x6);
}
bool cpu_has_avx512() {
  int r[4];
  __cpuidex(r, 7, 0);
  const int want = (1 << 16) | (1 << 17) | (1 << 30) | (1 << 31);  // F, DQ, BW, VL
  return (r[1] & want) == want && os_saves(0xe6) && cpu_has_avx2();
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif
#endif

const KernelTable* table_if_supported(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::kGeneric:
      return generic_kernels();
    case CpuKernel::kAvx2:
#if defined(GPTQKIT_HAVE_X86_KERNELS)
      if (cpu_has_avx2()) return avx2_kernels();
#endif
      return nullptr;
    case CpuKernel::kAvx512:
#if defined(GPTQKIT_HAVE_X86_KERNELS) && defined(GPTQKIT_HAVE_AVX512)
      if (cpu_has_avx512()) return avx512_kernels();
#endif
      return nullptr;
    default:
      return nullptr;
  }
}

const KernelTable* choose() {
  const KernelTable* best = table_if_supported(CpuKernel::kAvx512);
  if (best == nullptr) best = table_if_supported(CpuKernel::kAvx2);
  if (best == nullptr) best = generic_kernels();
  const char* env = std::getenv("GPTQKIT_CPU_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  CpuKernel wanted;
  if (std::strcmp(env, "generic") == 0) {
    wanted = CpuKernel::kGeneric;
  } else if (std::strcmp(env, "avx2") == 0) {
    wanted = CpuKernel::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    wanted = CpuKernel::kAvx512;
  } else {
    std::fprintf(stderr, "gptqkit: ignoring GPTQKIT_CPU_KERNEL=%s (expected generic, avx2, avx512 or auto); using %s\n",
                 env, best->name);
    return best;
  }
  if (const KernelTable* t = table_if_supported(wanted)) return t;
  std::fprintf(stderr, "gptqkit: GPTQKIT_CPU_KERNEL=%s is not available (%s); using %s\n", env,
               cpu_kernel_built(wanted) ? "this CPU lacks its instructions" : "not built into this library",
               best->name);
  return best;
}

}  // namespace

const KernelTable* kernel_table(CpuKernel kernel) {
  if (kernel == CpuKernel::kAuto) {
    static const KernelTable* chosen = choose();
    return chosen;
  }
  return table_if_supported(kernel);
}

}  // namespace cpu

const char* cpu_kernel_name() { return cpu::kernel_table(CpuKernel::kAuto)->name; }

const char* cpu_kernel_name(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::kAuto: return "auto";
    case CpuKernel::kGeneric: return "generic";
    case CpuKernel::kAvx2: return "avx2";
    case CpuKernel::kAvx512: return "avx512";
  }
  return "unknown";
}

bool cpu_kernel_built(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::kAuto:
    case CpuKernel::kGeneric:
      return true;
    case CpuKernel::kAvx2:
#if defined(GPTQKIT_HAVE_X86_KERNELS)
      return true;
#else
      return false;
#endif
    case CpuKernel::kAvx512:
#if defined(GPTQKIT_HAVE_X86_KERNELS) && defined(GPTQKIT_HAVE_AVX512)
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool cpu_kernel_supported(CpuKernel kernel) {
  return kernel == CpuKernel::kAuto || cpu::kernel_table(kernel) != nullptr;
}

}  // namespace gptqkit
