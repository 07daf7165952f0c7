// rows_dot_kernel.h's kernel, compiled inside each capability unit's CPU_CAPABILITY namespace
// (included by capability/instantiate.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "rows_dot_kernel.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {
namespace {

// MB rows of A against NB rows of W: MB x NB vector accumulators over K, reduced at the end.
// Each W vector is loaded once for the MB rows; the NB W rows (NB * K floats) are reused from
// L1 by the next row block of A.
template <int MB, int NB>
void dot_block(int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, float* C,
               int64_t ldc, int64_t ldc_n, bool accumulate) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  Vec acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = Vec(0.f);
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    Vec w[NB];
    for (int n = 0; n < NB; ++n) w[n] = Vec::loadu(W + n * ldw + k);
    for (int m = 0; m < MB; ++m) {
      const Vec a = Vec::loadu(A + m * lda + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = at::vec::fmadd(a, w[n], acc[m][n]);
    }
  }
  if (k < K) {  // the tail, zero-filled past K
    const int rest = int(K - k);
    Vec w[NB];
    for (int n = 0; n < NB; ++n) w[n] = Vec::loadu(W + n * ldw + k, rest);
    for (int m = 0; m < MB; ++m) {
      const Vec a = Vec::loadu(A + m * lda + k, rest);
      for (int n = 0; n < NB; ++n) acc[m][n] = at::vec::fmadd(a, w[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      const float s = at::vec::vec_reduce_all<float>(
          [](Vec& x, Vec& y) { return x + y; }, acc[m][n]);
      float& c = C[m * ldc + n * ldc_n];
      c = accumulate ? c + s : s;
    }
}

template <int NB>
void dot_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
              float* C, int64_t ldc, int64_t ldc_n, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    dot_block<4, NB>(K, A + m * lda, lda, W, ldw, C + m * ldc, ldc, ldc_n, accumulate);
  const float* a = A + m * lda;
  float* c = C + m * ldc;
  switch (M - m) {
    case 3: dot_block<3, NB>(K, a, lda, W, ldw, c, ldc, ldc_n, accumulate); break;
    case 2: dot_block<2, NB>(K, a, lda, W, ldw, c, ldc, ldc_n, accumulate); break;
    case 1: dot_block<1, NB>(K, a, lda, W, ldw, c, ldc, ldc_n, accumulate); break;
    default: break;
  }
}

}  // namespace

void rows_dot(int64_t M, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
              int64_t n0, int64_t n1, float* C, int64_t ldc, bool accumulate, int64_t ldc_n) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    dot_rows<4>(M, K, A, lda, W + n * ldw, ldw, C + n * ldc_n, ldc, ldc_n, accumulate);
  for (; n < n1; ++n)
    dot_rows<1>(M, K, A, lda, W + n * ldw, ldw, C + n * ldc_n, ldc, ldc_n, accumulate);
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
