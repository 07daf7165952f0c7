// Whole-sequence recurrent layers on the CPU: seqkern_C::rnn_layer_fwd / rnn_layer_bwd.
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
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../rnn_args.h"
#include "buffer_cache.h"
#include "rnn_layer_plan.h"
#include "rnn_layer_team.h"
#include "matmul.h"
#include "rnn_kernels.h"
#include "round_bf16_kernel.h"

namespace seqkern::cpu {
namespace {

std::vector<Step> make_steps(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                             bool reverse) {
  std::vector<Step> steps;
  if (batch_sizes) {
    const at::Tensor sizes = batch_sizes->to(at::kLong).contiguous();
    const int64_t* s = sizes.data_ptr<int64_t>();
    int64_t offset = 0;
    for (int64_t t = 0; t < sizes.numel(); ++t) {
      steps.push_back({offset, s[t]});
      offset += s[t];
    }
  } else {
    const int64_t T = input.size(0), B = input.size(1);
    for (int64_t t = 0; t < T; ++t) steps.push_back({t * B, B});
  }
  if (reverse) std::reverse(steps.begin(), steps.end());
  return steps;
}

// float32 layers with fewer than 16 rows per thread split the hidden units instead
// (rnn_layer_team.h). Otherwise:
// Batch rows never interact in a recurrence, so the time loop runs once per block of rows,
// the blocks in parallel with no synchronisation between steps (a barrier per step, which
// a column split of each step needs, costs milliseconds whenever another process holds a
// core). Blocks are balanced by work: rows are sorted by length (packed sequences), so the
// split follows the cumulative count of live (step, row) pairs. With a spinning process on
// one of the two cores, B = 64 LSTM inference took 100-147 ms in four blocks claimed as the
// threads finish, 119-168 ms in two fixed ones (quiet: 57-62 ms either way). With fewer than
// four rows per thread one block takes all rows and each step's product and cell run in parallel:
// a block of one or two rows streams all of W_hh for almost no work (B=4, T=256, H=512
// LSTM inference: 18.9 ms in two blocks, 13.8-15.0 ms in one; oneDNN 18-20 ms).
std::vector<std::pair<int64_t, int64_t>> row_blocks(const std::vector<Step>& steps,
                                                    int64_t batch) {
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || batch < 4 * threads || at::in_parallel_region()) return {{0, batch}};
  // Two blocks a thread where each keeps at least kBlockRows rows, else one, claimed by the
  // threads as they finish (for_row_blocks): a thread that loses part of its core to another
  // process takes fewer blocks instead of holding the others up. A whole number of blocks a
  // thread, so that a quiet machine's threads finish together.
  constexpr int64_t kBlockRows = 16;
  const int64_t n_blocks = batch >= 2 * threads * kBlockRows ? 2 * threads : threads;
  std::vector<int64_t> work(batch, 0);  // live steps of each row
  for (const Step& s : steps)
    for (int64_t r = 0; r < s.rows; ++r) ++work[r];
  int64_t total = 0;
  for (int64_t w : work) total += w;
  std::vector<std::pair<int64_t, int64_t>> blocks;
  int64_t start = 0, done = 0;
  for (int64_t r = 0; r < batch; ++r) {
    done += work[r];
    const int64_t target = total * (int64_t(blocks.size()) + 1) / n_blocks;
    if ((done >= target && int64_t(blocks.size()) < n_blocks - 1) || r == batch - 1) {
      blocks.push_back({start, r + 1});
      start = r + 1;
    }
  }
  return blocks;
}

// Runs body(lo, hi) for each row block, in parallel when there are several: each thread
// claims the next unclaimed block until none is left.
template <typename Body>
void for_row_blocks(const std::vector<std::pair<int64_t, int64_t>>& blocks, const Body& body) {
  if (blocks.size() == 1) return body(blocks[0].first, blocks[0].second);
  // The body calls ATen ops: the workers take the caller's dispatch state (this op runs
  // below autograd) instead of their own.
  const at::ThreadLocalState caller_state;
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), int64_t(blocks.size()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (size_t b = next++; b < blocks.size(); b = next++) body(blocks[b].first, blocks[b].second);
  });
}

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

