// A minimal fork-join parallel loop over std::thread. gptqkit does not use
// OpenMP so that it never loads a second OpenMP runtime next to PyTorch's.
#pragma once

#include <cstdint>
#include <functional>

namespace gptqkit {

// Worker count: GPTQKIT_NUM_THREADS if set, else the hardware concurrency.
int num_threads();

// Calls body(begin, end) on disjoint chunks covering [0, count), at most
// num_threads() at a time, each chunk at least `grain` long. Returns after all
// chunks finished. Exceptions from body are rethrown in the caller.
void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

}  // namespace gptqkit
