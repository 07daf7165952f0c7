// float rows rounded to bf16 (to nearest even; NaN stays NaN) with at::vec, compiled once per
// CPU capability like the other kernels (csrc/cpu/capability/): the recurrent layers' bf16 left
// operands, the state each forward step and the gate gradients each backward step.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "capability.h"

namespace seqkern::cpu {

// round_rows_bf16: dst[r, 0:cols] (row stride ld_dst) = src[r, 0:cols] (row stride ld_src)
// for r < rows. transpose_round_bf16: dst [cols, rows] (row stride ld_dst) = src [rows, cols]
// transposed (16 x 16 register blocks, as transpose_kernel.h) and rounded.
#define SEQKERN_DECLARE_ROUND_BF16(NS)                                                  \
  namespace NS {                                                                        \
  void round_rows_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src,    \
                       at::BFloat16* dst, int64_t ld_dst);                              \
  void transpose_round_bf16(const float* src, int64_t rows, int64_t cols,               \
                            int64_t ld_src, at::BFloat16* dst, int64_t ld_dst);         \
  }
SEQKERN_DECLARE_ROUND_BF16(DEFAULT)
SEQKERN_DECLARE_ROUND_BF16(AVX2)
SEQKERN_DECLARE_ROUND_BF16(AVX512)

inline void run_round_rows_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                                at::BFloat16* dst, int64_t ld_dst) {
  SEQKERN_CPU_DISPATCH(round_rows_bf16, src, rows, cols, ld_src, dst, ld_dst);
}

inline void run_transpose_round_bf16(const float* src, int64_t rows, int64_t cols,
                                     int64_t ld_src, at::BFloat16* dst, int64_t ld_dst) {
  SEQKERN_CPU_DISPATCH(transpose_round_bf16, src, rows, cols, ld_src, dst, ld_dst);
}

}  // namespace seqkern::cpu