// The input projection runs chunk by chunk, a few steps ahead of the recurrence: one
// product over every row of the chunk's steps (both threads, large M), whose output is
// still in cache when the steps read it. One buffer for the whole sequence (T * B * G*H,
// 52 MB for the fastrnns LSTM) was written, faulted in page by page and read back from
// memory: it cost more than the recurrence itself.
constexpr int64_t kProjectionChunkBytes = int64_t(4) << 20;
// The backward's chunks are larger: each chunk's weight-gradient products read and write the
// whole dW accumulators (8 MB for the LSTM at H = 512) and transpose the gate gradients once,
// so fewer chunks cost less (4 -> 16 MB: backward 1-4% faster at B = 4 to 64, side by side),
// for about 30 MB more peak memory (the chunk's gate gradients, their transpose and the
// packed x and h_prev).
constexpr int64_t kBackwardChunkBytes = int64_t(16) << 20;

// Consecutive steps whose rows fill about chunk_bytes of gates (at least one step).
std::vector<StepChunk> step_chunks(const std::vector<Step>& steps, int64_t row_bytes,
                                   int64_t chunk_bytes) {
  std::vector<StepChunk> chunks;
  const int64_t budget = std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, row_bytes));
  for (size_t i = 0; i < steps.size();) {
    StepChunk c{i, i, steps[i].offset, 0};
    while (c.last < steps.size() && (c.last == i || c.rows + steps[c.last].rows <= budget)) {
      c.row0 = std::min(c.row0, steps[c.last].offset);  // reverse: offsets go down
      c.rows += steps[c.last].rows;
      ++c.last;
    }
    chunks.push_back(c);
    i = c.last;
  }
  return chunks;
}

