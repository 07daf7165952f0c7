// round_bf16_kernel.h's kernel, compiled inside each capability unit's CPU_CAPABILITY
// namespace (included by capability/instantiate.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "round_bf16_kernel.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

void round_rows_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                     at::BFloat16* dst, int64_t ld_dst) {
  using FVec = at::vec::Vectorized<float>;
  constexpr int64_t kStep = 2 * FVec::size();  // one Vectorized<BFloat16>
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    at::BFloat16* d = dst + r * ld_dst;
    int64_t j = 0;
    for (; j + kStep <= cols; j += kStep)
      at::vec::convert_from_float<at::BFloat16>(FVec::loadu(s + j),
                                                FVec::loadu(s + j + FVec::size()))
          .store(d + j);
    for (; j < cols; ++j) d[j] = at::BFloat16(s[j]);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
