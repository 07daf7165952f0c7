// The backward of the CPU recurrent layer (rnn_layer.cpp): seqkern_C::rnn_layer_bwd. The chain
// runs step by step (the pointwise gradient, then dh_prev = dG W_hh), in chunks of steps, and
// after each chunk dx and the weight gradients are large products over its rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../below_autograd.h"
#include "../rnn_args.h"
#include "buffer_cache.h"
#include "matmul.h"
#include "rnn_kernels.h"
#include "rnn_layer_operands.h"
#include "rnn_layer_plan.h"
#include "rnn_layer_team.h"
#include "round_bf16_kernel.h"

namespace seqkern::cpu {
namespace {

// The backward's chunks are larger: each chunk's weight-gradient products read and write the
// whole dW accumulators (8 MB for the LSTM at H = 512) and transpose the gate gradients once,
// so fewer chunks cost less (4 -> 16 MB: backward 1-4% faster at B = 4 to 64, side by side),
// for about 30 MB more peak memory (the chunk's gate gradients, their transpose and the
// packed x and h_prev).
constexpr int64_t kBackwardChunkBytes = int64_t(16) << 20;

// dh [n, P] += dg [n, whh.K] W_hh on bf16 operands (whh from pack_rows_bf16): dg rounded into
// dg_bf16 first. The chain's step product with bf16 products, which compute in float32 only.
template <typename T>
void chain_product_bf16(size_t i, int64_t n, const T* dg, at::BFloat16* dg_bf16,
                        const PackedRight& whh, T* dh, int64_t P) {
  if constexpr (std::is_same_v<T, float>) {
    run_round_rows_bf16(dg, n, whh.K, whh.K, dg_bf16, whh.K);
    tiled_matmul_raw(n, dg_bf16, whh.K, whh, dh, P, /*accumulate=*/true,
                     /*backwards=*/i % 2 == 1);
  } else {
    TORCH_CHECK(false, "rnn_layer_bwd: bf16 products compute in float32");
  }
}

// dw [G*H, K] (+)= dg_t [G*H, rows (+ 1)] @ rows [rows, K] on bf16 operands: dg_t from
// transposed_bf16, rows bf16 (packed here, with the zero row dg_t's zero column meets).
void weight_grad_bf16(at::Tensor& dw, const at::Tensor& dg_t, const at::Tensor& rows,
                      bool accumulate) {
  const PackedRight packed = pack_rows_bf16(rows);
  tiled_matmul_raw(dw.size(0), dg_t.data_ptr<at::BFloat16>(), dg_t.stride(0), packed,
                   dw.data_ptr<float>(), dw.stride(0), accumulate);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
rnn_layer_bwd_cpu(const std::string& mode_name, const at::Tensor& input,
                  const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                  const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                  const std::optional<at::Tensor>& b_hh, bool reverse,
                  const at::Tensor& workspace, const std::optional<at::Tensor>& grad_output,
                  const std::optional<at::Tensor>& grad_hn,
                  const std::optional<at::Tensor>& grad_cn, c10::List<bool> needs_list,
                  const std::optional<at::Tensor>& w_hr) {
  const LayerGradNeeds needs = layer_grad_needs(needs_list);
  // ops.bf16: the chain's dh_prev += dG W_hh each step, then dx = dG W_ih and the weight
  // gradients dW += dG^T [x | h_prev] on bf16 operands (dG, x, h_prev and the weights
  // rounded), fp32 accumulation; the pointwise gradients, dh, dc and the bias sums stay fp32.
  const LayerOperands ops =
      prepare(mode_name, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const bool bf16 = ops.bf16;
  const RnnMode mode = ops.mode;
  const at::ScalarType dt = ops.dtype;
  const int64_t H = ops.H, P = ops.P, G = ops.G, N = ops.N;
  const at::Tensor &x = ops.x, &wih = ops.w_ih, &whh = ops.w_hh;
  const bool proj = ops.w_hr.defined();
  check_layer_grads({h0.size(0), H, P}, N, grad_output, grad_hn, grad_cn);
  const Workspace ws = workspace_layout(mode, N, H, P);
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == ws.numel() &&
                  workspace.scalar_type() == dt && workspace.is_contiguous(),
              "rnn_layer_bwd: workspace does not come from rnn_layer_fwd with these arguments");
  const auto opts = x.options().dtype(dt);
  at::Tensor dh = grad_hn ? grad_hn->to(dt).clone(at::MemoryFormat::Contiguous)
                          : at::zeros({h0.size(0), P}, opts);
  at::Tensor dc = mode == RnnMode::kLSTM
                      ? (grad_cn ? grad_cn->to(dt).clone(at::MemoryFormat::Contiguous)
                                 : at::zeros({h0.size(0), H}, opts))
                      : at::empty({0}, opts);
  // Read through its strides: the gradient of out.sum() is one value expanded over [T, B, P],
  // which .contiguous() would write out in full (13 MB for the fastrnns LSTM).
  const at::Tensor d_out = grad_output ? grad_output->to(dt).reshape({-1, P}) : at::Tensor();
  const at::Tensor h_prev = workspace.narrow(0, ws.saved_width * N, N * P).view({N, P});
  const bool gru = mode == RnnMode::kGRU;
  // The gate gradients of a chunk of steps (kBackwardChunkBytes): the products that take them
  // (dx, dW_ih, dW_hh, db) run once per chunk, over all of its rows; nothing the size of the
  // whole sequence is written.
  const std::vector<Step> steps = make_steps(input, batch_sizes, reverse);
  const auto blocks = row_blocks(steps, dh.size(0));
  const std::vector<StepChunk> chunks =
      step_chunks(steps, G * H * int64_t(at::elementSize(dt)) * (gru ? 2 : 1),
                  kBackwardChunkBytes);
  int64_t chunk_rows = 0;
  for (const StepChunk& ch : chunks) chunk_rows = std::max(chunk_rows, ch.rows);
  at::Tensor dx_gates = cached_empty({chunk_rows, G * H}, opts);
  at::Tensor dh_gates = gru ? cached_empty({chunk_rows, G * H}, opts) : dx_gates;
  // Outputs and accumulators in cached, already mapped memory (buffer_cache.h): fresh 4 MB
  // buffers are faulted in page by page (about 1 ms each here), and a training step makes
  // several. An output's block returns to the cache when autograd or the user frees it.
  at::Tensor dx = cached_empty({needs.input ? N : 0, x.size(1)}, opts);
  // The weight gradients accumulate in their own layout, dW += dG^T [x | h_prev], chunk by
  // chunk: dG transposed once a chunk (shared by both products unless GRU), x and h_prev
  // packed into panels as the right operands. (Accumulating dW^T instead, with x and h_prev
  // transposed and dG packed, moved the same bytes per chunk and then transposed both
  // gradients back at the end: 0.65 ms of a 32 ms B4 LSTM training step.) The first chunk
  // overwrites them (no zero fill).
  at::Tensor dw_ih = cached_empty({G * H, needs.w_ih ? x.size(1) : 0}, opts);
  at::Tensor dw_hh = cached_empty({G * H, needs.w_hh ? P : 0}, opts);
  if (chunks.empty()) dw_ih.zero_(), dw_hh.zero_();
  // Projection: the gradient reaching h_full (per batch row) and the state gradients of the
  // chunk's rows, the left operand of dW_hr = sum dh^T h_full.
  const bool want_dw_hr = proj && needs.w_hr;
  at::Tensor dw_hr = at::zeros({want_dw_hr ? P : 0, want_dw_hr ? H : 0}, opts);
  at::Tensor dh_full = at::empty({proj ? h0.size(0) : 0, H}, opts);
  at::Tensor dh_chunk = at::empty({want_dw_hr ? chunk_rows : 0, P}, opts);
  const PackedRight whr_packed = proj ? pack_right(ops.w_hr) : PackedRight{};  // [P, H]
  const bool want_db = b_ih && (needs.b_ih || needs.b_hh);
  at::Tensor db_ih = at::zeros({want_db ? G * H : 0}, opts);
  at::Tensor db_hh = at::zeros({want_db ? G * H : 0}, opts);

  // [G*H, P], reused by every step
  const bool fp32 = dt == at::kFloat && !bf16;
  const bool whh_as_given = fp32 && w_hh_in_place_backward(steps.size(), dh.size(0));
  const PackedRight whh_packed = bf16           ? pack_rows_bf16(whh)
                                 : whh_as_given ? keep_rows(whh)
                                                : pack_right(whh);
  // bf16: each step's gradients of h W_hh^T (+ b_hh) rounded, at their rows of the chunk: the
  // left operand of the step's chain product and, but for GRU, of dx = dG W_ih.
  at::Tensor dh_gates_bf16 =
      cached_empty({bf16 ? chunk_rows : 0, G * H}, opts.dtype(at::kBFloat16));
  // [G*H, I], by every chunk
  const bool wih_as_given = fp32 && w_ih_in_place(chunks.size(), N, false);
  const PackedRight wih_packed = !needs.input ? PackedRight{}
                                 : bf16         ? pack_rows_bf16(wih)
                                 : wih_as_given ? keep_rows(wih)
                                                : pack_right(wih);
  const bool team = use_team(dt == at::kFloat, proj, dh.size(0), H);
  log_layer_path({true, team, bf16, wih_packed.as_given(), whh_packed.as_given(),
                  team ? 1 : int64_t(blocks.size())});
  TeamBackward team_args{};  // float32 only; its chunk is set per chunk
  if (team) {
    team_args = {mode, H, &steps, {}, workspace.data_ptr<float>(), ws,
                 d_out.defined() ? d_out.data_ptr<float>() : nullptr,
                 d_out.defined() ? d_out.stride(0) : 0, d_out.defined() ? d_out.stride(1) : 0,
                 dh.data_ptr<float>(), ws.lstm ? dc.data_ptr<float>() : nullptr,
                 dx_gates.data_ptr<float>(), dh_gates.data_ptr<float>(), &whh_packed,
                 bf16 ? dh_gates_bf16.data_ptr<at::BFloat16>() : nullptr};
  }
  AT_DISPATCH_FLOATING_TYPES(dt, "rnn_layer_bwd", [&] {
    const scalar_t* base = workspace.data_ptr<scalar_t>();
    for (auto ch = chunks.rbegin(); ch != chunks.rend(); ++ch) {
      const bool first_chunk = ch == chunks.rbegin();
      if (team) {
        TeamBackward args = team_args;
        args.chunk = *ch;
        team_backward_chunk(args);
      } else for_row_blocks(blocks, [&](int64_t lo, int64_t hi_block) {
        for (size_t i = ch->last; i-- > ch->first;) {
          const Step& s = steps[i];
          const int64_t hi = std::min(hi_block, s.rows), n = hi - lo;
          if (n <= 0) continue;
          const int64_t row = s.offset + lo;  // first row of this block in the flat input
          const int64_t chunk_row = row - ch->row0;
          scalar_t* dh_rows = dh.data_ptr<scalar_t>() + lo * P;
          if (d_out.defined())
            add_strided_rows(dh_rows, P, d_out.data_ptr<scalar_t>() + row * d_out.stride(0),
                             d_out.stride(0), d_out.stride(1), n, 0, P);
          // The cell's output gradient: dh itself, or through the projection dh W_hr.
          scalar_t* d_cell_out = dh_rows;
          if (proj) {
            if (want_dw_hr)
              std::memcpy(dh_chunk.data_ptr<scalar_t>() + chunk_row * P, dh_rows,
                          n * P * sizeof(scalar_t));
            d_cell_out = dh_full.data_ptr<scalar_t>() + lo * H;
            step_product<scalar_t>(i, n, dh_rows, P, whr_packed, d_cell_out, H, false);
          }
          run_rnn_step_bwd<scalar_t>(
              mode, n, H, ws.saved(base) + row * ws.saved_width,
              ws.lstm ? ws.c_new(base) + row * H : nullptr,
              ws.lstm ? ws.c_prev(base) + row * H : nullptr, ws.h_prev(base) + row * P,
              d_cell_out, ws.lstm ? dc.data_ptr<scalar_t>() + lo * H : nullptr,
              dx_gates.data_ptr<scalar_t>() + chunk_row * G * H,
              gru ? dh_gates.data_ptr<scalar_t>() + chunk_row * G * H : nullptr);
          // dh_prev = (the part around W_hh, left in dh by the step: 0 for LSTM, which is
          // the only mode with a projection) + dG W_hh.
          scalar_t* dg = dh_gates.data_ptr<scalar_t>() + chunk_row * G * H;
          if (bf16) {  // no projection here
            chain_product_bf16(i, n, dg,
                               dh_gates_bf16.data_ptr<at::BFloat16>() + chunk_row * G * H,
                               whh_packed, dh_rows, P);
          } else {
            step_product<scalar_t>(i, n, dg, G * H, whh_packed, dh_rows, P, !proj);
          }
        }
      });
      const at::Tensor dxg_chunk = dx_gates.narrow(0, 0, ch->rows);
      const at::Tensor dhg_chunk = dh_gates.narrow(0, 0, ch->rows);
      if (needs.input) {
        at::Tensor dx_rows = dx.narrow(0, ch->row0, ch->rows);
        if (bf16) {  // the chain's rounded dG, but for GRU (whose dx takes dx_gates)
          const at::Tensor dxg_bf16 =
              gru ? dxg_chunk.to(at::kBFloat16) : dh_gates_bf16.narrow(0, 0, ch->rows);
          tiled_matmul_raw(ch->rows, dxg_bf16.data_ptr<at::BFloat16>(), G * H, wih_packed,
                           dx_rows.data_ptr<float>(), dx_rows.stride(0), false);
        } else {
          tiled_matmul_into(dx_rows, dxg_chunk, wih_packed, false);
        }
      }
      // dG^T, the left operand of both weight gradients (GRU's dW_hh has its own).
      const bool dxg_t_used = needs.w_ih || (needs.w_hh && !gru);
      if (bf16) {  // dG^T rounded, a zero column where the chunk has an odd number of rows
        const at::Tensor dxg_t = dxg_t_used ? transposed_bf16(dxg_chunk) : at::Tensor();
        if (needs.w_ih)
          weight_grad_bf16(dw_ih, dxg_t, x.narrow(0, ch->row0, ch->rows), !first_chunk);
        if (needs.w_hh)
          weight_grad_bf16(dw_hh, gru ? transposed_bf16(dhg_chunk) : dxg_t,
                           h_prev.narrow(0, ch->row0, ch->rows).to(at::kBFloat16),
                           !first_chunk);
      } else {
        const at::Tensor dxg_t = dxg_t_used ? transposed(dxg_chunk) : at::Tensor();
        if (needs.w_ih)
          tiled_matmul_into(dw_ih, dxg_t, pack_right(x.narrow(0, ch->row0, ch->rows)),
                            !first_chunk);
        if (needs.w_hh)
          tiled_matmul_into(dw_hh, gru ? transposed(dhg_chunk) : dxg_t,
                            pack_right(h_prev.narrow(0, ch->row0, ch->rows)), !first_chunk);
      }
      if (want_dw_hr) {
        const at::Tensor h_full = workspace.narrow(0, ws.h_full_offset(), N * H).view({N, H});
        matmul_once_into(dw_hr, transposed(dh_chunk.narrow(0, 0, ch->rows)),
                         h_full.narrow(0, ch->row0, ch->rows), true);
      }
      if (want_db) {
        db_ih.add_(dxg_chunk.sum(0));
        if (gru) db_hh.add_(dhg_chunk.sum(0));
      }
    }
  });
  // LSTM and RNN add b_hh where b_ih goes: the same gradient, in its own tensor (op outputs
  // may not alias).
  if (want_db && !gru) db_hh.copy_(db_ih);
  const at::ScalarType out_t = input.scalar_type();
  // What was not asked for goes back as [0] (its product was skipped above).
  const auto wanted = [&](bool want, const at::Tensor& t) {
    return want ? t.to(out_t) : at::empty({0}, input.options());
  };
  return {needs.input ? dx.reshape(input.sizes()).to(out_t) : at::empty({0}, input.options()),
          wanted(needs.h0, dh), wanted(needs.c0, dc),
          wanted(needs.w_ih, dw_ih), wanted(needs.w_hh, dw_hh),
          wanted(needs.b_ih, db_ih), wanted(needs.b_hh, db_hh), wanted(want_dw_hr, dw_hr)};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  using namespace seqkern::cpu;
  using seqkern::below_autograd;
  m.impl("rnn_layer_bwd", below_autograd<&rnn_layer_bwd_cpu>);
}
