// C (+)= A W^T with W read in place, row-major, as dot products of A's rows with W's rows,
// compiled once per CPU capability like the other kernels (csrc/cpu/capability/). For the
// recurrent layers' and cells' products used on a few rows only (a decoding step: T = 1,
// small B): the brgemm path first packs W^T into column panels, a transpose that cost 4-7x
// the products themselves there (GRU H = 512, B = 1: ~110 us to pack each 3 MB weight,
// ~15 us to multiply), and a cell's brgemm vectorises over B. A and W may be fp16 / bf16
// (converted as they are loaded; fp32 accumulation and output).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "capability.h"

namespace seqkern::cpu {

// C[m, n] (+)= sum_k A[m, k] W[n, k] for m < M, n in [n0, n1), k < K; A and W row-major
// with row strides lda, ldw; C[m, n] at C + m * ldc + n * ldc_n (ldc_n = 1: row-major; the
// cell's gate tiles are [n, m], ldc = 1); C is not read unless accumulate. Instantiated for
// (TA, TW) = (float, float), (float, Half), (float, BFloat16), (BFloat16, BFloat16).
#define SEQKERN_DECLARE_ROWS_DOT(NS)                                                        \
  namespace NS {                                                                            \
  template <typename TA, typename TW>                                                       \
  void rows_dot(int64_t M, int64_t K, const TA* A, int64_t lda, const TW* W, int64_t ldw,   \
                int64_t n0, int64_t n1, float* C, int64_t ldc, bool accumulate,             \
                int64_t ldc_n);                                                             \
  }
SEQKERN_DECLARE_ROWS_DOT(DEFAULT)
SEQKERN_DECLARE_ROWS_DOT(AVX2)
SEQKERN_DECLARE_ROWS_DOT(AVX512)

template <typename TA, typename TW>
void run_rows_dot(int64_t M, int64_t K, const TA* A, int64_t lda, const TW* W, int64_t ldw,
                  int64_t n0, int64_t n1, float* C, int64_t ldc, bool accumulate,
                  int64_t ldc_n = 1) {
  SEQKERN_CPU_DISPATCH(rows_dot, M, K, A, lda, W, ldw, n0, n1, C, ldc, accumulate, ldc_n);
}

}  // namespace seqkern::cpu
