// Umbrella header for the gptqkit C++ library.
#pragma once

#include "gptqkit/cpu_gemm.h"
#include "gptqkit/hessian.h"
#include "gptqkit/pack.h"
#include "gptqkit/solver.h"
#include "gptqkit/status.h"
#include "gptqkit/tensor.h"
#include "gptqkit/version.h"
