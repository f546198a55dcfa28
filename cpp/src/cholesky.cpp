#include "cholesky.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "damping.h"

namespace gptqkit::detail {

// Why the reversed factorization: GPTQ needs U upper triangular with
// H^-1 = U^T U. The reference code gets it from three O(K^3) steps (Cholesky,
// inverse from the factor, Cholesky again). Factor instead the index-reversed
// matrix J H J = L L^T (J the exchange matrix); then H = R R^T with
// R = J L J upper triangular, H^-1 = R^-T R^-1, and U = R^-1 = J L^-1 J.
// One Cholesky plus one triangular inverse: half the flops, and no second
// factorization of an already rounded inverse. Done in float64 because the
// damped Hessians of real layers reach condition numbers where float32
// Cholesky loses most digits.
Status inverse_upper_factor(const void* hessian, bool hessian_is_fp64, int64_t k, const int64_t* perm,
                            const uint8_t* dead, double damp_percent, int max_retries, float* upper,
                            QuantizeStats* stats) {
  if (k > std::numeric_limits<int>::max())
    return Status::InvalidArgument("hessian: dimension too large for LAPACK (" + std::to_string(k) + ")");
  const float* h32 = static_cast<const float*>(hessian);
  const double* h64 = static_cast<const double*>(hessian);
  auto orig = [&](int64_t j) { return perm ? perm[j] : j; };
  auto read = [&](int64_t r, int64_t c) -> double {  // processing-order indices
    const int64_t a = orig(r), b = orig(c);
    if (a == b && dead && dead[a]) return 1.0;
    const size_t idx = static_cast<size_t>(a * k + b);
    return hessian_is_fp64 ? h64[idx] : static_cast<double>(h32[idx]);
  };

  double mean_diag = 0.0;
  for (int64_t i = 0; i < k; ++i) mean_diag += read(i, i);
  mean_diag /= static_cast<double>(k);
  GPTQKIT_RETURN_IF_ERROR(check_mean_diagonal(mean_diag));

  // Single-threaded LAPACK: faster than OpenBLAS's threaded potrf/trtri here.
  blas::ScopedBlasThreads one_thread(1);
  std::vector<double> a(static_cast<size_t>(k * k));
  DampingLadder damping(damp_percent, max_retries, mean_diag);
  int info = 0;
  for (;;) {
    const double lambda = damping.lambda();
    // Column-major upper triangle A(i, j) = H(K-1-j, K-1-i) for i <= j: each
    // column of A is a reversed, contiguous row of H (H is symmetric).
    for (int64_t j = 0; j < k; ++j) {
      const int64_t src = k - 1 - j;
      double* col = a.data() + j * k;
      for (int64_t i = 0; i < j; ++i) col[i] = read(src, k - 1 - i);
      col[j] = read(src, src) + lambda;
    }
    info = blas::dpotrf('U', static_cast<int>(k), a.data(), static_cast<int>(k));
    if (info == 0) break;
    if (!damping.next()) return damping.failure(info);
  }
  damping.record(stats);

  // A = Ru^T Ru with Ru upper, so L = Ru^T and, after trtri, the column-major
  // array holds Ru^-1 = L^-T: read flat, that is L^-1 row-major. U = J L^-1 J
  // reverses both indices, i.e. the flat array: U[t] = a[K*K - 1 - t].
  info = blas::dtrtri('U', 'N', static_cast<int>(k), a.data(), static_cast<int>(k));
  if (info != 0)
    return Status::NotPositiveDefinite("hessian: Cholesky factor is singular at position " + std::to_string(info));
  const double* last = a.data() + (k * k - 1);
  for (int64_t i = 0; i < k; ++i) {
    float* row = upper + i * k;
    for (int64_t j = 0; j < i; ++j) row[j] = 0.0f;
    for (int64_t j = i; j < k; ++j) row[j] = static_cast<float>(*(last - (i * k + j)));
  }
  return Status::Ok();
}

}  // namespace gptqkit::detail
