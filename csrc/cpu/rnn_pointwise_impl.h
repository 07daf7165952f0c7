// The pointwise halves of one recurrent step, forward and backward, for LSTM, GRU and
// vanilla RNN: the "cell descriptions" the whole-sequence driver (rnn_layer.cpp) runs
// between its matrix products. Vectorized with at::vec; compiled once per CPU capability
// (csrc/cpu/capability/) inside that unit's CPU_CAPABILITY namespace.
//
// Layouts, all row-major and contiguous, n live batch rows, hidden size H:
//   x_gates [n, G*H]  input projection of this step (its bias x_bias comes apart:
//                     b_ih, + b_hh for LSTM and RNN)
//   h_gates [n, G*H]  h_prev W_hh^T (+ b_hh for GRU)
//   saved   [n, W]    what the backward needs: LSTM W = 4H (i, f, g, o activated);
//                     GRU W = 4H (r, z, n activated, then h_prev W_hn^T + b_hn);
//                     RNN W = H (h' itself)
// G = 4 (LSTM), 3 (GRU), 1 (RNN).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <ATen/Parallel.h>

#include "threads.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "rnn_kernels.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

namespace rnn_detail {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// e^x for the activations. For float, inlined: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite,
// ln2 in two parts), e^r by its Taylor series to r^7 (the first term left out is under
// 1e-8 relative), times 2^n. Sleef's exp, a call per vector, made the LSTM cell's pointwise
// step 2.3x slower (14 against 6 us a step at B = 16, H = 512: 14% of the recurrence).
// AVX-512 scales with scalef (overflow to inf, underflow to 0); AVX2 builds 2^n in the
// exponent bits for x in [-87.3, 88.4] and gives inf above, 0 below (no subnormal results).
// NaN stays NaN. double keeps Sleef's.
// exp's argument range and p 2^n (x: the argument, for AVX2's ends), per instruction set.
#if defined(CPU_CAPABILITY_AVX512)
constexpr float kExpLow = -104.f, kExpHigh = 104.f;  // 2^n overflows / underflows in scalef
inline Vec<float> times_pow2(const Vec<float>& p, const Vec<float>& n, const Vec<float>&) {
  return _mm512_scalef_ps(p, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr float kExpLow = -87.3365447504f, kExpHigh = 88.3762626647949f;  // normal 2^n
inline Vec<float> times_pow2(const Vec<float>& p, const Vec<float>& n, const Vec<float>& x) {
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  // Beyond the clamp: inf above (1 / (1 + e^x) is then 0, as with an exact exp), 0 below.
  const __m256 big = _mm256_cmp_ps(x, _mm256_set1_ps(kExpHigh), _CMP_GT_OQ);
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLow), _CMP_LT_OQ);
  return _mm256_andnot_ps(tiny, _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), big));
}
#endif

template <typename T>
inline Vec<T> exp(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    using at::vec::fmadd;
    // minimum / maximum keep NaN.
    const Vec<T> xc = at::vec::minimum(Vec<T>(kExpHigh), at::vec::maximum(Vec<T>(kExpLow), x));
    const Vec<T> n = (xc * Vec<T>(1.44269504088896341f)).round();
    // ln2 = 0.693359375 - 2.12194440e-4 (+ ...), the first part exact in n * it.
    const Vec<T> r = fmadd(n, Vec<T>(2.12194440e-4f), fmadd(n, Vec<T>(-0.693359375f), xc));
    Vec<T> p(1.f / 5040);
    for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
      p = fmadd(p, r, Vec<T>(c));
    return times_pow2(p, n, x);
  }
