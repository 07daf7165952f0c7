#include "matmul.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

namespace seqkern::cpu {
namespace {
constexpr int64_t kTileM = 64;
constexpr int64_t kTileN = 64;
}  // namespace

namespace {
// Whether a 2-D tensor is a row-major matrix brgemm can read: unit column stride and a row
// stride of at least one row (degenerate strides of size-1 dims excluded).
bool row_major(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) && (t.stride(0) >= t.size(1) || t.size(0) <= 1) &&
         t.stride(0) >= 1;
}
}  // namespace

void tiled_matmul_into(at::Tensor& out, const at::Tensor& a_in, const at::Tensor& b_in,
                       bool accumulate) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && out.dim() == 2 &&
                  a_in.size(1) == b_in.size(0) && out.size(0) == a_in.size(0) &&
                  out.size(1) == b_in.size(1),
              "tiled_matmul_into: shapes do not match");
  const at::Tensor a = row_major(a_in) ? a_in : a_in.contiguous();
  const at::Tensor b = row_major(b_in) ? b_in : b_in.contiguous();
  if (!row_major(out)) {
    at::Tensor dense = accumulate ? out.contiguous() : at::empty(out.sizes(), out.options());
    tiled_matmul_into(dense, a, b, accumulate);
    out.copy_(dense);
    return;
  }
  const int64_t M = a.size(0), N = b.size(1), K = a.size(1);
  if (M == 0 || N == 0) return;
  if (out.scalar_type() != at::kFloat || K == 0) {
    if (accumulate) out.addmm_(a, b);
    else at::mm_out(out, a, b);
    return;
  }
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  float* C = out.data_ptr<float>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = out.stride(0);
  const int64_t m_tiles = (M + kTileM - 1) / kTileM, n_tiles = (N + kTileN - 1) / kTileN;
  at::parallel_for(0, m_tiles * n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t m0 = (tile / n_tiles) * kTileM, n0 = (tile % n_tiles) * kTileN;
      const int64_t rows = std::min(kTileM, M - m0), cols = std::min(kTileN, N - n0);
      at::native::cpublas::brgemm(rows, cols, K, lda, ldb, ldc, accumulate, A + m0 * lda,
                                  B + n0, C + m0 * ldc + n0, /*is_vnni=*/false);
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

at::Tensor tiled_matmul(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  tiled_matmul_into(out, a, b, false);
  return out;
}

}  // namespace seqkern::cpu
