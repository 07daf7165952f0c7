// rows_dot_kernel.h's kernel, compiled inside each capability unit's CPU_CAPABILITY namespace
// (included by capability/instantiate.h and rnn_cell_impl.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
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

// The lane totals of accumulators by transposing trees: unpack pairs of accumulators and add
// (each 128-bit lane then holds two partial sums of each of the pair), unpack 64-bit pairs and
// add (four accumulators' partial sums in each lane, in order), then add the 128-bit lanes
// across. Separate reductions take ~7 (AVX2) / ~9 (AVX-512) instructions a total, the trees
// 2.6-3 a total: at K = 256 the separate reductions were a third of an AVX-512 4x4 block's
// instructions, a tenth of an AVX2 one's.
#if defined(CPU_CAPABILITY_AVX512)
// Lane L (of four) of the result: the lane-L partial sums of acc[0..3].
C10_ALWAYS_INLINE __m512 quad_lanes(const FloatVec* acc) {
  __m512 pairs[2];
  for (int i = 0; i < 2; ++i) {
    const __m512 x = acc[2 * i], y = acc[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  const __m512d x = _mm512_castps_pd(pairs[0]), y = _mm512_castps_pd(pairs[1]);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}

// sums[0..16) = the totals of acc[0..16).
C10_ALWAYS_INLINE void totals16(const FloatVec* acc, float* sums) {
  __m512 quads[4], halves[2];
  for (int j = 0; j < 4; ++j) quads[j] = quad_lanes(acc + 4 * j);
  // lanes added in pairs across 128-bit lanes, twice: lane j of the result holds the totals of
  // acc[4j .. 4j+3], in order
  for (int h = 0; h < 2; ++h) {
    const __m512 x = quads[2 * h], y = quads[2 * h + 1];
    halves[h] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  _mm512_storeu_ps(sums, _mm512_add_ps(
      _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
      _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1))));
}

// sums[0..4) = the totals of acc[0..4).
C10_ALWAYS_INLINE void totals4(const FloatVec* acc, float* sums) {
  const __m512 q = quad_lanes(acc);
  const __m512 t = _mm512_add_ps(q, _mm512_shuffle_f32x4(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 u = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(sums, _mm512_castps512_ps128(u));
}
constexpr int kTreeGroup = 16;
#elif defined(CPU_CAPABILITY_AVX2)
// Lane L (of two) of the result: the lane-L partial sums of acc[0..3].
C10_ALWAYS_INLINE __m256 quad_lanes(const FloatVec* acc) {
  __m256 pairs[2];
  for (int i = 0; i < 2; ++i) {
    const __m256 x = acc[2 * i], y = acc[2 * i + 1];
    pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
  }
  const __m256d x = _mm256_castps_pd(pairs[0]), y = _mm256_castps_pd(pairs[1]);
  return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                       _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
}

// sums[0..8) = the totals of acc[0..8).
C10_ALWAYS_INLINE void totals8(const FloatVec* acc, float* sums) {
  const __m256 lo = quad_lanes(acc), hi = quad_lanes(acc + 4);
  _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20),
                                       _mm256_permute2f128_ps(lo, hi, 0x31)));
}

// sums[0..4) = the totals of acc[0..4).
C10_ALWAYS_INLINE void totals4(const FloatVec* acc, float* sums) {
  const __m256 q = quad_lanes(acc);
  _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
}
constexpr int kTreeGroup = 8;
#endif

// sums[i] = the total of acc[i]'s lanes, i < N: by trees where N allows (groups of 16 / 8,
// then of 4), else one accumulator at a time.
template <int N>
inline void lane_totals(const FloatVec (&acc)[N], float* sums) {
  int i = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (N % 4 == 0) {
    for (; i + kTreeGroup <= N; i += kTreeGroup) {
#if defined(CPU_CAPABILITY_AVX512)
      totals16(acc + i, sums + i);
#else
      totals8(acc + i, sums + i);
#endif
    }
    for (; i < N; i += 4) totals4(acc + i, sums + i);
  }
#endif
  for (; i < N; ++i)
    sums[i] = at::vec::vec_reduce_all<float>([](FloatVec& x, FloatVec& y) { return x + y; },
                                            acc[i]);
}

// Vector registers: AVX-512 has 32, AVX2 (and the baseline's SSE pairs) 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

