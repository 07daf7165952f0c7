// The argument checks of seqkern_C's recurrent ops, shared by the CPU bindings
// (csrc/cpu/rnn_cell.cpp, rnn_layer.cpp) and the CUDA one (csrc/cuda/bind_rnn.cpp), which each
// add what only they need (dtypes, device type). Shapes: seqkern/ops/rnn_cells.py and
// seqkern/ops/rnn_layer.py. G is the gate count (4 LSTM, 3 GRU, 1 RNN).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <cstdint>
#include <optional>

namespace seqkern {

inline void check_rnn_2d(const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                         at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "seqkern rnn: ", name,
              " must be [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype && t.device() == device, "seqkern rnn: ", name,
              " must be a ", dtype, " tensor on ", device, ", got ", t.scalar_type(), " on ",
              t.device());
}

// rnn_cell_fwd: input [B, I], hx [B, H], cx [B, H] iff LSTM, w_ih [G*H, I], w_hh [G*H, H],
// biases [G*H] both or neither, one dtype and device.
inline void check_cell_args(int64_t G, bool lstm, const at::Tensor& x, const at::Tensor& hx,
                            const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(x.dim() == 2, "seqkern rnn cell: input must be [B, I], got ", x.sizes());
  TORCH_CHECK(hx.dim() == 2, "seqkern rnn cell: hx must be [B, H], got ", hx.sizes());
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  const auto dtype = x.scalar_type();
  check_rnn_2d(hx, "hx", B, H, dtype, x.device());
  check_rnn_2d(w_ih, "w_ih", G * H, I, dtype, x.device());
  check_rnn_2d(w_hh, "w_hh", G * H, H, dtype, x.device());
  TORCH_CHECK(lstm == cx.has_value(), "seqkern rnn cell: cx is given iff mode is LSTM");
  if (lstm) check_rnn_2d(*cx, "cx", B, H, dtype, x.device());
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "seqkern rnn cell: b_ih and b_hh go together");
  for (const auto* b : {&b_ih, &b_hh})
    if (b->has_value())
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == G * H && (*b)->scalar_type() == dtype &&
                      (*b)->device() == x.device(),
                  "seqkern rnn cell: biases must be [", G * H, "] of the input's dtype and device");
}

// rnn_cell_gate_grads / rnn_cell_bwd: grad_h, h [B, H] and grad_c [B, H] (optional) like hx;
// cx [B, H] for LSTM; saved: the forward's flat buffer of saved_numel elements of saved_dtype.
inline void check_gate_grad_args(bool lstm, const at::Tensor& grad_h,
                                 const std::optional<at::Tensor>& grad_c, const at::Tensor& hx,
                                 const std::optional<at::Tensor>& cx, const at::Tensor& h,
                                 const at::Tensor& saved, int64_t saved_numel,
                                 at::ScalarType saved_dtype) {
  TORCH_CHECK(hx.dim() == 2, "seqkern rnn cell: hx must be [B, H], got ", hx.sizes());
  const int64_t B = hx.size(0), H = hx.size(1);
  const auto dtype = hx.scalar_type();
  check_rnn_2d(grad_h, "grad_h", B, H, dtype, hx.device());
  check_rnn_2d(h, "h", B, H, dtype, hx.device());
  if (grad_c) check_rnn_2d(*grad_c, "grad_c", B, H, dtype, hx.device());
  TORCH_CHECK(!lstm || cx.has_value(), "seqkern rnn cell: the LSTM backward needs cx");
  if (lstm) check_rnn_2d(*cx, "cx", B, H, dtype, hx.device());
  TORCH_CHECK(saved.dim() == 1 && saved.numel() == saved_numel &&
                  saved.scalar_type() == saved_dtype && saved.device() == hx.device(),
              "seqkern rnn cell: saved must be the forward's flat ", saved_dtype, " buffer");
}

// The sizes of one recurrent layer: batch, hidden size, state size (P < H with an LSTM
// projection, else H).
struct LayerDims {
  int64_t B, H, P;
};

