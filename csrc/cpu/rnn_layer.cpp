// Whole-sequence recurrent layers on the CPU: seqkern_C::rnn_layer_fwd (rnn_layer_bwd in
// rnn_layer_bwd.cpp).
//
// One layer, one direction, over a whole (optionally packed) sequence, with the loop over
// time in C++: the input projection of every step is one matrix product before the loop;
// each step is one small product h W_hh^T followed by the fused pointwise cell
// (rnn_pointwise_impl.h). The backward runs the chain step by step (pointwise gradient, then
// dh_prev = dgates W_hh) and leaves the weight gradients and dx to three large products
// after the loop.
//
// Steps and rows: step s (in processing order) covers rows [0, n_s) of the batch at row
// offset off_s of the flattened input [N, I]; for a padded input n_s = B, off_s = t * B.
// For a packed input n_s = batch_sizes[t]; the state h [B, H] starts as h0 in every row, a
// step updates only its live rows, so rows that end early keep their final state and, in
// the reverse direction, rows that start late start from h0.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "../below_autograd.h"
#include "buffer_cache.h"
#include "matmul.h"
#include "rnn_kernels.h"
#include "rnn_layer_operands.h"
#include "rnn_layer_plan.h"
#include "rnn_layer_team.h"
#include "threads.h"

