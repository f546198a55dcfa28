#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define GPTQKIT_HAVE_GETPID 1
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <immintrin.h>
#define GPTQKIT_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define GPTQKIT_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define GPTQKIT_CPU_RELAX() ((void)0)
#endif

namespace gptqkit::cpu {
namespace {

thread_local bool t_in_worker = false;

int64_t spin_microseconds() {
  static const int64_t us = [] {
    if (const char* env = std::getenv("GPTQKIT_SPIN_US")) {
      const long v = std::atol(env);
      if (v >= 0) return static_cast<int64_t>(v);
    }
    return int64_t{100};
  }();
  return us;
}

// Waits until pred() holds: spins for up to GPTQKIT_SPIN_US, then sleeps on cv.
template <typename Pred>
void wait_for(std::mutex& mu, std::condition_variable& cv, Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_microseconds());
  for (int i = 1;; ++i) {
    if (pred()) return;
    GPTQKIT_CPU_RELAX();
    if ((i & 255) == 0 && std::chrono::steady_clock::now() >= deadline) break;
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, pred);
}

class Pool {
 public:
  // Workers are never joined: the pool lives until the process exits.
  void run(int64_t count, int64_t batch, int workers, const std::function<void(int64_t, int64_t)>& body) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || t_in_worker) {
      for (int64_t b = 0; b < count; b += batch) body(b, std::min(count, b + batch));
      return;
    }
    ensure_threads(workers - 1);
    body_ = &body;
    count_ = count;
    batch_ = batch;
    next_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t ticket = ++tickets_;
    state_.store(ticket << kTicketShift, std::memory_order_release);  // open, nobody inside
    for (int w = 0; w < workers - 1; ++w) {
      Slot& slot = *slots_[w];
      {
        std::lock_guard<std::mutex> lock(slot.mu);
        slot.ticket.store(ticket, std::memory_order_release);
      }
      slot.cv.notify_one();
    }
    work();
    // Close the job once no worker is inside it; a worker that has not
    // joined by then never will (it sees the job closed).
    wait_for(done_mu_, done_cv_, [&] {
      uint64_t s = state_.load(std::memory_order_acquire);
      return (s & kActiveMask) == 0 &&
             state_.compare_exchange_strong(s, s | kClosed, std::memory_order_acq_rel);
    });
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr uint64_t kActiveMask = 0xffff;  // workers inside the job
  static constexpr uint64_t kClosed = uint64_t{1} << 16;
  static constexpr int kTicketShift = 17;

  struct Slot {
    std::mutex mu;
    std::condition_variable cv;
    std::atomic<uint64_t> ticket{0};
  };

  void ensure_threads(int wanted) {
    while (static_cast<int>(slots_.size()) < wanted) {
      slots_.push_back(std::make_unique<Slot>());
      Slot* slot = slots_.back().get();
      std::thread([this, slot] { worker(*slot); }).detach();
    }
  }

  // Claims and runs batches until none is left.
  void work() {
    for (;;) {
      if (failed_.load(std::memory_order_relaxed)) return;
      const int64_t b = next_.fetch_add(batch_, std::memory_order_relaxed);
      if (b >= count_) return;
      try {
        (*body_)(b, std::min(count_, b + batch_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true, std::memory_order_relaxed);
      }
    }
  }

  void worker(Slot& slot) {
    t_in_worker = true;
    uint64_t seen = 0;
    for (;;) {
      wait_for(slot.mu, slot.cv, [&] { return slot.ticket.load(std::memory_order_acquire) != seen; });
      const uint64_t ticket = slot.ticket.load(std::memory_order_acquire);
      seen = ticket;
      uint64_t s = state_.load(std::memory_order_acquire);
      bool joined = false;
      while ((s >> kTicketShift) == ticket && (s & kClosed) == 0) {
        if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
          joined = true;
          break;
        }
      }
      if (!joined) continue;  // too late: the caller already finished this job
      work();
      if (((state_.fetch_sub(1, std::memory_order_acq_rel) - 1) & kActiveMask) == 0) {
        std::lock_guard<std::mutex> lock(done_mu_);
        done_cv_.notify_all();
      }
    }
  }

  std::mutex busy_;  // one job at a time
  std::vector<std::unique_ptr<Slot>> slots_;
  std::atomic<uint64_t> state_{0};  // ticket << kTicketShift | kClosed | active workers
  uint64_t tickets_ = 0;
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0, batch_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;
};

Pool& pool() {
#ifdef GPTQKIT_HAVE_GETPID
  static std::mutex mu;
  static Pool* current = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  const pid_t pid = getpid();
  if (current == nullptr || owner != pid) {  // first use, or a forked child: its workers did not survive fork()
    current = new Pool();                   // the parent's pool object is abandoned in the child
    owner = pid;
  }
  return *current;
#else
  static Pool* current = new Pool();
  return *current;
#endif
}

}  // namespace

void pool_for(int64_t count, int64_t batch, int workers, const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  batch = std::max<int64_t>(1, batch);
  const int64_t batches = (count + batch - 1) / batch;
  workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(workers, batches)));
  if (workers == 1) {
    for (int64_t b = 0; b < count; b += batch) body(b, std::min(count, b + batch));
    return;
  }
  pool().run(count, batch, workers, body);
}

}  // namespace gptqkit::cpu
