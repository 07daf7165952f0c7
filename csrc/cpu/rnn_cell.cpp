// The CPU implementations of seqkern_C::rnn_cell_fwd / rnn_cell_gate_grads: argument
// checks, output allocation, dtype and capability dispatch. Kernels: rnn_cell_impl.h.
// The backward's products (dx, dh, dW, db) are plain GEMMs done by the caller
// (seqkern/ops/rnn_cells.py) with at::mm, which runs MKL on both cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "rnn_cell_kernels.h"

namespace seqkern::cpu {

std::string kernel_capability();  // attention.cpp

namespace {

CellMode parse_mode(const std::string& mode) {
  if (mode == "LSTM") return CellMode::kLSTM;
  if (mode == "GRU") return CellMode::kGRU;
  if (mode == "RNN_TANH") return CellMode::kRNNTanh;
  if (mode == "RNN_RELU") return CellMode::kRNNRelu;
  TORCH_CHECK(false, "seqkern rnn cell: mode must be LSTM, GRU, RNN_TANH or RNN_RELU, got ", mode);
}

bool poison_outputs() {
  const char* v = std::getenv("SEQKERN_POISON_OUTPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  return poison_outputs() ? at::full(shape, NAN, options) : at::empty(shape, options);
}

template <typename T>
View2<T> view2(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_2d(const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
              at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "seqkern rnn cell: ",
              name, " must be [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(), "seqkern rnn cell: ", name,
              " must be a CPU ", dtype, " tensor");
}

template <typename scalar_t>
void run_fwd(const CellProblem<scalar_t>& p, scalar_t* h, scalar_t* c, cell_acc_t<scalar_t>* saved) {
#if defined(__x86_64__)
  const std::string cap = kernel_capability();
  if (cap == "AVX512") return AVX512::rnn_cell_fwd_kernel<scalar_t>(p, h, c, saved);
  if (cap == "AVX2") return AVX2::rnn_cell_fwd_kernel<scalar_t>(p, h, c, saved);
#endif
  DEFAULT::rnn_cell_fwd_kernel<scalar_t>(p, h, c, saved);
}

// (h' [B, H], c' [B, H] for LSTM else [0], saved [B, cell_saved * H] in the accumulator dtype)
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_fwd_cpu(
    const std::string& mode_name, const at::Tensor& x, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  const CellMode mode = parse_mode(mode_name);
  const int64_t G = cell_gates(mode);
  TORCH_CHECK(x.dim() == 2, "seqkern rnn cell: input must be [B, I], got ", x.sizes());
  const int64_t B = x.size(0), I = x.size(1), H = hx.dim() == 2 ? hx.size(1) : -1;
  const auto dtype = x.scalar_type();
  check_2d(x, "input", B, I, dtype);
  check_2d(hx, "hx", B, H, dtype);
  check_2d(w_ih, "w_ih", G * H, I, dtype);
  check_2d(w_hh, "w_hh", G * H, H, dtype);
  const bool lstm = mode == CellMode::kLSTM;
  TORCH_CHECK(lstm == cx.has_value(), "seqkern rnn cell: cx is given iff mode is LSTM");
  if (lstm) check_2d(*cx, "cx", B, H, dtype);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "seqkern rnn cell: b_ih and b_hh go together");
  for (const auto* b : {&b_ih, &b_hh})
    if (b->has_value())
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == G * H && (*b)->scalar_type() == dtype,
                  "seqkern rnn cell: biases must be [", G * H, "] of the input's dtype");

