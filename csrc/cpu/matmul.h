// out (+)= a @ b for the recurrent layers' products, on oneDNN's brgemm micro-kernel for
// fp32 (MKL's sgemm ran at 80-100 GFLOP/s per core on these shapes on the AMD development
// machines, brgemm at about 250) and at::mm for fp64.
#pragma once

#include <ATen/ATen.h>

namespace seqkern::cpu {

// a [M, K], b [K, N], out [M, N]: 2-D, same dtype, any strides (operands that are not
// row-major are copied first). accumulate: out += a @ b, else out = a @ b. Parallel over
// output tiles.
void tiled_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// A new contiguous [M, N] = a @ b.
at::Tensor tiled_matmul(const at::Tensor& a, const at::Tensor& b);

}  // namespace seqkern::cpu
