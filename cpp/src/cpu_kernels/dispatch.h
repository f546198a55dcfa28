// Run-time choice of the CPU kernel variant (see dispatch.cpp).
#pragma once

#include "gptqkit/cpu_gemm.h"
#include "layout.h"

namespace gptqkit::cpu {

// The table of `kernel`, or nullptr when that variant is not built or the
// CPU lacks its instructions. kAuto gives the variant chosen at start-up.
const KernelTable* kernel_table(CpuKernel kernel);

}  // namespace gptqkit::cpu
