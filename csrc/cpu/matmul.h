// out (+)= a @ b for the recurrent layers' products, on oneDNN's brgemm micro-kernel for
// fp32 (MKL's sgemm ran at 80-100 GFLOP/s per core on these shapes on the AMD development
// machines, brgemm at about 200-250) and at::mm for fp64.
#pragma once

#include <ATen/ATen.h>

namespace seqkern::cpu {

constexpr int64_t kPanelWidth = 64;

// The right operand b [K, N] repacked as column panels: panels [ceil(N / 64), K, 64], each
// contiguous (the last one zero-padded), so that one output tile streams one panel. Pack a
// matrix that is used many times (W_hh across time steps) once.
struct PackedRight {
  at::Tensor panels;  // fp32 panels, or for other dtypes b itself (at::mm path)
  int64_t K, N;
  // bf16 pairs instead (pack_right_bf16): panels [ceil(N / 64), K / 2, 64] of 32-bit units,
  // each unit two bf16 of consecutive k (the VNNI layout brgemm's bf16 kernels read).
  bool bf16 = false;
  // Operands kept as given instead of packed, for products used on a few rows in all
  // (packing copies the whole matrix, a transpose for b = W^T, which costs several times
  // such a product): kWeightRows, `panels` is W [N, K] itself (b = W^T, row-major fp32, fp16
  // or bf16 W), the products rows_dot's dot products of A's rows with W's rows; kRowMajor,
  // `panels` is an fp32 b [K, N] itself (row-major), which brgemm reads through its row
  // stride.
  enum class Layout { kPanels, kWeightRows, kRowMajor } layout = Layout::kPanels;
  bool as_given() const { return layout != Layout::kPanels; }  // kept, not packed
};
PackedRight pack_right(const at::Tensor& b);

// The right operand b = W^T of a row-major fp32, fp16 or bf16 W [N, K], kept as W itself
// (Layout::kWeightRows), for fp32 left operands or, with bf16_products, bf16 ones as
// pack_right_bf16's (a bf16 W only: the op called directly may pair bf16 input with other
// weights, which packing rounds). keeps_weight: whether w can be kept so. Takes W, not W^T:
// a decoding step calls this for two weights, and each transposed view cost ~1 us.
bool keeps_weight(const at::Tensor& w, bool bf16_products);
PackedRight keep_weight(const at::Tensor& w, bool bf16_products);

// A row-major fp32 b [K, N], kept as it is (Layout::kRowMajor).
PackedRight keep_rows(const at::Tensor& b);

// b = W^T for a row-major W [N, K] of any floating dtype, K even: W rounded to bf16 and packed
// in VNNI panels, the right operand of the bf16 products below. Use where
// bf16_products_available().
PackedRight pack_right_bf16(const at::Tensor& b);

// b [K, N] (bf16, rows of unit stride) packed as pack_right_bf16 packs W^T, for a b that is
// row-major already (the weight gradients' right operands x and h_prev, W_ih in dx = dG W_ih):
// each 32-bit unit pairs rows 2q and 2q + 1, no transpose. An odd K gets a zero row (the
// result's K is even: the left operand needs that many columns, see transposed_bf16).
PackedRight pack_rows_bf16(const at::Tensor& b);

// m^T for a row-major fp32 m [R, C], rounded to bf16 with an even number of columns:
// [C, R + R % 2], the added column zero. The left operand of a product whose right operand
// pack_rows_bf16 packed from R rows (and padded).
at::Tensor transposed_bf16(const at::Tensor& m);

// Whether this CPU runs brgemm's bf16 kernels natively (AVX512-BF16) and they are tested here:
// not on AMX machines (a different kernel, untested), nor where SEQKERN_CPU_BF16_PRODUCTS=0.
bool bf16_products_available();

// tiled_matmul_raw / panel_matmul_raw with a bf16 left operand and b from pack_right_bf16:
// fp32 accumulation and output.
void tiled_matmul_raw(int64_t M, const at::BFloat16* A, int64_t lda, const PackedRight& b,
                      float* C, int64_t ldc, bool accumulate, bool backwards = false);
void panel_matmul_raw(int64_t M, const at::BFloat16* A, int64_t lda, const PackedRight& b,
                      int64_t panel0, int64_t panels, float* C, int64_t ldc, bool accumulate,
                      bool backwards);

// a [M, K] (any strides), b packed [K, N], out [M, N] (any strides): accumulate ?
// out += a @ b : out = a @ b. Parallel over output tiles, panel-major so that consecutive
// tiles reuse one panel from cache.
void tiled_matmul_into(at::Tensor& out, const at::Tensor& a, const PackedRight& b,
                       bool accumulate);

// The fp32 core of tiled_matmul_into on row-major pointers: C [M, b.N] (row stride ldc)
// (+)= A [M, b.K] (row stride lda) @ b. For the per-step products of a recurrence, where
// making tensor views cost about as much as a small step's product. `backwards` reverses
// the order in which each thread walks b: alternate it from one call to the next on the same
// b so that the part of b the last call left in cache is read first.
void tiled_matmul_raw(int64_t M, const float* A, int64_t lda, const PackedRight& b, float* C,
                      int64_t ldc, bool accumulate, bool backwards = false);

// tiled_matmul_raw on the calling thread alone, for the output columns of panels
// [panel0, panel0 + panels) of b (columns panel0 * kPanelWidth on; C points at column 0):
// each thread of a team computes its own columns of one step's product.
void panel_matmul_raw(int64_t M, const float* A, int64_t lda, const PackedRight& b,
                      int64_t panel0, int64_t panels, float* C, int64_t ldc, bool accumulate,
                      bool backwards);

// A new contiguous [M, N] = a [M, K] @ b [K, N] for a product used once (a cell step's
// gradients): fp32 operands are read in place (when row-major) instead of packed, so a
// 1 MB weight is streamed once rather than copied and then read; other dtypes use at::mm.
at::Tensor matmul_once(const at::Tensor& a, const at::Tensor& b);

// out [M, N] (row-major) (+)= a [M, K] @ b [K, N], b read in place as matmul_once does.
void matmul_once_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                      bool accumulate);

// m^T as a new contiguous matrix: for fp32 a blocked transpose into cached memory (the
// weight gradients' left operand, each chunk's gate gradients [rows, G*H]; a strided
// at::Tensor::contiguous ran at about 2 GB/s here), other dtypes through ATen.
at::Tensor transposed(const at::Tensor& m);

}  // namespace seqkern::cpu
