// The CPU implementations of seqkern_C::rnn_cell_fwd / rnn_cell_bwd: argument
// checks, output allocation, dtype and capability dispatch. Forward kernel:
// rnn_cell_impl.h; the gate gradients are the whole-sequence layer's pointwise step
// backward (rnn_pointwise_impl.h), and rnn_cell_bwd adds the products (dx, dh, dW, db).
// (rnn_cell_gate_grads, the pointwise part alone, is the CUDA binding's: the cpu backend
// runs the whole backward in rnn_cell_bwd.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "../below_autograd.h"
#include "../new_outputs.h"
#include "../rnn_args.h"
#include "matmul.h"
#include "rnn_cell_kernels.h"

namespace seqkern::cpu {

namespace {

template <typename T>
View2<T> view2(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t>
void run_fwd(const CellProblem<scalar_t>& p, scalar_t* h, scalar_t* c, cell_acc_t<scalar_t>* saved) {
  SEQKERN_CPU_DISPATCH(rnn_cell_fwd_kernel<scalar_t>, p, h, c, saved);
}

// (h' [B, H], c' [B, H] for LSTM else [0, 0], saved: flat, accumulator dtype, layout in
// rnn_cell_kernels.h)
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_fwd_cpu(
    const std::string& mode_name, const at::Tensor& x, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  const RnnMode mode = parse_rnn_mode(mode_name, "seqkern rnn cell");
  const bool lstm = mode == RnnMode::kLSTM;
  check_cell_args(gate_count(mode), lstm, x, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  const auto dtype = x.scalar_type();

  at::Tensor h = new_output({B, H}, x.options());
  at::Tensor c = new_output({lstm ? B : 0, lstm ? H : 0}, x.options());
  at::Tensor saved = new_output({cell_saved_numel(mode, B, H)}, x.options().dtype(acc_dtype(dtype)));
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

// The gradients of the gate pre-activations, in the accumulator dtype: d_gates_ih [B, G*H],
// d_gates_hh [B, G*H] (GRU; else the same tensor), d_hx_direct [B, H] (GRU: the gradient
// reaching hx around the products; else dh itself, unused), d_cx [B, H] (LSTM; else
// undefined). grad_c may be absent (LSTM with only h' used); saved is the forward's.
struct GateGrads {
  at::Tensor d_ih, d_hh, d_hx_direct, d_cx;
};

GateGrads gate_grads(RnnMode mode, const at::Tensor& grad_h,
                     const std::optional<at::Tensor>& grad_c, const at::Tensor& hx,
                     const std::optional<at::Tensor>& cx, const at::Tensor& h,
                     const at::Tensor& saved) {
  const int64_t G = gate_count(mode);
  const bool lstm = mode == RnnMode::kLSTM, gru = mode == RnnMode::kGRU;
  const auto acc = acc_dtype(hx.scalar_type());
  check_gate_grad_args(lstm, grad_h, grad_c, hx, cx, h, saved,
                       hx.dim() == 2 ? cell_saved_numel(mode, hx.size(0), hx.size(1)) : -1, acc);
  const int64_t B = hx.size(0), H = hx.size(1);

  // rnn_step_bwd works in the accumulator dtype on contiguous rows; dh and dc are in/out.
  const auto acc_opts = hx.options().dtype(acc);
  at::Tensor dh = at::empty({B, H}, acc_opts).copy_(grad_h);
  at::Tensor dc = !lstm ? at::Tensor()
                  : grad_c ? at::empty({B, H}, acc_opts).copy_(*grad_c)
                           : at::zeros({B, H}, acc_opts);
  const at::Tensor c_prev = lstm ? cx->to(acc).contiguous() : at::Tensor();
  const at::Tensor h_prev = gru ? hx.to(acc).contiguous() : at::Tensor();
  const at::Tensor saved_c = saved.contiguous();
  at::Tensor dx_gates = at::empty({B, G * H}, acc_opts);
  at::Tensor dh_gates = gru ? at::empty({B, G * H}, acc_opts) : dx_gates;
  if (B > 0 && H > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "rnn_cell_gate_grads", [&] {
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      const scalar_t* sv = saved_c.data_ptr<scalar_t>();
      run_rnn_step_bwd<scalar_t>(mode, B, H, sv, lstm ? sv + 4 * B * H : nullptr, ptr(c_prev),
                                 ptr(h_prev), dh.data_ptr<scalar_t>(), ptr(dc),
                                 dx_gates.data_ptr<scalar_t>(), dh_gates.data_ptr<scalar_t>());
    });
  }
  return {dx_gates, dh_gates, dh, dc};
}

// The whole cell backward in one call (seqkern/ops/rnn_cells.py, rnn_cell_bwd): the gate
// gradients, then the products dx = dG_ih W_ih, dhx = dG_hh W_hh (+ GRU's direct part),
// dW_ih = dG_ih^T x, dW_hh = dG_hh^T hx and the bias sums. needs[k] says whether gradient k
// (dx, dhx, dcx, dw_ih, dw_hh, db_ih, db_hh) is wanted; an unwanted one comes back as [0].
// fp32 runs the products on brgemm with the weights read in place (matmul_once); the other
// dtypes take the gate gradients back to the input dtype and use at::mm, as torch would.
std::vector<at::Tensor> rnn_cell_bwd_cpu(
    const std::string& mode_name, const at::Tensor& grad_h, const std::optional<at::Tensor>& grad_c,
    const at::Tensor& x, const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_bias, const at::Tensor& h,
    const at::Tensor& saved, c10::List<bool> needs) {
  const RnnMode mode = parse_rnn_mode(mode_name, "seqkern rnn cell");
  TORCH_CHECK(needs.size() == 7, "seqkern rnn cell: needs must have 7 entries");
  TORCH_CHECK(x.dim() == 2 && hx.dim() == 2 && x.size(0) == hx.size(0),
              "seqkern rnn cell: input must be [B, I] with hx's batch, got ", x.sizes());
  const int64_t G = gate_count(mode), H = hx.size(1);
  const auto dtype = hx.scalar_type();
  check_rnn_2d(w_ih, "w_ih", G * H, x.size(1), dtype, hx.device());
  check_rnn_2d(w_hh, "w_hh", G * H, H, dtype, hx.device());
  const GateGrads g = gate_grads(mode, grad_h, grad_c, hx, cx, h, saved);
  const bool fp32 = dtype == at::kFloat, lstm = mode == RnnMode::kLSTM,
             gru = mode == RnnMode::kGRU;
  const at::Tensor d_ih = fp32 ? g.d_ih : g.d_ih.to(dtype);
  const at::Tensor d_hh = !gru ? d_ih : fp32 ? g.d_hh : g.d_hh.to(dtype);
  std::vector<at::Tensor> grads(7);
  if (needs[0]) grads[0] = matmul_once(d_ih, w_ih);
  if (needs[1]) {
    grads[1] = matmul_once(d_hh, w_hh);
    if (gru) grads[1].add_(g.d_hx_direct);
  }
  if (needs[2] && lstm) grads[2] = g.d_cx.to(dtype);
  if (needs[3] || needs[4]) {
    // dG^T as a row-major operand: [G*H, B], transposed once, small.
    const at::Tensor d_ih_t = d_ih.t().contiguous();
    if (needs[3]) grads[3] = matmul_once(d_ih_t, x);
    if (needs[4]) grads[4] = matmul_once(gru ? d_hh.t().contiguous() : d_ih_t, hx);
  }
  if (has_bias && needs[5]) grads[5] = d_ih.sum(0);
  if (has_bias && needs[6]) grads[6] = d_hh.sum(0);
  for (auto& t : grads)
    if (!t.defined()) t = at::empty({0}, x.options());
  return grads;
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  using namespace seqkern::cpu;
  using seqkern::below_autograd;
  m.impl("rnn_cell_fwd", below_autograd<&rnn_cell_fwd_cpu>);
  m.impl("rnn_cell_bwd", below_autograd<&rnn_cell_bwd_cpu>);
}
