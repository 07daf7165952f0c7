// CPU attention backward, FlashAttention-2 style: probabilities are recomputed from the
// forward's log-sum-exp, nothing of size L x S is stored.
//
// Work is split over (batch, key/value head); a task owns every query head of its GQA group,
// so dK/dV accumulate over the group and dQ accumulates over key blocks in task-private
// buffers: deterministic, no atomics, memory linear in L and S. Scores are computed
// transposed (S^T = K Q^T, keys on rows) so that P^T and dS^T, which dV and dK need, come
// out of the GEMMs in place, and dQ is accumulated transposed (dQ^T += K^T dS^T).
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "attention_common.h"
#include "attention_kernels.h"
#include "attention_vec.h"

namespace seqkern::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kBwdBlockM = 64;  // query rows per tile
constexpr int64_t kBwdBlockN = 64;  // keys per tile

template <typename scalar_t>
void attention_bwd_kernel(const AttentionProblem<scalar_t>& p, View4<scalar_t> grad_out,
                          View4<scalar_t> out, const acc_type_t<scalar_t>* lse, scalar_t* dq,
                          scalar_t* dk, scalar_t* dv) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t G = p.group(), L = p.L, D = p.D, Dv = p.Dv;
  const int64_t n_blocks = (p.S + kBwdBlockN - 1) / kBwdBlockN;
  const std::vector<BlockState> key_states = key_block_states(p, kBwdBlockN);
  const bool dropout = p.dropout_p > 0.0;
  const acc_t keep_scale = dropout ? acc_t(1.0 / (1.0 - p.dropout_p)) : acc_t(1);
  const float threshold = static_cast<float>(p.dropout_p);
  const acc_t scale = static_cast<acc_t>(p.scale);

  const int64_t num_tasks = p.B * p.Hkv;
  run_tasks(num_tasks, [&](const auto& next_task) {
    // Per query head of the group: Q and dO as rows and transposed, D_i = rowsum(dO * O),
    // the lse with -inf replaced by +inf (so exp(s - lse) = 0 on empty rows), dQ.
    std::vector<acc_t> q_rows(G * L * D), q_t(G * D * L), go_rows(G * L * Dv), go_t(G * Dv * L);
    // dQ is accumulated transposed (dQ^T += K^T dS^T) so that dS^T feeds it in place.
    std::vector<acc_t> delta(G * L), lse_safe(G * L), dq_t(G * D * L);
    std::vector<acc_t> k_tile(kBwdBlockN * D), k_tile_t(D * kBwdBlockN), v_tile(kBwdBlockN * Dv),
        dk_acc(kBwdBlockN * D), dv_acc(kBwdBlockN * Dv);
    std::vector<acc_t> p_t(kBwdBlockN * kBwdBlockM), dp_t(kBwdBlockN * kBwdBlockM),
        pd_t(kBwdBlockN * kBwdBlockM);

    for (int64_t task = next_task(); task < num_tasks; task = next_task()) {
      const int64_t b = task / p.Hkv, hk = task % p.Hkv;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        // Q is stored pre-scaled: S^T = K (scale Q)^T and dK = dS^T (scale Q) directly.
        load_tile(p.q.at(b, h, 0, 0), p.q.s2, p.q.s3, L, D, &q_rows[g * L * D], D, false);
        scale_row(&q_rows[g * L * D], L * D, scale);
        load_tile(p.q.at(b, h, 0, 0), p.q.s2, p.q.s3, L, D, &q_t[g * D * L], L, true);
        scale_row(&q_t[g * D * L], D * L, scale);
        load_tile(grad_out.at(b, h, 0, 0), grad_out.s2, grad_out.s3, L, Dv,
                  &go_rows[g * L * Dv], Dv, false);
        load_tile(grad_out.at(b, h, 0, 0), grad_out.s2, grad_out.s3, L, Dv, &go_t[g * Dv * L],
                  L, true);
        const acc_t* lse_h = lse + (b * p.Hq + h) * L;
        for (int64_t i = 0; i < L; ++i) {
          acc_t sum = 0;
          const scalar_t* o = out.at(b, h, i, 0);
          const acc_t* go = &go_rows[(g * L + i) * Dv];
          for (int64_t d = 0; d < Dv; ++d) sum += go[d] * static_cast<acc_t>(o[d * out.s3]);
          delta[g * L + i] = sum;
          lse_safe[g * L + i] = std::isinf(lse_h[i]) && lse_h[i] < 0 ? kInf : lse_h[i];
        }
      }
      std::fill(dq_t.begin(), dq_t.end(), acc_t(0));

      for (int64_t nb = 0; nb < n_blocks; ++nb) {
        const int64_t n0 = nb * kBwdBlockN, cols = std::min(kBwdBlockN, p.S - n0);
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
        const BlockState state = key_states[b * n_blocks + nb];
        // With causal masking only queries i >= n0 see this block.
        const int64_t q_begin = p.causal ? n0 : 0;
        if (state != BlockState::kAllPadded && q_begin < L) {
          load_tile(p.k.at(b, hk, n0, 0), p.k.s2, p.k.s3, cols, D, k_tile.data(), D, false);
          load_tile(p.k.at(b, hk, n0, 0), p.k.s2, p.k.s3, cols, D, k_tile_t.data(), cols, true);
          load_tile(p.v.at(b, hk, n0, 0), p.v.s2, p.v.s3, cols, Dv, v_tile.data(), Dv, false);
        }
        for (int64_t g = 0; g < G && state != BlockState::kAllPadded; ++g) {
          const int64_t h = hk * G + g;
          for (int64_t i0 = q_begin; i0 < L; i0 += kBwdBlockM) {
            const int64_t rows = std::min(kBwdBlockM, L - i0);
            // S^T[n, m] = k_n . q_m
            tile_gemm(cols, rows, D, k_tile.data(), D, &q_t[g * D * L + i0], L, p_t.data(), rows,
                      false);
            const bool diagonal = p.causal && n0 + cols - 1 > i0;
            const bool per_element =
                diagonal || state == BlockState::kMixed || p.mask_kind != MaskKind::kNone;
            const acc_t* lse_row = &lse_safe[g * L + i0];
            for (int64_t n = 0; n < cols; ++n) {
              acc_t* s = p_t.data() + n * rows;
              if (per_element)
                mask_key_row(p, b, h, n0 + n, i0, rows, state == BlockState::kMixed, s);
              exp_minus(s, lse_row, rows);
            }
            // dP^T[n, m] = v_n . dO_m
            tile_gemm(cols, rows, Dv, v_tile.data(), Dv, &go_t[g * Dv * L + i0], L, dp_t.data(),
                      rows, false);
            const acc_t* p_used = p_t.data();
            if (dropout) {
              for (int64_t n = 0; n < cols; ++n) {
                for (int64_t m = 0; m < rows; ++m) {
                  const uint64_t counter =
                      ((b * p.Hq + h) * L + i0 + m) * p.S + n0 + n + p.offset;
                  const bool keep = dropout_keep(p.seed, counter, threshold);
                  const int64_t e = n * rows + m;
                  pd_t[e] = keep ? p_t[e] * keep_scale : acc_t(0);
                  dp_t[e] = keep ? dp_t[e] * keep_scale : acc_t(0);
                }
              }
              p_used = pd_t.data();
            }
            // dV += P_dropped^T dO
            tile_gemm(cols, Dv, rows, p_used, rows, &go_rows[(g * L + i0) * Dv], Dv,
                      dv_acc.data(), Dv, true);
            // dS^T = P^T * (dP^T - D), in place of dP^T; then dK += dS^T Q, dQ += dS K.
            const acc_t* delta_row = &delta[g * L + i0];
            for (int64_t n = 0; n < cols; ++n) {
              acc_t* dpr = dp_t.data() + n * rows;
              const acc_t* pr = p_t.data() + n * rows;
              int64_t m = 0;
              for (; m + Vec::size() <= rows; m += Vec::size())
                (Vec::loadu(pr + m) * (Vec::loadu(dpr + m) - Vec::loadu(delta_row + m)))
                    .store(dpr + m);
              for (; m < rows; ++m) dpr[m] = pr[m] * (dpr[m] - delta_row[m]);
            }
            tile_gemm(cols, D, rows, dp_t.data(), rows, &q_rows[(g * L + i0) * D], D,
                      dk_acc.data(), D, true);
            tile_gemm(D, rows, cols, k_tile_t.data(), cols, dp_t.data(), rows,
                      &dq_t[g * D * L + i0], L, true);
          }
        }
        for (int64_t n = 0; n < cols; ++n) {
          // dk, dv: [B, S, Hkv, D] in memory
          scalar_t* dk_row = dk + ((b * p.S + n0 + n) * p.Hkv + hk) * D;
          scalar_t* dv_row = dv + ((b * p.S + n0 + n) * p.Hkv + hk) * Dv;
          for (int64_t d = 0; d < D; ++d)
            dk_row[d] = static_cast<scalar_t>(dk_acc[n * D + d]);
          for (int64_t d = 0; d < Dv; ++d) dv_row[d] = static_cast<scalar_t>(dv_acc[n * Dv + d]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        // dq: [B, L, Hq, D] in memory
        scalar_t* dq_head = dq + (b * L * p.Hq + hk * G + g) * D;
        const acc_t* acc = &dq_t[g * D * L];
        for (int64_t i = 0; i < L; ++i)
          for (int64_t d = 0; d < D; ++d)
            dq_head[i * p.Hq * D + d] = static_cast<scalar_t>(acc[d * L + i] * scale);
      }
    }
  });
}


}  // namespace CPU_CAPABILITY
}  // namespace seqkern::cpu
