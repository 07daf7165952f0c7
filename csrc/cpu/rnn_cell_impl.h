// CPU recurrent-cell step: one fused pass per tile of hidden units.
//
// The gate products run transposed, gates^T [G*H, B] = W [G*H, K] . [x | h]^T [K, B]: the
// weights then feed brgemm exactly as torch stores them (row-major [G*H, K], no packing,
// no copy for fp32), and only the small [B, I + H] operand is transposed, once per call.
// A task owns a tile of hidden units and computes all G gates of it, so the pointwise
// epilogue (activations, new state, saved gates) runs on a tile that is still in L1/L2.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "attention_common.h"
#include "rnn_cell_kernels.h"
#include "rnn_pointwise_impl.h"
#include "rows_dot_impl.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kCellTileH = 32;  // hidden units per task (each with all its gates)

// dst[r * B + b] = src[b, r] for r < cols: the [B, cols] slice as [cols, B] in acc_t.
template <typename scalar_t, typename acc_t>
void load_transposed(View2<scalar_t> src, int64_t B, int64_t cols, acc_t* dst) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* s = src.row(b);
    for (int64_t c = 0; c < cols; ++c) dst[c * B + b] = static_cast<acc_t>(s[c * src.s1]);
  }
}

// Batches of up to this many rows take rows_dot's dot products (the operand's rows against
// W's rows) instead of brgemm, whose kernel vectorises over the batch (N = B): a B = 1 GRU
// step at H = 512 took 132 us there, 40 with the dot products (about the time to read the
// weights once). Measured (bench/RESULTS.md, "decoding steps"; LSTM, GRU, RNN cells at
// H = 256 to 1024): 2.0-3.8x at B = 1, 1.29-2.94x at B = 4, 0.97-1.72x at B = 8, 0.69-1.01x
// at B = 16.
constexpr int64_t kDotMaxBatch = 8;

// Whether a cell of B rows multiplies by rows_dot (fp32 accumulation only; kDotMaxBatch).
template <typename acc_t>
constexpr bool dots_for(int64_t B) {
  return std::is_same_v<acc_t, float> && B <= kDotMaxBatch;
}

// out[rows, B] += w[r0 : r0 + rows, :K] . operand[K, B]: operand_t [K, B] for brgemm, or with
// dots_for(B) operand_rows [B, K] for rows_dot (out[r, b] at out + r * B + b). Weights with
// unit column stride are read in place (rows_dot: in any dtype, converted as loaded; brgemm:
// fp32 / fp64); others are converted into w_scratch first.
template <typename scalar_t, typename acc_t>
void accumulate_gate_rows(View2<scalar_t> w, int64_t r0, int64_t rows, int64_t K,
                          const acc_t* operand_t, const acc_t* operand_rows, int64_t B,
                          acc_t* out, acc_t* w_scratch) {
  if (K == 0) return;
  const bool in_place = w.s1 == 1 && w.s0 >= K;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (dots_for<acc_t>(B) && in_place)
      return rows_dot(B, K, operand_rows, K, w.row(r0), w.s0, 0, rows, out, 1,
                      /*accumulate=*/true, B);
  }
  const acc_t* a = w_scratch;
  int64_t lda = K;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (in_place) a = w.row(r0), lda = w.s0;
  }
  if (a == w_scratch) load_tile(w.row(r0), w.s0, w.s1, rows, K, w_scratch, K, false);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (dots_for<acc_t>(B))
      return rows_dot(B, K, operand_rows, K, a, lda, 0, rows, out, 1, /*accumulate=*/true, B);
  }
  tile_gemm(rows, B, K, a, lda, operand_t, B, out, B, /*accumulate=*/true);
}

