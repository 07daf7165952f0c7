// CPU attention weights: P = exp(scale * q.k + mask - lse) from the forward's lse, in one
// pass over q.k, optionally averaged over heads inside the kernel (so that only [B, L, S]
// is ever written) and with the forward's dropout keep-mask applied.
//
// Work is split over (batch, query block, key block); each task loops over the heads and
// sums them in a register-resident tile. Fully padded key blocks and key blocks above the
// causal diagonal are zero without any arithmetic.
#pragma once

#include <vector>

#include "attention_common.h"
#include "attention_kernels.h"
#include "attention_vec.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kWeightsBlockM = 64;   // query rows per task
constexpr int64_t kWeightsBlockN = 128;  // keys per task

template <typename scalar_t>
void attention_weights_kernel(const AttentionProblem<scalar_t>& p,
                              const acc_type_t<scalar_t>* lse, bool average_heads,
                              scalar_t* weights) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t m_blocks = (p.L + kWeightsBlockM - 1) / kWeightsBlockM;
  const int64_t n_blocks = (p.S + kWeightsBlockN - 1) / kWeightsBlockN;
  const std::vector<BlockState> key_states = key_block_states(p, kWeightsBlockN);
  const bool dropout = p.dropout_p > 0.0;
  const acc_t keep_scale = dropout ? acc_t(1.0 / (1.0 - p.dropout_p)) : acc_t(1);
  const float threshold = static_cast<float>(p.dropout_p);
  const acc_t head_weight = average_heads ? acc_t(1) / static_cast<acc_t>(p.Hq) : acc_t(1);

  const int64_t num_tasks = p.B * m_blocks * n_blocks;
  run_tasks(num_tasks, [&](const auto& next_task) {
    std::vector<acc_t> q_tile(kWeightsBlockM * p.D), k_tile_t(p.D * kWeightsBlockN);
    std::vector<acc_t> scores(kWeightsBlockM * kWeightsBlockN);
    std::vector<acc_t> sum(average_heads ? kWeightsBlockM * kWeightsBlockN : 0);

    for (int64_t task = next_task(); task < num_tasks; task = next_task()) {
      const int64_t nb = task % n_blocks, mb = (task / n_blocks) % m_blocks;
      const int64_t b = task / (n_blocks * m_blocks);
      const int64_t i0 = mb * kWeightsBlockM, rows = std::min(kWeightsBlockM, p.L - i0);
      const int64_t n0 = nb * kWeightsBlockN, cols = std::min(kWeightsBlockN, p.S - n0);
      const BlockState state = key_states[b * n_blocks + nb];
      // Nothing in this tile is visible: every key padded, or every key after every query.
      const bool hidden = state == BlockState::kAllPadded || (p.causal && n0 > i0 + rows - 1);
      const bool per_element = (p.causal && n0 + cols - 1 > i0) ||
                               state == BlockState::kMixed || p.mask_kind != MaskKind::kNone;
      if (average_heads) std::fill(sum.begin(), sum.end(), acc_t(0));

      for (int64_t h = 0; h < p.Hq && !hidden; ++h) {
        const int64_t hk = h / p.group();
        load_tile(p.q.at(b, h, i0, 0), p.q.s2, p.q.s3, rows, p.D, q_tile.data(), p.D, false);
        scale_row(q_tile.data(), rows * p.D, static_cast<acc_t>(p.scale));
        load_tile(p.k.at(b, hk, n0, 0), p.k.s2, p.k.s3, cols, p.D, k_tile_t.data(), cols, true);
        tile_gemm(rows, cols, p.D, q_tile.data(), p.D, k_tile_t.data(), cols, scores.data(),
                  cols, false);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = scores.data() + r * cols;
          const int64_t row = (b * p.Hq + h) * p.L + i0 + r;
          if (per_element)
            mask_query_row(p, b, h, i0 + r, n0, cols, state == BlockState::kMixed, s);
          if (lse[row] == kNegInf) {  // no visible key in this row: weights 0, not NaN
            std::fill(s, s + cols, acc_t(0));
          } else {
            exp_shift_sum(s, cols, lse[row]);
          }
          if (dropout) {
            const uint64_t base = static_cast<uint64_t>(row) * p.S + n0 + p.offset;
            for (int64_t c = 0; c < cols; ++c)
              s[c] = dropout_keep(p.seed, base + c, threshold) ? s[c] * keep_scale : acc_t(0);
          }
          if (average_heads) {
            acc_t* a = sum.data() + r * cols;
            for (int64_t c = 0; c < cols; ++c) a[c] += s[c];
          } else {
            scalar_t* w = weights + row * p.S + n0;
            for (int64_t c = 0; c < cols; ++c) w[c] = static_cast<scalar_t>(s[c]);
          }
        }
      }

      // Write what the head loop did not: the averaged tile, or zeros for a hidden tile.
      if (!average_heads && !hidden) continue;
      const int64_t heads_out = average_heads ? 1 : p.Hq;
      for (int64_t h = 0; h < heads_out; ++h) {
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* w = weights + ((b * heads_out + h) * p.L + i0 + r) * p.S + n0;
          if (hidden) {
            std::fill(w, w + cols, scalar_t(0));
          } else {
            const acc_t* a = sum.data() + r * cols;
            for (int64_t c = 0; c < cols; ++c) w[c] = static_cast<scalar_t>(a[c] * head_weight);
          }
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
