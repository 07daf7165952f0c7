// Vectorized row helpers of the attention kernels. Included only by the per-capability
// translation units (csrc/cpu/capability/), inside their CPU_CAPABILITY namespace.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

template <typename acc_t>
inline acc_t horizontal_sum(const at::vec::Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[at::vec::Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t sum = 0;
  for (int64_t l = 0; l < at::vec::Vectorized<acc_t>::size(); ++l) sum += lanes[l];
  return sum;
}

// y[i] = exp(x[i] - shift) over n elements, returning the sum of y; vectorized.
template <typename acc_t>
inline acc_t exp_shift_sum(acc_t* x, int64_t n, acc_t shift) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vshift(shift);
  Vec vsum(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec y;
    if constexpr (std::is_same_v<acc_t, float>) {
      y = (Vec::loadu(x + i) - vshift).exp_u20();
    } else {
      y = (Vec::loadu(x + i) - vshift).exp();
    }
    y.store(x + i);
    vsum = vsum + y;
  }
  acc_t sum = horizontal_sum(vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec vbest = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size())
      vbest = at::vec::maximum(vbest, Vec::loadu(x + i));
    alignas(64) acc_t lanes[Vec::size()];
    vbest.store(lanes);
    for (int64_t l = 0; l < Vec::size(); ++l) best = std::max(best, lanes[l]);
  }
  for (; i < n; ++i) best = std::max(best, x[i]);
  return best;
}

// x[i] = exp(x[i] - shift[i]) over n elements (shift +inf gives 0).
template <typename acc_t>
inline void exp_minus(acc_t* x, const acc_t* shift, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec y = Vec::loadu(x + i) - Vec::loadu(shift + i);
    if constexpr (std::is_same_v<acc_t, float>) {
      y = y.exp_u20();
    } else {
      y = y.exp();
    }
    y.store(x + i);
  }
  for (; i < n; ++i) x[i] = std::exp(x[i] - shift[i]);
}

// x[i] *= alpha over n elements.
template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n, acc_t alpha) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * va).store(x + i);
  for (; i < n; ++i) x[i] *= alpha;
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