// v kept in a register: an empty asm that "changes" it, so the compiler cannot re-read it
// from memory at each use.
C10_ALWAYS_INLINE void pin(FloatVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  asm("" : "+v"(r));
  v = FloatVec(r);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  asm("" : "+x"(r));
  v = FloatVec(r);
#else
  (void)v;  // the baseline's vectors are arrays: nothing to pin
#endif
}

// One step of dot_block: K elements [k, k + count) of the MB x NB dot products. Always
// inlined, and called with count = kDotStep in the main loop, so that the loop has no
// masked loads and the accumulators stay in registers: called with a run-time count in one
// loop, GCC kept the count's branches in every step and stored the accumulators to the stack
// each step. W's vectors are pinned to registers where they fit beside the accumulators:
// otherwise GCC folded their loads into the FMAs, one load of each W vector per row of A,
// and the loop ran on the load ports (AVX-512, W [768, 256], 1 / 2 / 3 / 4 / 8 rows: 10.5 /
// 14.4 / 20.0 / 24.7 / 48.9 us in one loop, 10.1 / 12.2 / 15.6 / 18.5 / 36.0 split and
// pinned).
template <int MB, int NB, typename TA, typename TW>
C10_ALWAYS_INLINE void dot_step(FloatVec (&acc)[MB * NB], int64_t k, int64_t count,
                                const TA* A, int64_t lda, const TW* W, int64_t ldw) {
  if constexpr (std::is_same_v<TA, float> && std::is_same_v<TW, float> &&
                kRegisters < MB * NB + 2 * NB + 2 && kRegisters >= MB * NB + NB + 1) {
    // fp32 where a step's W vectors do not all fit beside the accumulators: the step in two
    // halves of one vector each, the half's NB W vectors pinned (loaded once, not once a row)
    if (count == kDotStep) {
      for (int half = 0; half < 2; ++half) {
        const int64_t kh = k + half * FloatVec::size();
        FloatVec w[NB];
        for (int n = 0; n < NB; ++n) {
          w[n] = FloatVec::loadu(W + n * ldw + kh);
          pin(w[n]);
        }
        for (int m = 0; m < MB; ++m) {
          const FloatVec a = FloatVec::loadu(A + m * lda + kh);
          for (int n = 0; n < NB; ++n)
            acc[m * NB + n] = at::vec::fmadd(a, w[n], acc[m * NB + n]);
        }
      }
      return;
    }
  }
  std::pair<FloatVec, FloatVec> w[NB];
  for (int n = 0; n < NB; ++n) {
    w[n] = load_step(W + n * ldw + k, count);
    if constexpr (kRegisters >= MB * NB + 2 * NB + 2) {
      pin(w[n].first);
      pin(w[n].second);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const auto a = load_step(A + m * lda + k, count);
    for (int n = 0; n < NB; ++n) {
      FloatVec& s = acc[m * NB + n];
      s = at::vec::fmadd(a.first, w[n].first, s);
      s = at::vec::fmadd(a.second, w[n].second, s);
    }
  }
}

// MB rows of A against NB rows of W: MB x NB vector accumulators over K, reduced at the end.
// Each W step is loaded (and converted) once for the MB rows; the NB W rows are reused from
// L1 by the next row block of A.
template <int MB, int NB, typename TA, typename TW>
void dot_block(int64_t K, const TA* A, int64_t lda, const TW* W, int64_t ldw, float* C,
               int64_t ldc, int64_t ldc_n, bool accumulate) {
  FloatVec acc[MB * NB];  // [m][n]
  for (int i = 0; i < MB * NB; ++i) acc[i] = FloatVec(0.f);
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; k + kDotStep <= K; k += kDotStep)
    dot_step<MB, NB>(acc, k, kDotStep, A, lda, W, ldw);
#endif
  // AVX2 (and the baseline): one loop with run-time counts. Split there, W's loads folded into
  // the FMAs (16 registers leave W no room beside 3 x 4 or 4 x 4 accumulators) made 3 to 8
  // rows 25-45% slower (fp32, W [768, 256], 4 rows 23.5 -> 34.2 us).
  for (; k < K; k += kDotStep)
    dot_step<MB, NB>(acc, k, std::min(kDotStep, K - k), A, lda, W, ldw);
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