#endif
  return x.exp();
}

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + exp(x.neg()));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// tanh for the cells' activations. For float, through one exp instead of Sleef's tanh (which
// took 11% of a fastrnns LSTM forward's recurrence): tanh|x| = (1 - t) / (1 + t)
// with t = exp(-2|x|), within a few ulp for |x| >= 1/4, and below that, where 1 - t cancels,
// the Taylor series to x^9 (the first term left out is under 1e-8 relative there). double
// (gradcheck, the float64 tests) keeps Sleef's.
template <typename T>
inline Vec<T> tanh(const Vec<T>& x) {
  if constexpr (!std::is_same_v<T, float>) {
    return x.tanh();
  } else {
    const Vec<T> one(1.f), a = x.abs();
    const Vec<T> t = exp(a * Vec<T>(-2.f));
    const Vec<T> large = (one - t) / (one + t);
    const Vec<T> x2 = x * x;
    const Vec<T> series = x + x * x2 * (Vec<T>(-1.f / 3) + x2 * (Vec<T>(2.f / 15) +
                                         x2 * (Vec<T>(-17.f / 315) + x2 * Vec<T>(62.f / 2835))));
    const Vec<T> signed_large = Vec<T>::blendv(large, large.neg(), x < Vec<T>(0.f));
    return Vec<T>::blendv(signed_large, series, a < Vec<T>(0.25f));
  }
}

// Runs f(j) over [j0, j1) in vector steps, then f_tail(j) for the rest.
template <typename T, typename F, typename FTail>
inline void for_lanes(int64_t j0, int64_t j1, const F& f, const FTail& f_tail) {
  int64_t j = j0;
  for (; j + Vec<T>::size() <= j1; j += Vec<T>::size()) f(j);
  for (; j < j1; ++j) f_tail(j);
}

// Hidden units per work item: a step's pointwise work is split over (row, unit chunk) so
// that small batches still use every thread.
constexpr int64_t kUnitChunk = 128;

// Runs body(r, j0, j1) for every row r < n and unit chunk [j0, j1) of [u0, u1), in parallel
// (serially inside a parallel region).
template <typename Body>
inline void for_rows_and_chunks(int64_t n, int64_t u0, int64_t u1, const Body& body) {
  const int64_t chunks = (u1 - u0 + kUnitChunk - 1) / kUnitChunk;
  ::seqkern::cpu::parallel_for(0, n * chunks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks, j0 = u0 + (item % chunks) * kUnitChunk;
      body(r, j0, std::min(u1, j0 + kUnitChunk));
    }
  });
}

}  // namespace rnn_detail

