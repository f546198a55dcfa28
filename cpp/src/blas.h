// The handful of Fortran BLAS/LAPACK routines gptqkit calls, declared here so
// the library builds against any provider (OpenBLAS, MKL, BLIS, Accelerate,
// scipy-openblas with its `scipy_` symbol prefix) without provider headers.
// All matrices are column-major, as the Fortran interface expects.
#pragma once

#include <cstddef>

#ifndef GPTQKIT_BLAS_PREFIX
#define GPTQKIT_BLAS_PREFIX
#endif
#define GPTQKIT_BLAS_CAT2(a, b) a##b
#define GPTQKIT_BLAS_CAT(a, b) GPTQKIT_BLAS_CAT2(a, b)
#define GPTQKIT_BLAS_FN(name) GPTQKIT_BLAS_CAT(GPTQKIT_BLAS_PREFIX, name)

extern "C" {
// Trailing size_t arguments are the hidden lengths of the character arguments
// (gfortran ABI); passing them is harmless for providers written in C.
void GPTQKIT_BLAS_FN(ssyrk_)(const char* uplo, const char* trans, const int* n, const int* k,
                             const float* alpha, const float* a, const int* lda, const float* beta,
                             float* c, const int* ldc, size_t, size_t);
void GPTQKIT_BLAS_FN(dsyrk_)(const char* uplo, const char* trans, const int* n, const int* k,
                             const double* alpha, const double* a, const int* lda,
                             const double* beta, double* c, const int* ldc, size_t, size_t);
void GPTQKIT_BLAS_FN(sgemm_)(const char* transa, const char* transb, const int* m, const int* n,
                             const int* k, const float* alpha, const float* a, const int* lda,
                             const float* b, const int* ldb, const float* beta, float* c,
                             const int* ldc, size_t, size_t);
void GPTQKIT_BLAS_FN(dgemm_)(const char* transa, const char* transb, const int* m, const int* n,
                             const int* k, const double* alpha, const double* a, const int* lda,
                             const double* b, const int* ldb, const double* beta, double* c,
                             const int* ldc, size_t, size_t);
void GPTQKIT_BLAS_FN(dpotrf_)(const char* uplo, const int* n, double* a, const int* lda, int* info,
                              size_t);
void GPTQKIT_BLAS_FN(dtrtri_)(const char* uplo, const char* diag, const int* n, double* a,
                              const int* lda, int* info, size_t, size_t);
// OpenBLAS thread control; weak so other providers (which lack it) still link.
void GPTQKIT_BLAS_FN(openblas_set_num_threads)(int) __attribute__((weak));
int GPTQKIT_BLAS_FN(openblas_get_num_threads)(void) __attribute__((weak));
}

namespace gptqkit::blas {

inline void ssyrk(char uplo, char trans, int n, int k, float alpha, const float* a, int lda,
                  float beta, float* c, int ldc) {
  GPTQKIT_BLAS_FN(ssyrk_)(&uplo, &trans, &n, &k, &alpha, a, &lda, &beta, c, &ldc, 1, 1);
}
inline void dsyrk(char uplo, char trans, int n, int k, double alpha, const double* a, int lda,
                  double beta, double* c, int ldc) {
  GPTQKIT_BLAS_FN(dsyrk_)(&uplo, &trans, &n, &k, &alpha, a, &lda, &beta, c, &ldc, 1, 1);
}
inline void sgemm(char transa, char transb, int m, int n, int k, float alpha, const float* a,
                  int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  GPTQKIT_BLAS_FN(sgemm_)(&transa, &transb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc,
                          1, 1);
}
inline void dgemm(char transa, char transb, int m, int n, int k, double alpha, const double* a, int lda,
                  const double* b, int ldb, double beta, double* c, int ldc) {
  GPTQKIT_BLAS_FN(dgemm_)(&transa, &transb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc, 1, 1);
}
// Returns LAPACK's info: 0 on success, > 0 when the leading minor of that
// order is not positive definite.
inline int dpotrf(char uplo, int n, double* a, int lda) {
  int info = 0;
  GPTQKIT_BLAS_FN(dpotrf_)(&uplo, &n, a, &lda, &info, 1);
  return info;
}
inline int dtrtri(char uplo, char diag, int n, double* a, int lda) {
  int info = 0;
  GPTQKIT_BLAS_FN(dtrtri_)(&uplo, &diag, &n, a, &lda, &info, 1, 1);
  return info;
}

// Limits the BLAS provider's own threads for a scope. Why: OpenBLAS's threaded
// potrf/trtri run 2-6x slower than single-threaded on small core counts, and
// where gptqkit parallelises over rows itself each worker must call a
// single-threaded BLAS. No effect with providers other than OpenBLAS. The
// setting is process-wide: concurrent quantize calls from several threads
// share it.
class ScopedBlasThreads {
 public:
  explicit ScopedBlasThreads(int threads) {
    if (&GPTQKIT_BLAS_FN(openblas_set_num_threads) != nullptr &&
        &GPTQKIT_BLAS_FN(openblas_get_num_threads) != nullptr) {
      previous_ = GPTQKIT_BLAS_FN(openblas_get_num_threads)();
      GPTQKIT_BLAS_FN(openblas_set_num_threads)(threads);
    }
  }
  ~ScopedBlasThreads() {
    if (previous_ > 0) GPTQKIT_BLAS_FN(openblas_set_num_threads)(previous_);
  }
  ScopedBlasThreads(const ScopedBlasThreads&) = delete;
  ScopedBlasThreads& operator=(const ScopedBlasThreads&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace gptqkit::blas
