// CPU attention forward: tiled online softmax (FlashAttention-style) on brgemm tiles.
//
// Work is split over (batch, query head, query block); each task streams the key/value
// blocks its rows can see: causal tasks stop at the diagonal, fully padded key blocks are
// skipped, and per-element masking runs only on tiles that need it.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "attention_common.h"
#include "attention_kernels.h"
#include "attention_vec.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kFwdBlockM = 64;   // query rows per task
constexpr int64_t kFwdBlockN = 128;  // keys per tile

template <typename scalar_t>
void attention_fwd_kernel(const AttentionProblem<scalar_t>& p, scalar_t* out,
                          acc_type_t<scalar_t>* lse) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t m_blocks = (p.L + kFwdBlockM - 1) / kFwdBlockM;
  const int64_t n_blocks = (p.S + kFwdBlockN - 1) / kFwdBlockN;
  const std::vector<BlockState> key_states = key_block_states(p, kFwdBlockN);
  const bool dropout = p.dropout_p > 0.0;
  const acc_t keep_scale = dropout ? acc_t(1.0 / (1.0 - p.dropout_p)) : acc_t(1);
  const float threshold = static_cast<float>(p.dropout_p);
  // V can feed the GEMM in place when it already is an fp32/fp64 row-major tile.
  const bool v_direct = std::is_same_v<scalar_t, acc_t> && p.v.s3 == 1;

  const int64_t num_tasks = p.B * p.Hq * m_blocks;
  run_tasks(num_tasks, [&](const auto& next_task) {
    std::vector<acc_t> q_tile(kFwdBlockM * p.D), k_tile_t(p.D * kFwdBlockN), v_tile(kFwdBlockN * p.Dv);
    std::vector<acc_t> scores(kFwdBlockM * kFwdBlockN), acc(kFwdBlockM * p.Dv);
    std::vector<acc_t> row_max_seen(kFwdBlockM), row_sum(kFwdBlockM);

    for (int64_t task = next_task(); task < num_tasks; task = next_task()) {
      // Last query blocks first: under causal masking they see the most keys.
      const int64_t mb = m_blocks - 1 - task % m_blocks, bh = task / m_blocks;
      const int64_t h = bh % p.Hq, b = bh / p.Hq, hk = h / p.group();
      const int64_t i0 = mb * kFwdBlockM, rows = std::min(kFwdBlockM, p.L - i0);

      load_tile(p.q.at(b, h, i0, 0), p.q.s2, p.q.s3, rows, p.D, q_tile.data(), p.D, false);
      scale_row(q_tile.data(), rows * p.D, static_cast<acc_t>(p.scale));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(row_max_seen.begin(), row_max_seen.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));

      // Keys j <= i only: with causal masking the last visible key of this block is i0+rows-1.
      const int64_t key_end = p.causal ? std::min(p.S, i0 + rows) : p.S;
      for (int64_t nb = 0; nb * kFwdBlockN < key_end; ++nb) {
        const BlockState state = key_states[b * n_blocks + nb];
        if (state == BlockState::kAllPadded) continue;
        const int64_t n0 = nb * kFwdBlockN, cols = std::min(kFwdBlockN, key_end - n0);

        load_tile(p.k.at(b, hk, n0, 0), p.k.s2, p.k.s3, cols, p.D, k_tile_t.data(), cols, true);
        tile_gemm(rows, cols, p.D, q_tile.data(), p.D, k_tile_t.data(), cols, scores.data(),
                  cols, false);

        const bool diagonal = p.causal && n0 + cols - 1 > i0;
        const bool per_element =
            diagonal || state == BlockState::kMixed || p.mask_kind != MaskKind::kNone;
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = scores.data() + r * cols;
          if (per_element)
            mask_query_row(p, b, h, i0 + r, n0, cols, state == BlockState::kMixed, s);
          const acc_t m_new = std::max(row_max_seen[r], row_max(s, cols));
          if (m_new == kNegInf) {  // nothing visible yet in this row
            std::fill(s, s + cols, acc_t(0));
            continue;
          }
          const acc_t alpha = std::exp(row_max_seen[r] - m_new);
          row_max_seen[r] = m_new;
          row_sum[r] = row_sum[r] * alpha + exp_shift_sum(s, cols, m_new);
          if (alpha != acc_t(1)) scale_row(acc.data() + r * p.Dv, p.Dv, alpha);
          if (dropout) {
            const uint64_t base = ((b * p.Hq + h) * p.L + i0 + r) * p.S + n0 + p.offset;
            for (int64_t c = 0; c < cols; ++c)
              s[c] = dropout_keep(p.seed, base + c, threshold) ? s[c] * keep_scale : acc_t(0);
          }
        }

        const acc_t* v_ptr;
        int64_t ldv;
        if (v_direct) {
          v_ptr = reinterpret_cast<const acc_t*>(p.v.at(b, hk, n0, 0));
          ldv = p.v.s2;
        } else {
          load_tile(p.v.at(b, hk, n0, 0), p.v.s2, p.v.s3, cols, p.Dv, v_tile.data(), p.Dv, false);
          v_ptr = v_tile.data();
          ldv = p.Dv;
        }
        tile_gemm(rows, p.Dv, cols, scores.data(), cols, v_ptr, ldv, acc.data(), p.Dv, true);
      }

      // out = acc / row_sum; rows that saw no key get 0 and lse = -inf.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = (b * p.Hq + h) * p.L + i0 + r;
        const bool empty = row_sum[r] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / row_sum[r];
        scalar_t* o = out + ((b * p.L + i0 + r) * p.Hq + h) * p.Dv;  // [B, L, Hq, Dv] memory
        const acc_t* a = acc.data() + r * p.Dv;
        for (int64_t d = 0; d < p.Dv; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
        lse[row] = empty ? kNegInf : row_max_seen[r] + std::log(row_sum[r]);
      }
    }
  });
}


}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
