// round_bf16_kernel.h's kernel, compiled inside each capability unit's CPU_CAPABILITY
// namespace (included by capability/instantiate.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

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

void transpose_round_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                          at::BFloat16* dst, int64_t ld_dst) {
  using FVec = at::vec::Vectorized<float>;
  constexpr int64_t kBlock = 16;
  float block[kBlock * kBlock];  // one 16 x 16 block transposed, then rounded row by row
  for (int64_t r = 0; r < rows; r += kBlock) {
    const int m = int(std::min<int64_t>(kBlock, rows - r));
    for (int64_t c = 0; c < cols; c += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, cols - c));
      at::vec::transpose_mxn<float>(src + r * ld_src + c, ld_src, block, kBlock, m, n);
      for (int j = 0; j < n; ++j) {  // destination row c + j: m values from column r on
        const float* b = block + j * kBlock;
        const int lo = int(std::min<int64_t>(m, FVec::size()));
        const FVec second = m > lo ? FVec::loadu(b + lo, m - lo) : FVec(0.f);
        at::vec::convert_from_float<at::BFloat16>(FVec::loadu(b, lo), second)
            .store(dst + (c + j) * ld_dst + r, m);
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
