// A float matrix transposed in 16 x 16 register blocks (at::vec::transpose_mxn: AVX-512
// shuffles where the CPU has them), compiled once per CPU capability like the other kernels
// (csrc/cpu/capability/). For the recurrent layers' weight panels and weight-gradient
// operands (matmul.cpp): the scalar 16 x 16 tile loop it replaces moved about 8 GB/s.
#pragma once

#include <cstdint>

#include "capability.h"

namespace seqkern::cpu {

// dst [cols, rows] (row stride ld_dst) = src [rows, cols] (row stride ld_src) transposed.
#define SEQKERN_DECLARE_TRANSPOSE(NS)                                                    \
  namespace NS {                                                                         \
  void transpose_block(const float* src, int64_t rows, int64_t cols, int64_t ld_src,     \
                       float* dst, int64_t ld_dst);                                      \
  }
SEQKERN_DECLARE_TRANSPOSE(DEFAULT)
SEQKERN_DECLARE_TRANSPOSE(AVX2)
SEQKERN_DECLARE_TRANSPOSE(AVX512)

inline void run_transpose_block(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                                float* dst, int64_t ld_dst) {
  SEQKERN_CPU_DISPATCH(transpose_block, src, rows, cols, ld_src, dst, ld_dst);
}

}  // namespace seqkern::cpu
