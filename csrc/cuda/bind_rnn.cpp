// The CUDA implementations of seqkern_C::rnn_cell_fwd, rnn_cell_gate_grads, rnn_layer_fwd and
// rnn_layer_bwd: the CPU bindings' argument checks, output shapes and semantics
// (csrc/cpu/rnn_cell.cpp, rnn_layer.cpp), the large products on cuBLAS through ATen, and
// the framework-free kernels of rnn.h on the current stream for everything else.
// fp16/bf16/fp32 (fp64 is the CPU backend's). The layer workspace has the CPU layout and
// size in fp32 (rnn.h), so the ops' fakes hold for both backends.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../below_autograd.h"
#include "../new_outputs.h"
#include "../rnn_args.h"
#include "rnn.h"

namespace seqkern::cuda::rnn {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "seqkern cuda ", what, " failed: ", cudaGetErrorString(err));
}

CellKind parse_mode(const std::string& mode, const char* op) {
  if (mode == "LSTM") return CellKind::kLSTM;
  if (mode == "GRU") return CellKind::kGRU;
  if (mode == "RNN_TANH") return CellKind::kRnnTanh;
  if (mode == "RNN_RELU") return CellKind::kRnnRelu;
  TORCH_CHECK(false, op, ": mode must be LSTM, GRU, RNN_TANH or RNN_RELU, got ", mode);
}

DType kernel_dtype(at::ScalarType t, const char* op) {
  if (t == at::kHalf) return DType::kHalf;
  if (t == at::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(t == at::kFloat, op, " (cuda): dtype must be float16, bfloat16 or float32, got ", t);
  return DType::kFloat;
}

Strided2 strided(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.dim() > 1 ? t.stride(1) : 0};
}
Strided2 strided(const std::optional<at::Tensor>& t) { return t ? strided(*t) : Strided2{}; }

// bf16 layers' backward products on bf16 tensor cores, by default: on an H100 (bench/
// RESULTS.md, 2026-11-26) the fastrnns step's products went from fp32 cuBLAS (one sgemm
// alone 0.51 ms) to bf16 kernels of at most 0.045 ms each. SEQKERN_CUDA_RNN_BF16_GEMMS=0 runs
// them as fp32 cuBLAS on fp32 copies.
bool bf16_gemms_enabled() {
  const char* v = std::getenv("SEQKERN_CUDA_RNN_BF16_GEMMS");
  return !(v && v[0] == '0');
}

// a @ b in fp32 on cuBLAS; fp16/bf16 operands accumulate and are stored in fp32.
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat)).contiguous();
}

