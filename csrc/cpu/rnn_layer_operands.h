// What the CPU layer's forward and backward (rnn_layer.cpp, rnn_layer_bwd.cpp) start from:
// the checked operands in their compute dtype, whether the products take bf16 operands, and
// a step's product on raw pointers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <type_traits>

#include "matmul.h"
#include "rnn_kernels.h"

namespace seqkern::cpu {

// fp64 computes in fp64, every other dtype in fp32.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// The arguments both directions of the op start from: checked, in the compute dtype (x and
// the weights of bf16 products in bf16), the input flattened to [N, I].
struct LayerOperands {
  RnnMode mode;
  at::ScalarType dtype;
  int64_t H, P, G, N;  // hidden size, state size (P < H with a projection, else H)
  at::Tensor x, w_ih, w_hh, w_hr;  // w_hr undefined without a projection
  // The products take bf16 operands (bf16_products_for): x, w_ih and w_hh are then bf16.
  // With prepare's weights_as_given, fp16 / bf16 w_ih and w_hh of fp32 products stay in
  // their dtype: the caller converts the ones it packs (as_compute) and reads the others as
  // they are (keep_weight).
  bool bf16;
};

LayerOperands prepare(const std::string& mode_name, const at::Tensor& input,
                      const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                      const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                      const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& w_hr, bool weights_as_given = false);

// Whether a layer's products take bf16 operands: bf16 input on a CPU with native bf16 products
// (AVX512-BF16), with fp32 accumulation, as torch's bf16 layers do. Not with a projection, nor
// with an odd I or H (the products pair consecutive k).
bool bf16_products_for(const at::Tensor& input, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& w_hr);

// out [n, b.N] (row stride ldc) (+)= a [n, b.K] (row stride lda) @ b, on the row blocks of
// one step: no tensor views in the time loop (their cost rivals a small step's product).
// Step i walks b in the direction opposite to step i - 1 (see tiled_matmul_raw): a weight
// larger than L2 (W_hh, 4 MB fp32 at H = 512) is then partly read from L2 instead of L3.
template <typename T>
void step_product(size_t i, int64_t n, const T* a, int64_t lda, const PackedRight& b, T* out,
                  int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    tiled_matmul_raw(n, a, lda, b, out, ldc, accumulate, /*backwards=*/i % 2 == 1);
  } else {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor o = at::from_blob(out, {n, b.N}, {ldc, 1}, opts);
    tiled_matmul_into(o, at::from_blob(const_cast<T*>(a), {n, b.K}, {lda, 1}, opts), b,
                      accumulate);
  }
}

}  // namespace seqkern::cpu
