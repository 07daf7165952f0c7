// rows_dot_kernel.h's kernel, compiled inside each capability unit's CPU_CAPABILITY namespace
// (included by capability/instantiate.h and rnn_cell_impl.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "rows_dot_kernel.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {
namespace {

using FloatVec = at::vec::Vectorized<float>;
constexpr int64_t kDotStep = 2 * FloatVec::size();  // K elements a step: two float vectors

// Elements [0, count) of p (count <= kDotStep) as two float vectors, zeros past count.
template <typename T>
inline std::pair<FloatVec, FloatVec> load_step(const T* p, int64_t count) {
  constexpr int64_t V = FloatVec::size();
  if constexpr (std::is_same_v<T, float>) {
    if (count >= kDotStep) return {FloatVec::loadu(p), FloatVec::loadu(p + V)};
    return {FloatVec::loadu(p, int(std::min(count, V))),
            count > V ? FloatVec::loadu(p + V, int(count - V)) : FloatVec(0.f)};
  } else {
    const auto v = count >= kDotStep ? at::vec::Vectorized<T>::loadu(p)
                                     : at::vec::Vectorized<T>::loadu(p, int(count));
    auto [lo, hi] = at::vec::convert_to_float<T>(v);
    return {lo, hi};
  }
}

// MB rows of A against NB rows of W: MB x NB vector accumulators over K, reduced at the end.
// Each W step is loaded (and converted) once for the MB rows; the NB W rows are reused from
// L1 by the next row block of A.
template <int MB, int NB, typename TA, typename TW>
void dot_block(int64_t K, const TA* A, int64_t lda, const TW* W, int64_t ldw, float* C,
               int64_t ldc, int64_t ldc_n, bool accumulate) {
  FloatVec acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = FloatVec(0.f);
  for (int64_t k = 0; k < K; k += kDotStep) {
    const int64_t count = std::min(kDotStep, K - k);
    std::pair<FloatVec, FloatVec> w[NB];
    for (int n = 0; n < NB; ++n) w[n] = load_step(W + n * ldw + k, count);
    for (int m = 0; m < MB; ++m) {
      const auto a = load_step(A + m * lda + k, count);
      for (int n = 0; n < NB; ++n) {
        acc[m][n] = at::vec::fmadd(a.first, w[n].first, acc[m][n]);
        acc[m][n] = at::vec::fmadd(a.second, w[n].second, acc[m][n]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      const float s = at::vec::vec_reduce_all<float>(
          [](FloatVec& x, FloatVec& y) { return x + y; }, acc[m][n]);
      float& c = C[m * ldc + n * ldc_n];
      c = accumulate ? c + s : s;
    }
}

template <int NB, typename TA, typename TW>
void dot_rows(int64_t M, int64_t K, const TA* A, int64_t lda, const TW* W, int64_t ldw,
              float* C, int64_t ldc, int64_t ldc_n, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    dot_block<4, NB>(K, A + m * lda, lda, W, ldw, C + m * ldc, ldc, ldc_n, accumulate);
  const TA* a = A + m * lda;
  float* c = C + m * ldc;
  switch (M - m) {
    case 3: dot_block<3, NB>(K, a, lda, W, ldw, c, ldc, ldc_n, accumulate); break;
    case 2: dot_block<2, NB>(K, a, lda, W, ldw, c, ldc, ldc_n, accumulate); break;
    case 1: dot_block<1, NB>(K, a, lda, W, ldw, c, ldc, ldc_n, accumulate); break;
    default: break;
  }
}

}  // namespace

template <typename TA, typename TW>
void rows_dot(int64_t M, int64_t K, const TA* A, int64_t lda, const TW* W, int64_t ldw,
              int64_t n0, int64_t n1, float* C, int64_t ldc, bool accumulate, int64_t ldc_n) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    dot_rows<4>(M, K, A, lda, W + n * ldw, ldw, C + n * ldc_n, ldc, ldc_n, accumulate);
  for (; n < n1; ++n)
    dot_rows<1>(M, K, A, lda, W + n * ldw, ldw, C + n * ldc_n, ldc, ldc_n, accumulate);
}

#define SEQKERN_INSTANTIATE_ROWS_DOT(TA, TW)                                              \
  template void rows_dot<TA, TW>(int64_t, int64_t, const TA*, int64_t, const TW*, int64_t, \
                                 int64_t, int64_t, float*, int64_t, bool, int64_t);
SEQKERN_INSTANTIATE_ROWS_DOT(float, float)
SEQKERN_INSTANTIATE_ROWS_DOT(float, at::Half)
SEQKERN_INSTANTIATE_ROWS_DOT(float, at::BFloat16)
SEQKERN_INSTANTIATE_ROWS_DOT(at::BFloat16, at::BFloat16)
#undef SEQKERN_INSTANTIATE_ROWS_DOT

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