// Forward of one step, for hidden units [u0, u1) of every row. h_prev [n, H]: the previous
// state (read by GRU); h [n, H]: the new state (h_prev itself, or a second buffer when other
// threads still read h_prev); c [n, H] (LSTM only) holds the previous cell state on entry and
// the new one on exit. saved may be nullptr (inference: nothing is kept for a backward).
// x_bias [G*H] (or nullptr) is added to every row of x_gates: the layer's input projection
// leaves it out, so that it is not written into (and read back from) every row of a buffer
// the size of the whole sequence.
template <typename T>
void rnn_step_fwd(RnnMode mode, int64_t n, int64_t H, const T* x_gates, const T* x_bias,
                  const T* h_gates, const T* h_prev, T* h, T* c, T* saved, int64_t u0,
                  int64_t u1) {
  using namespace rnn_detail;
  using V = Vec<T>;
  const int64_t G = gate_count(mode);
  for_rows_and_chunks(n, u0, u1, [&](int64_t r, int64_t j0, int64_t j1) {
    const T* xrow = x_gates + r * G * H;
    // The biased input gate k at unit j, vector and scalar.
    const auto X = [&](int64_t k, int64_t j) {
      const V v = V::loadu(xrow + k * H + j);
      return x_bias ? v + V::loadu(x_bias + k * H + j) : v;
    };
    const auto Xs = [&](int64_t k, int64_t j) {
      return x_bias ? xrow[k * H + j] + x_bias[k * H + j] : xrow[k * H + j];
    };
    const T* hg = h_gates + r * G * H;
    const T* hp = h_prev + r * H;
    T* hr = h + r * H;
    if (mode == RnnMode::kLSTM) {
      T* cr = c + r * H;
      T* sv = saved ? saved + r * 4 * H : nullptr;
      for_lanes<T>(j0, j1, [&](int64_t j) {
        const V i = sigmoid(X(0, j) + V::loadu(hg + j));
        const V f = sigmoid(X(1, j) + V::loadu(hg + H + j));
        const V g = tanh(X(2, j) + V::loadu(hg + 2 * H + j));
        const V o = sigmoid(X(3, j) + V::loadu(hg + 3 * H + j));
        const V c_new = f * V::loadu(cr + j) + i * g;
        if (sv) i.store(sv + j), f.store(sv + H + j), g.store(sv + 2 * H + j), o.store(sv + 3 * H + j);
        c_new.store(cr + j);
        (o * tanh(c_new)).store(hr + j);
      }, [&](int64_t j) {
        const T i = sigmoid(Xs(0, j) + hg[j]), f = sigmoid(Xs(1, j) + hg[H + j]);
        const T g = std::tanh(Xs(2, j) + hg[2 * H + j]);
        const T o = sigmoid(Xs(3, j) + hg[3 * H + j]);
        const T c_new = f * cr[j] + i * g;
        if (sv) sv[j] = i, sv[H + j] = f, sv[2 * H + j] = g, sv[3 * H + j] = o;
        cr[j] = c_new;
        hr[j] = o * std::tanh(c_new);
      });
    } else if (mode == RnnMode::kGRU) {
      T* sv = saved ? saved + r * 4 * H : nullptr;
      for_lanes<T>(j0, j1, [&](int64_t j) {
        const V rg = sigmoid(X(0, j) + V::loadu(hg + j));
        const V z = sigmoid(X(1, j) + V::loadu(hg + H + j));
        const V hn = V::loadu(hg + 2 * H + j);
        const V nn = tanh(X(2, j) + rg * hn);
        if (sv) rg.store(sv + j), z.store(sv + H + j), nn.store(sv + 2 * H + j), hn.store(sv + 3 * H + j);
        (nn + z * (V::loadu(hp + j) - nn)).store(hr + j);
      }, [&](int64_t j) {
        const T rg = sigmoid(Xs(0, j) + hg[j]), z = sigmoid(Xs(1, j) + hg[H + j]);
        const T hn = hg[2 * H + j];
        const T nn = std::tanh(Xs(2, j) + rg * hn);
        if (sv) sv[j] = rg, sv[H + j] = z, sv[2 * H + j] = nn, sv[3 * H + j] = hn;
        hr[j] = nn + z * (hp[j] - nn);
      });
    } else {
      T* sv = saved ? saved + r * H : nullptr;
      const bool relu = mode == RnnMode::kRNN_RELU;
      for_lanes<T>(j0, j1, [&](int64_t j) {
        const V pre = X(0, j) + V::loadu(hg + j);
        const V out = relu ? at::vec::maximum(pre, V(T(0))) : tanh(pre);
        if (sv) out.store(sv + j);
        out.store(hr + j);
      }, [&](int64_t j) {
        const T pre = Xs(0, j) + hg[j];
        hr[j] = relu ? std::max(pre, T(0)) : std::tanh(pre);
        if (sv) sv[j] = hr[j];
      });
    }
  });
}