namespace seqkern::cpu {
namespace {

// The input projection runs chunk by chunk, a few steps ahead of the recurrence: one
// product over every row of the chunk's steps (both threads, large M), whose output is
// still in cache when the steps read it. One buffer for the whole sequence (T * B * G*H,
// 52 MB for the fastrnns LSTM) was written, faulted in page by page and read back from
// memory: it cost more than the recurrence itself.
constexpr int64_t kProjectionChunkBytes = int64_t(4) << 20;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_fwd_cpu(
    const std::string& mode_name, const at::Tensor& input,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    bool need_workspace, const std::optional<at::Tensor>& w_hr) {
  // ops.bf16: the input projection and the step products on bf16 operands (x as given, the
  // state rounded to bf16 each step, the weights rounded once); the cell, its state c and the
  // workspace stay fp32.
  const LayerOperands ops =
      prepare(mode_name, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
              /*weights_as_given=*/true);
  const bool bf16 = ops.bf16;
  const RnnMode mode = ops.mode;
  const at::ScalarType dt = ops.dtype;
  const int64_t H = ops.H, P = ops.P, G = ops.G, N = ops.N;
  const at::Tensor &x = ops.x, &wih = ops.w_ih, &whh = ops.w_hh;
  const bool proj = ops.w_hr.defined();
  // The smallest calls on this thread alone (threads.h): no team, one row block, the products
  // and the cell inline.
  const OneThread one_thread(input.scalar_type() == at::kFloat && !proj &&
                             forward_on_one_thread(N, G * H, x.size(1), P));
  const std::vector<Step> steps = make_steps(input, batch_sizes, reverse);
  const std::vector<StepChunk> chunks =
      step_chunks(steps, G * H * int64_t(at::elementSize(dt)), kProjectionChunkBytes);
  // fp32 and bf16 products take a weight as given where it meets few rows
  // (rnn_layer_plan.cpp), otherwise packed (fp64: never kept).
  const auto right_operand = [&](const at::Tensor& w, bool as_given) {
    if (as_given && keeps_weight(w, bf16)) return keep_weight(w, bf16);
    return bf16 ? pack_right_bf16(w.t()) : pack_right(as_compute(w, dt).t());
  };
  // [P, G*H]: the step product's right operand
  const PackedRight whh_t = right_operand(whh, w_hh_in_place(steps.size(), h0.size(0), bf16));
  // [H, P]: h = h_full W_hr^T after the cell (LSTM proj_size)
  const PackedRight whr_t = proj ? pack_right(ops.w_hr.t()) : PackedRight{};
  // LSTM and RNN add both biases with the input projection; GRU keeps b_hh with h W_hh^T
  // because b_hn sits inside r * (W_hn h + b_hn).
  std::optional<at::Tensor> bias_x, bias_h;
  if (b_ih) {
    bias_x = as_compute(*b_ih, dt);
    if (mode == RnnMode::kGRU) bias_h = as_compute(*b_hh, dt);
    else bias_x = *bias_x + as_compute(*b_hh, dt);
  }
  // [I, G*H]: used once a chunk
  const PackedRight wih_t = right_operand(wih, w_ih_in_place(chunks.size(), N, bf16));
  // bf16: x is the projection's left operand as given (prepare), and the state, rounded, the
  // step product's, in two buffers (the team's step i reads the one step i - 1 wrote).
  at::Tensor h = h0.to(dt).clone(at::MemoryFormat::Contiguous);
  at::Tensor c = mode == RnnMode::kLSTM ? c0->to(dt).clone(at::MemoryFormat::Contiguous)
                                        : at::empty({0}, h.options());
  const Workspace ws = workspace_layout(mode, N, H, P);
  // Inference needs none of it: no workspace, no copies into it.
  // Saved for the backward and freed after it: the next call reuses its pages.
  at::Tensor workspace = cached_empty({need_workspace ? ws.numel() : 0}, h.options());
  // Already mapped (see the backward). bf16 products: the output is the state rounded to bf16
  // for the next step's product, copied as it is (an fp32 output converted after the loop
  // cost 1.5 ms of a 32 ms B64 LSTM inference).
  at::Tensor out = cached_empty({N, P}, bf16 ? h.options().dtype(at::kBFloat16) : h.options());
  at::Tensor h_gates = at::empty({h.size(0), G * H}, h.options());
  // The cell's output before the projection, per batch row (inference; training writes it
  // into the workspace, where the backward finds it).
  at::Tensor h_full_scratch = at::empty({proj && !need_workspace ? h.size(0) : 0, H},
                                        h.options());
  const auto blocks = row_blocks(steps, h.size(0));
  int64_t chunk_rows = 0;
  for (const StepChunk& ch : chunks) chunk_rows = std::max(chunk_rows, ch.rows);
  at::Tensor x_gates = cached_empty({chunk_rows, G * H}, h.options());
  // Small batches: hidden units split over a team of threads (rnn_layer_team.h), the state in
  // two buffers, h and h_other, step i reading the one written by step i - 1.
  const bool team = use_team(dt == at::kFloat, proj, h.size(0), H);
  log_layer_path({false, team, bf16, wih_t.as_given(), whh_t.as_given(),
                  team ? 1 : int64_t(blocks.size())});
  at::Tensor h_other = team ? h.clone() : at::Tensor();
  at::Tensor h_bf16[2];
  if (bf16) {
    h_bf16[0] = h.to(at::kBFloat16);
    h_bf16[1] = team ? h_bf16[0].clone() : h_bf16[0];
  }
  TeamForward team_args{};  // float32 only; its chunk is set per chunk
  if (team) {
    team_args = {mode, H, &steps, {}, x_gates.data_ptr<float>(),
                 bias_x ? bias_x->data_ptr<float>() : nullptr,
                 bias_h ? bias_h->data_ptr<float>() : nullptr, &whh_t,
                 {h.data_ptr<float>(), h_other.data_ptr<float>()},
                 ws.lstm ? c.data_ptr<float>() : nullptr, h_gates.data_ptr<float>(),
                 need_workspace ? workspace.data_ptr<float>() : nullptr, ws,
                 bf16 ? nullptr : out.data_ptr<float>(),
                 {bf16 ? h_bf16[0].data_ptr<at::BFloat16>() : nullptr,
                  bf16 ? h_bf16[1].data_ptr<at::BFloat16>() : nullptr},
                 bf16 ? out.data_ptr<at::BFloat16>() : nullptr};
  }

  AT_DISPATCH_FLOATING_TYPES(dt, "rnn_layer_fwd", [&] {
    scalar_t* base = workspace.data_ptr<scalar_t>();
    scalar_t* h_ptr = h.data_ptr<scalar_t>();
    scalar_t* c_ptr = ws.lstm ? c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* x_bias = bias_x ? bias_x->data_ptr<scalar_t>() : nullptr;
    const size_t state_bytes = P * sizeof(scalar_t), cell_bytes = H * sizeof(scalar_t);
    for (const StepChunk& ch : chunks) {
      at::Tensor xg_chunk = x_gates.narrow(0, 0, ch.rows);
      if (bf16) {
        tiled_matmul_raw(ch.rows, x.data_ptr<at::BFloat16>() + ch.row0 * x.size(1),
                         x.size(1), wih_t, xg_chunk.data_ptr<float>(), G * H, false);
      } else {
        tiled_matmul_into(xg_chunk, x.narrow(0, ch.row0, ch.rows), wih_t, false);
      }
      if (team) {
        TeamForward args = team_args;
        args.chunk = ch;
        team_forward_chunk(args);
        continue;
      }
      for_row_blocks(blocks, [&](int64_t lo, int64_t hi_block) {
        for (size_t i = ch.first; i < ch.last; ++i) {
          const Step& s = steps[i];
          const int64_t hi = std::min(hi_block, s.rows), n = hi - lo;
          if (n <= 0) continue;
          const int64_t row = s.offset + lo;  // first row of this block in the flat input
          scalar_t* hg = h_gates.data_ptr<scalar_t>() + lo * G * H;
          scalar_t* h_rows = h_ptr + lo * P;
          scalar_t* c_rows = ws.lstm ? c_ptr + lo * H : nullptr;
          if (need_workspace) {
            std::memcpy(ws.h_prev(base) + row * P, h_rows, n * state_bytes);
            if (ws.lstm) std::memcpy(ws.c_prev(base) + row * H, c_rows, n * cell_bytes);
          }
          if (bias_h) {
            for (int64_t r = 0; r < n; ++r)
              std::memcpy(hg + r * G * H, bias_h->data_ptr<scalar_t>(), G * H * sizeof(scalar_t));
          }
          if (bf16) {  // float32 compute only (bf16 input): hg is float
            tiled_matmul_raw(n, h_bf16[0].data_ptr<at::BFloat16>() + lo * P, P, whh_t,
                             reinterpret_cast<float*>(hg), G * H, bias_h.has_value(),
                             /*backwards=*/i % 2 == 1);
          } else {
            step_product<scalar_t>(i, n, h_rows, P, whh_t, hg, G * H, bias_h.has_value());
          }
          // With a projection the cell writes h_full [n, H] (the LSTM cell reads no h_prev).
          scalar_t* cell_out = !proj ? h_rows
                               : need_workspace ? ws.h_full(base) + row * H
                                                : h_full_scratch.data_ptr<scalar_t>() + lo * H;
          run_rnn_step_fwd<scalar_t>(mode, n, H,
                             xg_chunk.data_ptr<scalar_t>() + (row - ch.row0) * G * H, x_bias, hg,
                             cell_out, cell_out, c_rows,
                             need_workspace ? ws.saved(base) + row * ws.saved_width : nullptr);
          if (proj) step_product<scalar_t>(i, n, cell_out, H, whr_t, h_rows, P, false);
          if (ws.lstm && need_workspace)
            std::memcpy(ws.c_new(base) + row * H, c_rows, n * cell_bytes);
          if (bf16) {  // the next step's left operand (no projection here: P == H), and out
            at::BFloat16* h_next = h_bf16[0].data_ptr<at::BFloat16>() + lo * P;
            round_units_bf16(h_rows, h_next, P, n, 0, P);
            std::memcpy(out.data_ptr<at::BFloat16>() + row * P, h_next,
                        n * P * sizeof(at::BFloat16));
          } else {
            std::memcpy(out.data_ptr<scalar_t>() + row * P, h_rows, n * state_bytes);
          }
        }
      });
    }
  });
  if (team) {
    // Each row's final state is in the buffer its last live step wrote: h_other after an
    // even-numbered step (packed rows end at different steps).
    std::vector<int64_t> last(h.size(0), -1);
    for (size_t i = 0; i < steps.size(); ++i)
      for (int64_t r = 0; r < steps[i].rows; ++r) last[r] = int64_t(i);
    for (int64_t r = 0; r < h.size(0); ++r)
      if (last[r] >= 0 && last[r] % 2 == 0) h[r].copy_(h_other[r]);
  }
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = P;
  return {out.reshape(out_shape).to(input.scalar_type()), h.to(input.scalar_type()),
          c.to(input.scalar_type()), workspace};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_FRAGMENT(seqkern_C, m) {
  // For the tests: the paths this thread's layer calls ran (rnn_layer_plan.h, LayerPath).
  m.def("rnn_layer_cpu_paths() -> str[]", &seqkern::cpu::take_layer_paths);
}

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  using namespace seqkern::cpu;
  using seqkern::below_autograd;
  m.impl("rnn_layer_fwd", below_autograd<&rnn_layer_fwd_cpu>);
}