// (h' [B, H], c' [B, H] for LSTM else [0, 0], saved: flat fp32, layout in rnn.h)
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_fwd_cuda(
    const std::string& mode_name, const at::Tensor& x, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  const CellKind cell = parse_mode(mode_name, "seqkern rnn cell");
  const bool lstm = cell == CellKind::kLSTM;
  TORCH_CHECK(x.is_cuda(), "seqkern rnn cell (cuda): input must be a CUDA tensor");
  check_cell_args(gate_count(cell), lstm, x, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const int64_t B = x.size(0), H = hx.size(1);
  const DType kdtype = kernel_dtype(x.scalar_type(), "seqkern rnn cell");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = new_output({B, H}, x.options());
  at::Tensor c = new_output({lstm ? B : 0, lstm ? H : 0}, x.options());
  at::Tensor saved = new_output({B * H * (saved_width(cell) + (lstm ? 1 : 0))},
                                    x.options().dtype(at::kFloat));
  if (B == 0 || H == 0) return {h, c, saved};
  const at::Tensor gates_x = mm_f32(x, w_ih.t()), gates_h = mm_f32(hx, w_hh.t());
  check_cuda(rnn_cell_fwd(cell, kdtype, B, H, gates_x.data_ptr<float>(),
                          gates_h.data_ptr<float>(), strided(b_ih), strided(b_hh), strided(hx),
                          strided(cx), h.data_ptr(), lstm ? c.data_ptr() : nullptr,
                          saved.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
             "rnn_cell_fwd");
  return {h, c, saved};
}

// (d_gates_ih [B, G*H], d_gates_hh [B, 3H] for GRU else [0, 0], d_hx_direct [B, H] for GRU
// else [0, 0], d_cx [B, H] for LSTM else [0, 0]), in hx's dtype. grad_c may be absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_gate_grads_cuda(
    const std::string& mode_name, const at::Tensor& grad_h, const std::optional<at::Tensor>& grad_c,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx, const at::Tensor& h,
    const at::Tensor& saved) {
  const CellKind cell = parse_mode(mode_name, "seqkern rnn cell");
  const int64_t G = gate_count(cell);
  const bool lstm = cell == CellKind::kLSTM, gru = cell == CellKind::kGRU;
  TORCH_CHECK(hx.is_cuda(), "seqkern rnn cell (cuda): hx must be a CUDA tensor");
  const int64_t saved_per_unit = saved_width(cell) + (lstm ? 1 : 0);
  check_gate_grad_args(lstm, grad_h, grad_c, hx, cx, h, saved,
                       hx.dim() == 2 ? hx.size(0) * hx.size(1) * saved_per_unit : -1,
                       at::kFloat);
  const int64_t B = hx.size(0), H = hx.size(1);
  const DType kdtype = kernel_dtype(hx.scalar_type(), "seqkern rnn cell");

  const c10::cuda::CUDAGuard guard(hx.device());
  const auto opts = hx.options();
  const auto empty = [&] { return at::empty({0, 0}, opts); };
  at::Tensor d_ih = new_output({B, G * H}, opts);
  at::Tensor d_hh = gru ? new_output({B, G * H}, opts) : empty();
  at::Tensor d_hx = gru ? new_output({B, H}, opts) : empty();
  at::Tensor d_cx = lstm ? new_output({B, H}, opts) : empty();
  if (B > 0 && H > 0) {
    const at::Tensor saved_c = saved.contiguous();
    check_cuda(rnn_cell_gate_grads(cell, kdtype, B, H, strided(grad_h),
                                   lstm ? strided(grad_c) : Strided2{}, strided(hx), strided(cx),
                                   saved_c.data_ptr<float>(), d_ih.data_ptr(),
                                   gru ? d_hh.data_ptr() : nullptr, gru ? d_hx.data_ptr() : nullptr,
                                   lstm ? d_cx.data_ptr() : nullptr,
                                   c10::cuda::getCurrentCUDAStream().stream()),
               "rnn_cell_gate_grads");
  }
  return {d_ih, d_hh, d_hx, d_cx};
}

// The arguments both directions of the layer op start from: checked (as the CPU binding
// does, plus what the kernels rely on), converted to the input's dtype, the input flattened
// to [N, I], and the problem description (batch_sizes read on the host).
struct LayerOperands {
  CellKind cell;
  int64_t G, H, B, N;
  at::Tensor x, h0, c0, w_ih, w_hh, batch_sizes;
  LayerProblem problem;
};

LayerOperands prepare_layer(const std::string& mode_name, const at::Tensor& input,
                            const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                            const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh, bool reverse) {
  LayerOperands o;
  o.cell = parse_mode(mode_name, "rnn_layer");
  o.G = gate_count(o.cell);
  const bool lstm = o.cell == CellKind::kLSTM;
  TORCH_CHECK(input.is_cuda(), "rnn_layer (cuda): input must be a CUDA tensor");
  const DType dtype = kernel_dtype(input.scalar_type(), "rnn_layer");
  const LayerDims dims = check_layer_args(o.G, lstm, input, batch_sizes, h0, c0, w_ih, w_hh,
                                          b_ih, b_hh, std::nullopt);
  o.B = dims.B, o.H = dims.H;
  if (batch_sizes) o.batch_sizes = batch_sizes->to(at::kLong).contiguous();
  const auto dt = input.scalar_type();
  o.x = input.reshape({-1, input.size(-1)});
  o.N = o.x.size(0);
  o.h0 = h0.to(dt), o.w_ih = w_ih.to(dt), o.w_hh = w_hh.to(dt);
  if (lstm) o.c0 = c0->to(dt);
  o.problem.cell = o.cell, o.problem.dtype = dtype, o.problem.batch = o.B, o.problem.hidden = o.H;
  o.problem.steps = batch_sizes ? o.batch_sizes.numel() : input.size(0);
  o.problem.batch_sizes = batch_sizes ? o.batch_sizes.data_ptr<int64_t>() : nullptr;
  o.problem.reverse = reverse;
  TORCH_CHECK(rnn_layer_supported(o.problem), "rnn_layer (cuda): needs G*H <= ", kMaxGateRows,
              " and fewer than 2^31 rows, got G*H = ", o.G * o.H, ", ", o.N, " rows");
  return o;
}

at::Tensor new_scratch(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_fwd_cuda(
    const std::string& mode_name, const at::Tensor& input,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    bool need_workspace, const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(!w_hr, "seqkern cuda rnn_layer: LSTM projections (proj_size) are not supported");
  const LayerOperands o =
      prepare_layer(mode_name, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse);
  const int64_t H = o.H, B = o.B, N = o.N;
  const bool lstm = o.cell == CellKind::kLSTM, gru = o.cell == CellKind::kGRU;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  at::Tensor out = new_output({N, H}, opts);
  at::Tensor h_n = new_output({B, H}, opts);
  at::Tensor c_n = lstm ? new_output({B, H}, opts) : at::empty({0}, opts);
  at::Tensor workspace = new_output(
      {need_workspace ? rnn_layer_workspace_numel(o.problem) : 0}, opts.dtype(at::kFloat));
  if (B > 0 && H > 0) {
    const at::Tensor x_gates = mm_f32(o.x, o.w_ih.t());  // [N, G*H], biases in the kernel
    at::Tensor bias_x, bias_hn;
    if (b_ih) {
      // LSTM and RNN fold both biases into the input side; GRU keeps b_hn apart because it
      // sits inside r * (W_hn h + b_hn).
      const at::Tensor bi = b_ih->reshape({-1}).to(at::kFloat), bh = b_hh->reshape({-1}).to(at::kFloat);
      if (gru) {
        bias_x = at::cat({bi.narrow(0, 0, 2 * H) + bh.narrow(0, 0, 2 * H), bi.narrow(0, 2 * H, H)});
        bias_hn = bh.narrow(0, 2 * H, H).contiguous();
      } else {
        bias_x = (bi + bh).contiguous();
      }
    }
    at::Tensor scratch = new_scratch(rnn_layer_fwd_scratch_bytes(o.problem), input);
    check_cuda(rnn_layer_fwd(o.problem, x_gates.data_ptr<float>(),
                             bias_x.defined() ? bias_x.data_ptr<float>() : nullptr,
                             bias_hn.defined() ? bias_hn.data_ptr<float>() : nullptr,
                             strided(o.w_hh), strided(o.h0), lstm ? strided(o.c0) : Strided2{},
                             out.data_ptr(), h_n.data_ptr(), lstm ? c_n.data_ptr() : nullptr,
                             need_workspace ? workspace.data_ptr<float>() : nullptr,
                             scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "rnn_layer_fwd");
  }
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = H;
  return {out.reshape(out_shape), h_n, c_n, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
rnn_layer_bwd_cuda(const std::string& mode_name, const at::Tensor& input,
                   const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                   const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                   const std::optional<at::Tensor>& b_hh, bool reverse,
                   const at::Tensor& workspace, const std::optional<at::Tensor>& grad_output,
                   const std::optional<at::Tensor>& grad_hn,
                   const std::optional<at::Tensor>& grad_cn, c10::List<bool> needs_list,
                   const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(!w_hr, "seqkern cuda rnn_layer: LSTM projections (proj_size) are not supported");
  const LayerGradNeeds needs = layer_grad_needs(needs_list);
  const LayerOperands o =
      prepare_layer(mode_name, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse);
  const int64_t G = o.G, H = o.H, B = o.B, N = o.N;
  const bool lstm = o.cell == CellKind::kLSTM, gru = o.cell == CellKind::kGRU;
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == rnn_layer_workspace_numel(o.problem) &&
                  workspace.scalar_type() == at::kFloat && workspace.is_contiguous() &&
                  workspace.device() == input.device(),
              "rnn_layer_bwd: workspace does not come from rnn_layer_fwd with these arguments");
  check_layer_grads({B, H, H}, N, grad_output, grad_hn, grad_cn);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto f32 = input.options().dtype(at::kFloat);
  const auto state_grad = [&](const std::optional<at::Tensor>& g) {
    return g ? g->to(input.device(), at::kFloat).clone(at::MemoryFormat::Contiguous)
             : at::zeros({B, H}, f32);
  };
  at::Tensor d_h = state_grad(grad_hn);
  at::Tensor d_c = lstm ? state_grad(grad_cn) : at::empty({0}, f32);
  at::Tensor d_gx = new_output({N, G * H}, f32);
  at::Tensor d_gh = gru ? new_output({N, G * H}, f32) : d_gx;
  if (B > 0 && H > 0 && N > 0) {
    const at::Tensor grad_out =
        grad_output ? grad_output->to(input.device(), input.scalar_type()).contiguous()
                    : at::Tensor();
    at::Tensor scratch = new_scratch(rnn_layer_bwd_scratch_bytes(o.problem), input);
    check_cuda(rnn_layer_bwd(o.problem, strided(o.w_hh), workspace.data_ptr<float>(),
                             grad_out.defined() ? grad_out.data_ptr() : nullptr,
                             d_h.data_ptr<float>(), lstm ? d_c.data_ptr<float>() : nullptr,
                             d_gx.data_ptr<float>(), gru ? d_gh.data_ptr<float>() : nullptr,
                             scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "rnn_layer_bwd");
  }
  // dW_hh's right operand: the state entering each (step, row), from the workspace.
  const at::Tensor h_prev = workspace.narrow(0, saved_width(o.cell) * H * N, N * H).view({N, H});
  // Only the products asked for (needs); an unwanted gradient comes back as [0], each a
  // tensor of its own (op outputs may not alias).
  at::Tensor dx, dw_ih, dw_hh, db_ih, db_hh;
  // The bias gradients first, from the fp32 gate gradients (the bf16 path frees them next).
  if (b_ih && needs.b_ih) db_ih = d_gx.sum(0);
  // LSTM and RNN add b_hh where b_ih goes: the same gradient.
  if (b_ih && needs.b_hh) db_hh = (gru ? d_gh : d_gx).sum(0);
  if (input.scalar_type() == at::kBFloat16 && bf16_gemms_enabled()) {
    // The gate gradients (and h_prev) rounded to bf16, as torch's cuDNN bf16 layers keep
    // them, the products on tensor cores with fp32 accumulation and output. The fp32 gate
    // gradients ([N, G*H]: 52 MB for the fastrnns LSTM, twice that for GRU) are released
    // before the products' outputs are allocated, which may then take their memory.
    const at::Tensor g_x = d_gx.to(at::kBFloat16), g_h = gru ? d_gh.to(at::kBFloat16) : g_x;
    d_gx.reset();
    d_gh.reset();
    if (needs.input) dx = at::mm(g_x, o.w_ih, at::kFloat);
    if (needs.w_ih) dw_ih = at::mm(g_x.t(), o.x, at::kFloat);
    if (needs.w_hh) dw_hh = at::mm(g_h.t(), h_prev.to(at::kBFloat16), at::kFloat);
  } else {  // fp32 cuBLAS on fp32 copies
    if (needs.input) dx = at::mm(d_gx, o.w_ih.to(at::kFloat));
    if (needs.w_ih) dw_ih = at::mm(d_gx.t(), o.x.to(at::kFloat));
    if (needs.w_hh) dw_hh = at::mm(d_gh.t(), h_prev);
  }
  const at::ScalarType dt = input.scalar_type();
  const auto out = [&](bool want, const at::Tensor& t) {
    return want && t.defined() ? t.to(dt) : at::empty({0}, input.options());
  };
  return {needs.input ? dx.reshape(input.sizes()).to(dt) : at::empty({0}, input.options()),
          out(needs.h0, d_h), out(needs.c0 && lstm, d_c), out(needs.w_ih, dw_ih),
          out(needs.w_hh, dw_hh), out(needs.b_ih, db_ih), out(needs.b_hh, db_hh),
          at::empty({0}, input.options())};
}

}  // namespace
}  // namespace seqkern::cuda::rnn

TORCH_LIBRARY_IMPL(seqkern_C, CUDA, m) {
  using namespace seqkern::cuda::rnn;
  using seqkern::below_autograd;
  m.impl("rnn_cell_fwd", below_autograd<&rnn_cell_fwd_cuda>);
  m.impl("rnn_cell_gate_grads", below_autograd<&rnn_cell_gate_grads_cuda>);
  m.impl("rnn_layer_fwd", below_autograd<&rnn_layer_fwd_cuda>);
  m.impl("rnn_layer_bwd", below_autograd<&rnn_layer_bwd_cuda>);
}