template <typename scalar_t>
void rnn_cell_fwd_kernel(const CellProblem<scalar_t>& p, scalar_t* h_out, scalar_t* c_out,
                         cell_acc_t<scalar_t>* saved) {
  using acc_t = cell_acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t B = p.B, H = p.H, G = gate_count(p.mode);
  const bool lstm = p.mode == RnnMode::kLSTM, gru = p.mode == RnnMode::kGRU;
  // The operands [B, I] and [B, H] in acc_t: transposed for brgemm, as rows for rows_dot
  // (h_t also feeds GRU's pointwise step either way).
  const bool dots = dots_for<acc_t>(B);
  std::vector<acc_t> x_t(dots ? 0 : p.I * B), h_t(H * B), c_t(lstm ? H * B : 0);
  std::vector<acc_t> x_rows(dots ? p.I * B : 0), h_rows(dots ? H * B : 0);
  load_transposed(p.hx, B, H, h_t.data());
  if (dots) {
    load_tile(p.x.data, p.x.s0, p.x.s1, B, p.I, x_rows.data(), p.I, false);
    load_tile(p.hx.data, p.hx.s0, p.hx.s1, B, H, h_rows.data(), H, false);
  } else {
    load_transposed(p.x, B, p.I, x_t.data());
  }
  if (lstm) load_transposed(p.cx, B, H, c_t.data());

  const int64_t tiles = (H + kCellTileH - 1) / kCellTileH;
  // Slots of [kCellTileH, B] pre-activations: one per gate and GRU's W_hn h + b_hn apart;
  // the activations replace them in place (the saved gates).
  const int64_t slots = G + (gru ? 1 : 0), saved_gates = lstm || gru ? 4 : 0;
  const int64_t slot = kCellTileH * B;
  run_tasks(tiles, [&](const auto& next_task) {
    std::vector<acc_t> pre(slots * slot), h_new(slot), c_new(lstm ? slot : 0);
    std::vector<acc_t> w_scratch(kCellTileH * std::max(p.I, H));
    for (int64_t t = next_task(); t < tiles; t = next_task()) {
      const int64_t h0 = t * kCellTileH, rows = std::min(kCellTileH, H - h0), n = rows * B;
      for (int64_t g = 0; g < G; ++g) {
        const bool apart = gru && g == 2;  // r * (W_hn h + b_hn) needs W_hn h on its own
        acc_t* s_ih = pre.data() + g * slot;
        acc_t* s_hh = apart ? pre.data() + G * slot : s_ih;
        const int64_t r0 = g * H + h0;
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t bi = p.b_ih ? static_cast<acc_t>(p.b_ih[(r0 + r) * p.sb_ih]) : acc_t(0);
          const acc_t bh = p.b_hh ? static_cast<acc_t>(p.b_hh[(r0 + r) * p.sb_hh]) : acc_t(0);
          if (apart) {
            std::fill(s_ih + r * B, s_ih + (r + 1) * B, bi);
            std::fill(s_hh + r * B, s_hh + (r + 1) * B, bh);
          } else {
            std::fill(s_ih + r * B, s_ih + (r + 1) * B, bi + bh);
          }
        }
        accumulate_gate_rows(p.w_ih, r0, rows, p.I, x_t.data(), x_rows.data(), B, s_ih,
                             w_scratch.data());
        accumulate_gate_rows(p.w_hh, r0, rows, H, h_t.data(), h_rows.data(), B, s_hh,
                             w_scratch.data());
      }

      acc_t* s0 = pre.data();
      acc_t* s1 = pre.data() + slot;
      acc_t* s2 = pre.data() + 2 * slot;
      acc_t* s3 = pre.data() + 3 * slot;
      const acc_t* h_prev = h_t.data() + h0 * B;
      const Vec one(acc_t(1));
      for (int64_t i = 0; i < n; i += Vec::size()) {
        const int count = static_cast<int>(std::min<int64_t>(Vec::size(), n - i));
        if (lstm) {
          const Vec in = rnn_detail::sigmoid(Vec::loadu(s0 + i, count));
          const Vec forget = rnn_detail::sigmoid(Vec::loadu(s1 + i, count));
          const Vec cand = rnn_detail::tanh(Vec::loadu(s2 + i, count));
          const Vec out = rnn_detail::sigmoid(Vec::loadu(s3 + i, count));
          const Vec c = forget * Vec::loadu(c_t.data() + h0 * B + i, count) + in * cand;
          const Vec tanh_c = rnn_detail::tanh(c);
          in.store(s0 + i, count), forget.store(s1 + i, count), cand.store(s2 + i, count);
          out.store(s3 + i, count), c.store(c_new.data() + i, count);
          (out * tanh_c).store(h_new.data() + i, count);
        } else if (gru) {
          const Vec reset = rnn_detail::sigmoid(Vec::loadu(s0 + i, count));
          const Vec update = rnn_detail::sigmoid(Vec::loadu(s1 + i, count));
          const Vec cand =
              rnn_detail::tanh(Vec::loadu(s2 + i, count) + reset * Vec::loadu(s3 + i, count));
          reset.store(s0 + i, count), update.store(s1 + i, count), cand.store(s2 + i, count);
          ((one - update) * cand + update * Vec::loadu(h_prev + i, count))
              .store(h_new.data() + i, count);
        } else if (p.mode == RnnMode::kRNN_TANH) {
          rnn_detail::tanh(Vec::loadu(s0 + i, count)).store(h_new.data() + i, count);
        } else {
          at::vec::clamp_min(Vec::loadu(s0 + i, count), Vec(acc_t(0)))
              .store(h_new.data() + i, count);
        }
      }

      // Back to batch-major rows: h', c' and the saved activations (layout: rnn_cell_kernels.h).
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t r = 0; r < rows; ++r) h_out[b * H + h0 + r] = static_cast<scalar_t>(h_new[r * B + b]);
        if (lstm) {
          acc_t* c_saved = saved + 4 * B * H + b * H + h0;
          for (int64_t r = 0; r < rows; ++r) {
            c_out[b * H + h0 + r] = static_cast<scalar_t>(c_new[r * B + b]);
            c_saved[r] = c_new[r * B + b];
          }
        }
        if (!lstm && !gru)
          for (int64_t r = 0; r < rows; ++r) saved[b * H + h0 + r] = h_new[r * B + b];
        for (int64_t k = 0; k < saved_gates; ++k) {
          acc_t* dst = saved + b * 4 * H + k * H + h0;
          const acc_t* src = pre.data() + k * slot + b;
          for (int64_t r = 0; r < rows; ++r) dst[r] = src[r * B];
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