// Backward of one step, for hidden units [u0, u1) of every row. dh [n, H]: gradient of the step's output h' (in), replaced by the
// part of dL/dh_prev that does not go through W_hh (GRU: dh' * z; others: 0). dc [n, H]
// (LSTM): dL/dc' in, dL/dc_prev out. c_new, c_prev [n, H] (LSTM), h_prev [n, H] (GRU).
// dx_gates [n, G*H]: gradient of the pre-activations as seen by the input projection;
// dh_gates [n, G*H] (GRU only; for LSTM/RNN it equals dx_gates and is not written):
// gradient of h_prev W_hh^T + b_hh.
template <typename T>
void rnn_step_bwd(RnnMode mode, int64_t n, int64_t H, const T* saved, const T* c_new,
                  const T* c_prev, const T* h_prev, T* dh, T* dc, T* dx_gates, T* dh_gates,
                  int64_t u0, int64_t u1) {
  using namespace rnn_detail;
  using V = Vec<T>;
  const int64_t G = gate_count(mode);
  const V one(T(1));
  for_rows_and_chunks(n, u0, u1, [&](int64_t r, int64_t j0, int64_t j1) {
    T* dhr = dh + r * H;
    T* dxg = dx_gates + r * G * H;
    if (mode == RnnMode::kLSTM) {
      const T* sv = saved + r * 4 * H;
      const T* cn = c_new + r * H;
      const T* cp = c_prev + r * H;
      T* dcr = dc + r * H;
      for_lanes<T>(j0, j1, [&](int64_t j) {
        const V i = V::loadu(sv + j), f = V::loadu(sv + H + j);
        const V g = V::loadu(sv + 2 * H + j), o = V::loadu(sv + 3 * H + j);
        const V tc = tanh(V::loadu(cn + j));
        const V d_h = V::loadu(dhr + j);
        const V d_c = V::loadu(dcr + j) + d_h * o * (one - tc * tc);
        (d_c * g * i * (one - i)).store(dxg + j);
        (d_c * V::loadu(cp + j) * f * (one - f)).store(dxg + H + j);
        (d_c * i * (one - g * g)).store(dxg + 2 * H + j);
        (d_h * tc * o * (one - o)).store(dxg + 3 * H + j);
        (d_c * f).store(dcr + j);
        V(T(0)).store(dhr + j);
      }, [&](int64_t j) {
        const T i = sv[j], f = sv[H + j], g = sv[2 * H + j], o = sv[3 * H + j];
        const T tc = std::tanh(cn[j]);
        const T d_h = dhr[j];
        const T d_c = dcr[j] + d_h * o * (T(1) - tc * tc);
        dxg[j] = d_c * g * i * (T(1) - i);
        dxg[H + j] = d_c * cp[j] * f * (T(1) - f);
        dxg[2 * H + j] = d_c * i * (T(1) - g * g);
        dxg[3 * H + j] = d_h * tc * o * (T(1) - o);
        dcr[j] = d_c * f;
        dhr[j] = T(0);
      });
    } else if (mode == RnnMode::kGRU) {
      const T* sv = saved + r * 4 * H;
      const T* hp = h_prev + r * H;
      T* dhg = dh_gates + r * 3 * H;
      for_lanes<T>(j0, j1, [&](int64_t j) {
        const V rg = V::loadu(sv + j), z = V::loadu(sv + H + j);
        const V nn = V::loadu(sv + 2 * H + j), hn = V::loadu(sv + 3 * H + j);
        const V d_h = V::loadu(dhr + j);
        const V d_npre = d_h * (one - z) * (one - nn * nn);
        const V d_rpre = d_npre * hn * rg * (one - rg);
        const V d_zpre = d_h * (V::loadu(hp + j) - nn) * z * (one - z);
        d_rpre.store(dxg + j), d_zpre.store(dxg + H + j), d_npre.store(dxg + 2 * H + j);
        d_rpre.store(dhg + j), d_zpre.store(dhg + H + j), (d_npre * rg).store(dhg + 2 * H + j);
        (d_h * z).store(dhr + j);
      }, [&](int64_t j) {
        const T rg = sv[j], z = sv[H + j], nn = sv[2 * H + j], hn = sv[3 * H + j];
        const T d_h = dhr[j];
        const T d_npre = d_h * (T(1) - z) * (T(1) - nn * nn);
        const T d_rpre = d_npre * hn * rg * (T(1) - rg);
        const T d_zpre = d_h * (hp[j] - nn) * z * (T(1) - z);
        dxg[j] = dhg[j] = d_rpre;
        dxg[H + j] = dhg[H + j] = d_zpre;
        dxg[2 * H + j] = d_npre;
        dhg[2 * H + j] = d_npre * rg;
        dhr[j] = d_h * z;
      });
    } else {
      const T* sv = saved + r * H;
      const bool relu = mode == RnnMode::kRNN_RELU;
      for_lanes<T>(j0, j1, [&](int64_t j) {
        const V out = V::loadu(sv + j), d_h = V::loadu(dhr + j);
        // NaN passes d_h, as torch's threshold_backward (out <= 0 is false for NaN)
        const V d_pre = relu ? V::blendv(d_h, V(T(0)), out <= V(T(0))) : d_h * (one - out * out);
        d_pre.store(dxg + j);
        V(T(0)).store(dhr + j);
      }, [&](int64_t j) {
        const T out = sv[j];
        dxg[j] = relu ? (out <= T(0) ? T(0) : dhr[j]) : dhr[j] * (T(1) - out * out);
        dhr[j] = T(0);
      });
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
