// rows_dot_kernel.h's kernel, compiled inside each capability unit's CPU_CAPABILITY namespace
// (included by capability/instantiate.h and rnn_cell_impl.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

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

// sums[i] = the total of acc[i]'s lanes, i < N.
template <int N>
inline void lane_totals(const FloatVec (&acc)[N], float* sums) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (N == 16 && FloatVec::size() == 16) {
    // A 4x4 block's 16 totals by one transposing tree, ~45 instructions where 16 separate
    // reductions take ~150: at K = 256 those were a third of a decoding step's dot products.
    // Per 128-bit lane: x = [x0+x2, y0+y2, x1+x3, y1+y3] for the pair (x, y) ...
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; ++i) {
      const __m512 x = acc[2 * i], y = acc[2 * i + 1];
      pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    // ... then lane L of quads[j] = the lane-L totals of acc[4j .. 4j+3] ...
    for (int j = 0; j < 4; ++j) {
      const __m512d x = _mm512_castps_pd(pairs[2 * j]), y = _mm512_castps_pd(pairs[2 * j + 1]);
      quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                               _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    // ... then the lanes added in pairs across 128-bit lanes, twice: lane j of the result
    // holds the totals of acc[4j .. 4j+3], in order.
    for (int h = 0; h < 2; ++h) {
      const __m512 x = quads[2 * h], y = quads[2 * h + 1];
      halves[h] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
    }
    _mm512_storeu_ps(sums, _mm512_add_ps(
        _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
        _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1))));
    return;
  }
#endif
  for (int i = 0; i < N; ++i)
    sums[i] = at::vec::vec_reduce_all<float>([](FloatVec& x, FloatVec& y) { return x + y; },
                                            acc[i]);
}

// MB rows of A against NB rows of W: MB x NB vector accumulators over K, reduced at the end.
// Each W step is loaded (and converted) once for the MB rows; the NB W rows are reused from
// L1 by the next row block of A.
template <int MB, int NB, typename TA, typename TW>
void dot_block(int64_t K, const TA* A, int64_t lda, const TW* W, int64_t ldw, float* C,
               int64_t ldc, int64_t ldc_n, bool accumulate) {
  FloatVec acc[MB * NB];  // [m][n]
  for (int i = 0; i < MB * NB; ++i) acc[i] = FloatVec(0.f);
  for (int64_t k = 0; k < K; k += kDotStep) {
    const int64_t count = std::min(kDotStep, K - k);
    std::pair<FloatVec, FloatVec> w[NB];
    for (int n = 0; n < NB; ++n) w[n] = load_step(W + n * ldw + k, count);
    for (int m = 0; m < MB; ++m) {
      const auto a = load_step(A + m * lda + k, count);
      for (int n = 0; n < NB; ++n) {
        FloatVec& s = acc[m * NB + n];
        s = at::vec::fmadd(a.first, w[n].first, s);
        s = at::vec::fmadd(a.second, w[n].second, s);
      }
    }
  }
  float sums[MB * NB];
  lane_totals<MB * NB>(acc, sums);
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float& c = C[m * ldc + n * ldc_n];
      c = accumulate ? c + sums[m * NB + n] : sums[m * NB + n];
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