// rnn_layer_fwd / rnn_layer_bwd: input [T, B, I] or packed [N, I] with batch_sizes (int64 on
// the CPU, non-increasing, summing to N), w_ih [G*H, I], w_hh [G*H, P], w_hr [P, H] (LSTM
// projection, P < H) or none (P = H), h0 [B, P], c0 [B, H] (LSTM), biases [G*H] both or
// neither, all on the input's device. The kernels index by batch_sizes without bounds
// checks, so malformed ones are refused here.
inline LayerDims check_layer_args(int64_t G, bool lstm, const at::Tensor& input,
                                  const std::optional<at::Tensor>& batch_sizes,
                                  const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const std::optional<at::Tensor>& b_ih,
                                  const std::optional<at::Tensor>& b_hh,
                                  const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(batch_sizes ? input.dim() == 2 : input.dim() == 3,
              "rnn_layer: input must be [T, B, I], or packed data [N, I] with batch_sizes");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % G == 0, "rnn_layer: w_hh must be [G*H, P]");
  const int64_t H = w_hh.size(0) / G, P = w_hh.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == G * H && w_ih.size(1) == input.size(-1),
              "rnn_layer: w_ih must be [G*H, I]");
  TORCH_CHECK(w_hr ? (lstm && w_hr->dim() == 2 && w_hr->size(0) == P && w_hr->size(1) == H &&
                      P < H)
                   : P == H,
              "rnn_layer: w_hh must be [G*H, H], or [4H, P] with an LSTM projection w_hr "
              "[P, H], P < H");
  int64_t B = batch_sizes ? 0 : input.size(1);
  if (batch_sizes) {
    TORCH_CHECK(batch_sizes->dim() == 1 && batch_sizes->device().is_cpu(),
                "rnn_layer: batch_sizes must be a 1-D CPU tensor");
    const at::Tensor sizes = batch_sizes->to(at::kLong).contiguous();
    const int64_t* s = sizes.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t t = 0; t < sizes.numel(); ++t) {
      TORCH_CHECK(s[t] >= 0 && (t == 0 || s[t] <= s[t - 1]),
                  "rnn_layer: batch_sizes must be non-increasing, as torch packs them");
      total += s[t];
    }
    TORCH_CHECK(total == input.size(0), "rnn_layer: batch_sizes sum to ", total,
                " rows, the packed input has ", input.size(0));
    B = sizes.numel() ? s[0] : 0;
  }
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == B && h0.size(1) == P, "rnn_layer: h0 must be [",
              B, ", ", P, "], got ", h0.sizes());
  TORCH_CHECK(!lstm || (c0 && c0->dim() == 2 && c0->size(0) == B && c0->size(1) == H),
              "rnn_layer: LSTM needs c0 [", B, ", ", H, "]");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value() &&
                  (!b_ih || (b_ih->numel() == G * H && b_hh->numel() == G * H)),
              "rnn_layer: b_ih and b_hh go together, each [G*H]");
  for (const std::optional<at::Tensor>& t :
       {std::optional<at::Tensor>(h0), c0, std::optional<at::Tensor>(w_ih),
        std::optional<at::Tensor>(w_hh), b_ih, b_hh, w_hr})
    TORCH_CHECK(!t || t->device() == input.device(),
                "rnn_layer: every tensor must be on the input's device (", input.device(), ")");
  return {B, H, P};
}

// rnn_layer_bwd's incoming gradients, each optional: grad_output with the output's N * P
// elements (read as [N, P]), grad_hn [B, P] and grad_cn [B, H] (h_n's and c_n's shapes). The
// kernels read them without bounds checks.
inline void check_layer_grads(const LayerDims& dims, int64_t N,
                              const std::optional<at::Tensor>& grad_output,
                              const std::optional<at::Tensor>& grad_hn,
                              const std::optional<at::Tensor>& grad_cn) {
  TORCH_CHECK(!grad_output || grad_output->numel() == N * dims.P,
              "rnn_layer_bwd: grad_output must have the output's ", N * dims.P,
              " elements, got ", grad_output->sizes());
  TORCH_CHECK(!grad_hn || (grad_hn->dim() == 2 && grad_hn->size(0) == dims.B &&
                           grad_hn->size(1) == dims.P),
              "rnn_layer_bwd: grad_hn must be h_n's [", dims.B, ", ", dims.P, "]");
  TORCH_CHECK(!grad_cn || (grad_cn->dim() == 2 && grad_cn->size(0) == dims.B &&
                           grad_cn->size(1) == dims.H),
              "rnn_layer_bwd: grad_cn must be c_n's [", dims.B, ", ", dims.H, "]");
}

// rnn_layer_bwd's needs: which of its eight gradients the caller wants. An unwanted one is
// returned as [0] and its product skipped (the first layer's input is data more often than
// not, and its product, dx = dG W_ih, costs as much as dW_ih's).
struct LayerGradNeeds {
  bool input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr;
};

inline LayerGradNeeds layer_grad_needs(const c10::List<bool>& needs) {
  TORCH_CHECK(needs.size() == 8,
              "rnn_layer_bwd: needs must have 8 entries (d_input, d_h0, d_c0, d_w_ih, d_w_hh, "
              "d_b_ih, d_b_hh, d_w_hr), got ", needs.size());
  return {needs[0], needs[1], needs[2], needs[3], needs[4], needs[5], needs[6], needs[7]};
}

}  // namespace seqkern