  at::Tensor h = new_output({B, H}, x.options());
  at::Tensor c = new_output({lstm ? B : 0, lstm ? H : 0}, x.options());
  at::Tensor saved = new_output({B, cell_saved(mode) * H}, x.options().dtype(acc_dtype(dtype)));
  if (B == 0 || H == 0) return {h, c, saved};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rnn_cell_fwd", [&] {
    CellProblem<scalar_t> p{mode, B, I, H, view2<scalar_t>(x), view2<scalar_t>(hx),
                            lstm ? view2<scalar_t>(*cx) : View2<scalar_t>{},
                            view2<scalar_t>(w_ih), view2<scalar_t>(w_hh)};
    if (b_ih) {
      p.b_ih = b_ih->data_ptr<scalar_t>(), p.sb_ih = b_ih->stride(0);
      p.b_hh = b_hh->data_ptr<scalar_t>(), p.sb_hh = b_hh->stride(0);
    }
    run_fwd<scalar_t>(p, h.data_ptr<scalar_t>(), lstm ? c.data_ptr<scalar_t>() : nullptr,
                      saved.data_ptr<cell_acc_t<scalar_t>>());
  });
  return {h, c, saved};
}

// (d_gates_ih [B, G*H], d_gates_hh [B, 3H] for GRU else [0], d_hx_direct [B, H] for GRU
// else [0], d_cx [B, H] for LSTM else [0])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_gate_grads_cpu(
    const std::string& mode_name, const at::Tensor& grad_h, const std::optional<at::Tensor>& grad_c,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx, const at::Tensor& h,
    const at::Tensor& saved) {
  const CellMode mode = parse_mode(mode_name);
  const int64_t G = cell_gates(mode), S = cell_saved(mode);
  TORCH_CHECK(hx.dim() == 2, "seqkern rnn cell: hx must be [B, H], got ", hx.sizes());
  const int64_t B = hx.size(0), H = hx.size(1);
  const auto dtype = hx.scalar_type();
  const bool lstm = mode == CellMode::kLSTM, gru = mode == CellMode::kGRU;
  check_2d(grad_h, "grad_h", B, H, dtype);
  check_2d(h, "h", B, H, dtype);
  check_2d(saved, "saved", B, S * H, acc_dtype(dtype));
  if (grad_c) check_2d(*grad_c, "grad_c", B, H, dtype);
  TORCH_CHECK(!lstm || cx.has_value(), "seqkern rnn cell: the LSTM backward needs cx");
  if (lstm) check_2d(*cx, "cx", B, H, dtype);
  const at::Tensor grad_h_c = grad_h.contiguous(), hx_c = hx.contiguous(), h_c = h.contiguous();
  const at::Tensor saved_c = saved.contiguous();
  const at::Tensor grad_c_c = grad_c ? grad_c->contiguous() : at::Tensor();
  const at::Tensor cx_c = lstm ? cx->contiguous() : at::Tensor();

  at::Tensor d_ih = new_output({B, G * H}, hx.options());
  at::Tensor d_hh = new_output({gru ? B : 0, gru ? G * H : 0}, hx.options());
  at::Tensor d_hx = new_output({gru ? B : 0, gru ? H : 0}, hx.options());
  at::Tensor d_cx = new_output({lstm ? B : 0, lstm ? H : 0}, hx.options());
  if (B == 0 || H == 0) return {d_ih, d_hh, d_hx, d_cx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rnn_cell_gate_grads", [&] {
    using acc_t = cell_acc_t<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    auto out = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    auto args = std::make_tuple(mode, B, H, ptr(grad_h_c), ptr(grad_c_c), ptr(hx_c), ptr(cx_c),
                                ptr(h_c), saved_c.data_ptr<acc_t>(), out(d_ih), out(d_hh),
                                out(d_hx), out(d_cx));
#if defined(__x86_64__)
    const std::string cap = kernel_capability();
    if (cap == "AVX512") return std::apply(AVX512::rnn_cell_gate_grads_kernel<scalar_t>, args);
    if (cap == "AVX2") return std::apply(AVX2::rnn_cell_gate_grads_kernel<scalar_t>, args);
#endif
    std::apply(DEFAULT::rnn_cell_gate_grads_kernel<scalar_t>, args);
  });
  return {d_ih, d_hh, d_hx, d_cx};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  m.impl("rnn_cell_fwd", &seqkern::cpu::rnn_cell_fwd_cpu);
  m.impl("rnn_cell_gate_grads", &seqkern::cpu::rnn_cell_gate_grads_cpu);
}
