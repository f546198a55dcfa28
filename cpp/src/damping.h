// The damping policy of GPTQ's H^-1 preparation, shared by the CPU
// (cholesky.cpp) and GPU (cuda/src/gpu_cholesky.cu) factorizations so that
// both try the same dampings and fail with the same messages. Host code only.
#pragma once

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

#include "gptqkit/solver.h"
#include "gptqkit/status.h"

namespace gptqkit::detail {

// Damping is a fraction of the mean diagonal, so that fraction must be
// positive and finite.
inline Status check_mean_diagonal(double mean_diag) {
  if (mean_diag > 0.0 && std::isfinite(mean_diag)) return Status::Ok();
  std::ostringstream msg;
  msg << "hessian: mean of the diagonal is " << mean_diag
      << " (must be positive); the Hessian is not positive definite and damping cannot fix it";
  return Status::NotPositiveDefinite(msg.str());
}

// lambda = percent * mean(diag H). The first attempt uses the requested
// percentage; after each failed factorization it grows 3x (0 becomes 1 %),
// for at most max_retries more attempts and never beyond 100 % of the mean
// diagonal (or the requested percentage, if that is larger).
class DampingLadder {
 public:
  DampingLadder(double damp_percent, int max_retries, double mean_diag)
      : requested_(damp_percent), cap_(std::max(1.0, damp_percent)), percent_(damp_percent),
        mean_diag_(mean_diag), max_retries_(max_retries) {}

  double percent() const { return percent_; }
  double lambda() const { return percent_ * mean_diag_; }
  int attempt() const { return attempt_; }

  // After a failed attempt: moves to the next damping, or returns false when
  // the ladder is exhausted (then failure() says why).
  bool next() {
    if (attempt_ > max_retries_ || percent_ >= cap_) return false;
    percent_ = std::min(percent_ > 0.0 ? percent_ * 3.0 : 0.01, cap_);
    ++attempt_;
    return true;
  }

  void record(QuantizeStats* stats) const {
    if (stats == nullptr) return;
    stats->damp_percent_used = percent_;
    stats->damp_lambda = lambda();
    stats->damp_attempts = attempt_;
  }

  // failed_minor: the order of the leading minor that was not positive (LAPACK's info).
  Status failure(int failed_minor) const {
    std::ostringstream msg;
    msg << "hessian: not positive definite even with damping " << percent_ * 100.0 << " % of the mean diagonal after "
        << attempt_ << " attempt(s) (requested damp_percent=" << requested_ << "; leading minor " << failed_minor
        << " failed). The calibration data may be too small or degenerate for this layer, or the Hessian contains "
           "invalid values";
    return Status::NotPositiveDefinite(msg.str());
  }

 private:
  double requested_, cap_, percent_, mean_diag_;
  int max_retries_;
  int attempt_ = 1;
};

}  // namespace gptqkit::detail