// dw [G*H, K] (+)= dg_t [G*H, rows (+ 1)] @ rows [rows, K] on bf16 operands: dg_t from
// bf16_even_cols, rows bf16 (packed here, with the zero row dg_t's zero column meets).
void weight_grad_bf16(at::Tensor& dw, const at::Tensor& dg_t, const at::Tensor& rows,
                      bool accumulate) {
  const PackedRight packed = pack_rows_bf16(rows);
  tiled_matmul_raw(dw.size(0), dg_t.data_ptr<at::BFloat16>(), dg_t.stride(0), packed,
                   dw.data_ptr<float>(), dw.stride(0), accumulate);
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// The arguments both directions of the op start from: checked, in the compute dtype (x and
// the weights of bf16 products in bf16), the input flattened to [N, I].
struct LayerOperands {
  RnnMode mode;
  at::ScalarType dtype;
  int64_t H, P, G, N;  // hidden size, state size (P < H with a projection, else H)
  at::Tensor x, w_ih, w_hh, w_hr;  // w_hr undefined without a projection
};

LayerOperands prepare(const std::string& mode_name, const at::Tensor& input,
                      const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                      const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                      const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& w_hr, bool bf16_input = false) {
  const RnnMode mode = parse_rnn_mode(mode_name, "rnn_layer");
  const int64_t G = gate_count(mode);
  const LayerDims dims = check_layer_args(G, mode == RnnMode::kLSTM, input, batch_sizes, h0, c0,
                                          w_ih, w_hh, b_ih, b_hh, w_hr);
  const at::ScalarType dt = compute_dtype(input.scalar_type());
  // bf16_input: x and the weights stay bf16, the operands of bf16 products (pack_right_bf16
  // reads them as they are; an fp32 copy of each weight, rounded back to bf16 when packed, cost
  // about 0.4 ms a call).
  at::Tensor x = bf16_input ? input.reshape({-1, input.size(-1)}).contiguous()
                            : as_compute(input, dt).reshape({-1, input.size(-1)});
  const auto operand = [&](const at::Tensor& w) { return bf16_input ? w : as_compute(w, dt); };
  return {mode, dt, dims.H, dims.P, G, x.size(0), x, operand(w_ih), operand(w_hh),
          w_hr ? as_compute(*w_hr, dt) : at::Tensor()};
}

// Whether a layer's products take bf16 operands: bf16 input on a CPU with native bf16 products
// (AVX512-BF16), with fp32 accumulation, as torch's bf16 layers do. Not with a projection, nor
// with an odd I or H (the products pair consecutive k).
bool bf16_products_for(const at::Tensor& input, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& w_hr) {
  return input.scalar_type() == at::kBFloat16 && !w_hr && input.dim() > 0 &&
         input.size(-1) % 2 == 0 && w_hh.dim() == 2 && w_hh.size(1) % 2 == 0 &&
         bf16_products_available();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_fwd_cpu(
    const std::string& mode_name, const at::Tensor& input,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    bool need_workspace, const std::optional<at::Tensor>& w_hr) {
  // bf16 products: the input projection and the step products (x as given, the state rounded
  // to bf16 each step, the weights rounded once); the cell, its state c and the workspace stay
  // fp32.
  const bool bf16 = bf16_products_for(input, w_hh, w_hr);
  const LayerOperands ops =
      prepare(mode_name, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, bf16);
  const RnnMode mode = ops.mode;
  const at::ScalarType dt = ops.dtype;
  const int64_t H = ops.H, P = ops.P, G = ops.G, N = ops.N;
  const at::Tensor &x = ops.x, &wih = ops.w_ih, &whh = ops.w_hh;
  const bool proj = ops.w_hr.defined();
  // [P, G*H]: the step product's right operand
  const PackedRight whh_t = bf16 ? pack_right_bf16(whh.t()) : pack_right(whh.t());
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
  const PackedRight wih_t = bf16 ? pack_right_bf16(wih.t()) : pack_right(wih.t());  // [I, G*H]
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
  const std::vector<Step> steps = make_steps(input, batch_sizes, reverse);
  const auto blocks = row_blocks(steps, h.size(0));
  const std::vector<StepChunk> chunks =
      step_chunks(steps, G * H * int64_t(at::elementSize(dt)), kProjectionChunkBytes);
  int64_t chunk_rows = 0;
  for (const StepChunk& ch : chunks) chunk_rows = std::max(chunk_rows, ch.rows);
  at::Tensor x_gates = cached_empty({chunk_rows, G * H}, h.options());
  // Small batches: hidden units split over a team of threads (rnn_layer_team.h), the state in
  // two buffers, h and h_other, step i reading the one written by step i - 1.
  const bool team = use_team(dt == at::kFloat, proj, h.size(0), H);
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
  // bf16 products: the chain's dh_prev += dG W_hh each step, then dx = dG W_ih and the weight
  // gradients dW += dG^T [x | h_prev] take bf16 operands (dG, x, h_prev and the weights
  // rounded), fp32 accumulation; the pointwise gradients, dh, dc and the bias sums stay fp32.
  const bool bf16 = bf16_products_for(input, w_hh, w_hr);
  const LayerOperands ops =
      prepare(mode_name, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, bf16);
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
  const PackedRight whh_packed = bf16 ? pack_rows_bf16(whh) : pack_right(whh);
  // bf16: each step's gradients of h W_hh^T (+ b_hh) rounded, at their rows of the chunk: the
  // left operand of the step's chain product and, but for GRU, of dx = dG W_ih.
  at::Tensor dh_gates_bf16 =
      cached_empty({bf16 ? chunk_rows : 0, G * H}, opts.dtype(at::kBFloat16));
  // [G*H, I], by every chunk
  const PackedRight wih_packed = !needs.input ? PackedRight{}
                                 : bf16       ? pack_rows_bf16(wih)
                                              : pack_right(wih);
  const bool team = use_team(dt == at::kFloat, proj, dh.size(0), H);
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
      const at::Tensor dxg_t =
          needs.w_ih || (needs.w_hh && !gru) ? transposed(dxg_chunk) : at::Tensor();
      if (bf16) {  // dG^T rounded, a zero column where the chunk has an odd number of rows
        const at::Tensor dxg_t_bf16 = dxg_t.defined() ? bf16_even_cols(dxg_t) : at::Tensor();
        if (needs.w_ih)
          weight_grad_bf16(dw_ih, dxg_t_bf16, x.narrow(0, ch->row0, ch->rows), !first_chunk);
        if (needs.w_hh)
          weight_grad_bf16(dw_hh, gru ? bf16_even_cols(transposed(dhg_chunk)) : dxg_t_bf16,
                           h_prev.narrow(0, ch->row0, ch->rows).to(at::kBFloat16),
                           !first_chunk);
      } else {
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
  m.impl("rnn_layer_fwd", &seqkern::cpu::rnn_layer_fwd_cpu);
  m.impl("rnn_layer_bwd", &seqkern::cpu::rnn_layer_bwd_cpu);
}
