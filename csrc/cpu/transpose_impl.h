// transpose_kernel.h's kernel, compiled inside each capability unit's CPU_CAPABILITY
// namespace (included by capability/instantiate.h).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "transpose_kernel.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

void transpose_block(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst,
                     int64_t ld_dst) {
  // Bands of 16 source rows, so that each band's 16 x 16 blocks read whole cache lines.
  for (int64_t r = 0; r < rows; r += 16)
    at::vec::transpose_mxn<float>(src + r * ld_src, ld_src, dst + r, ld_dst,
                                  int(std::min<int64_t>(16, rows - r)), int(cols));
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
