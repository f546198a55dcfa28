// A persistent worker pool for the CPU GEMM. parallel_for (parallel.h) starts
// and joins fresh std::threads on every call, 25-70 us each here: negligible
// for the solver, but one decoding step of a small model is a few hundred
// GEMVs of 5-300 us each. The workers of this pool are started once and wait
// for work, spinning briefly (GPTQKIT_SPIN_US, default 100 us) before they
// sleep, so back-to-back calls hand work over without a kernel round trip.
//
// Work is claimed in batches from a shared counter by the calling thread and
// the workers alike, and the call returns as soon as every batch has run: a
// worker that wakes up late (the machine is busy, or it was asleep) finds
// nothing left and never delays the caller, and a thread that gets less CPU
// time simply runs fewer batches.
//
// One job runs at a time: a call that finds the pool busy (another thread's
// GEMM) or that comes from inside a pool worker runs on the calling thread
// alone. After fork() the child starts a pool of its own.
#pragma once

#include <cstdint>
#include <functional>

namespace gptqkit::cpu {

// Calls body(begin, end) for consecutive batches [b, min(b + batch, count))
// covering [0, count), on the calling thread and up to workers - 1 pool
// threads, and returns when all have run. The first exception thrown by body
// is rethrown in the caller (the batches not yet started are skipped).
void pool_for(int64_t count, int64_t batch, int workers, const std::function<void(int64_t, int64_t)>& body);

}  // namespace gptqkit::cpu
