// Shared pieces of the CPU attention forward and backward: the problem description,
// tile loads/stores, mask evaluation, the dropout hash and the tile GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../dropout_hash.h"

namespace seqkern::cpu {

// A tensor of up to 4 dims seen as (base pointer, strides in elements).
template <typename T>
struct View4 {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const T* at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return data + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3;
  }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

enum class MaskKind { kNone, kBool, kFloat };

// Everything the forward and backward kernels read, for one call.
template <typename scalar_t>
struct AttentionProblem {
  int64_t B, Hq, Hkv, L, S, D, Dv;
  View4<scalar_t> q, k, v;          // [B, Hq, L, D], [B, Hkv, S, D], [B, Hkv, S, Dv]
  MaskKind mask_kind = MaskKind::kNone;
  View4<bool> bool_mask;            // [B, Hq, L, S] (stride 0 on broadcast dims)
  View4<scalar_t> float_mask;       // [B, Hq, L, S] (stride 0 on broadcast dims)
  const bool* key_padding = nullptr;  // [B, S] with strides kp_sb, kp_ss; true = padding
  int64_t kp_sb = 0, kp_ss = 0;
  bool causal = false;
  double scale = 1.0;
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;

  int64_t group() const { return Hq / Hkv; }
  bool padded(int64_t b, int64_t j) const {
    return key_padding != nullptr && key_padding[b * kp_sb + j * kp_ss];
  }
};

// Key-block liveness for key padding: kAllPadded blocks are skipped, kAllLive blocks need
// no per-key test, kMixed blocks are masked key by key.
enum class BlockState : uint8_t { kAllPadded, kMixed, kAllLive };

template <typename scalar_t>
std::vector<BlockState> key_block_states(const AttentionProblem<scalar_t>& p, int64_t block) {
  const int64_t nblocks = (p.S + block - 1) / block;
  std::vector<BlockState> states(p.B * nblocks, BlockState::kAllLive);
  if (p.key_padding == nullptr) return states;
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t nb = 0; nb < nblocks; ++nb) {
      int64_t live = 0, n0 = nb * block, n1 = std::min(p.S, n0 + block);
      for (int64_t j = n0; j < n1; ++j) live += !p.padded(b, j);
      states[b * nblocks + nb] = live == 0 ? BlockState::kAllPadded
                               : live == n1 - n0 ? BlockState::kAllLive
                                                 : BlockState::kMixed;
    }
  }
  return states;
}

// Counter-based dropout RNG, bit-identical to seqkern.reference.dropout_keep_mask and the
// Triton kernels: element counter c = ((b*Hq + h)*L + i)*S + j + offset.
inline bool dropout_keep(uint64_t seed, uint64_t counter, float threshold) {
  uint32_t bits = fmix32(static_cast<uint32_t>(counter) ^ static_cast<uint32_t>(seed));
  bits = fmix32(bits ^ static_cast<uint32_t>(counter >> 32) ^ static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) >= threshold;
}

// Masks one query row i of a score tile over keys [n0, n0 + cols) (forward layout): the
// float mask is added, hidden keys (bool mask false, causal j > i, padding) become -inf.
template <typename scalar_t, typename acc_t>
inline void mask_query_row(const AttentionProblem<scalar_t>& p, int64_t b, int64_t h, int64_t i,
                           int64_t n0, int64_t cols, bool check_padding, acc_t* s) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (p.mask_kind == MaskKind::kBool) {
    const bool* m = p.bool_mask.at(b, h, i, n0);
    for (int64_t c = 0; c < cols; ++c)
      if (!m[c * p.bool_mask.s3]) s[c] = kNegInf;
  } else if (p.mask_kind == MaskKind::kFloat) {
    const scalar_t* m = p.float_mask.at(b, h, i, n0);
    for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<acc_t>(m[c * p.float_mask.s3]);
  }
  if (check_padding)
    for (int64_t c = 0; c < cols; ++c)
      if (p.padded(b, n0 + c)) s[c] = kNegInf;
  if (p.causal)
    for (int64_t c = std::max<int64_t>(0, i - n0 + 1); c < cols; ++c) s[c] = kNegInf;
}

// Masks one key row j of a transposed score tile over queries [i0, i0 + rows) (backward
// layout), with the same rules as mask_query_row.
template <typename scalar_t, typename acc_t>
inline void mask_key_row(const AttentionProblem<scalar_t>& p, int64_t b, int64_t h, int64_t j,
                         int64_t i0, int64_t rows, bool check_padding, acc_t* s) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (check_padding && p.padded(b, j)) {
    std::fill(s, s + rows, kNegInf);
    return;
  }
  if (p.mask_kind == MaskKind::kBool) {
    const bool* m = p.bool_mask.at(b, h, i0, j);
    for (int64_t r = 0; r < rows; ++r)
      if (!m[r * p.bool_mask.s2]) s[r] = kNegInf;
  } else if (p.mask_kind == MaskKind::kFloat) {
    const scalar_t* m = p.float_mask.at(b, h, i0, j);
    for (int64_t r = 0; r < rows; ++r) s[r] += static_cast<acc_t>(m[r * p.float_mask.s2]);
  }
  if (p.causal)  // queries i < j do not see key j
    std::fill(s, s + std::min(rows, std::max<int64_t>(0, j - i0)), kNegInf);
}

// Copies rows [r0, r0 + rows) x cols of a strided 2-D slice into a dense buffer, converting
// to acc_t; `transpose` writes dst[c * ld_dst + r] instead of dst[r * ld_dst + c].
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t rows,
                      int64_t cols, acc_t* dst, int64_t ld_dst, bool transpose) {
  if (!transpose) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = src + r * row_stride;
      acc_t* d = dst + r * ld_dst;
      if (col_stride == 1) {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c * col_stride]);
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = src + r * row_stride;
      for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = static_cast<acc_t>(s[c * col_stride]);
    }
  }
}

// C[M, N] (+)= A[M, K] B[K, N], all row-major with leading dims. fp32 runs on oneDNN's
// brgemm micro-kernel (what torch's own flash-CPU uses); fp64 (tests only) on plain loops.
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

inline void tile_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                      const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    double* c = C + m * ldc;
    if (!accumulate)
      for (int64_t n = 0; n < N; ++n) c[n] = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[m * lda + k];
      const double* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

inline void release_gemm_state() { at::native::cpublas::brgemm_release(/*is_vnni=*/false); }

// Runs tasks [0, n) on ATen's intra-op threads: each worker calls worker(next_task) once,
// sets up its scratch buffers, then loops `for (t = next_task(); t < n; t = next_task())`.
// Tasks are handed out one at a time from a shared counter because masked tasks differ a
// lot in cost (causal rows, padded batches): fixed contiguous ranges would leave one thread
// with all the heavy ones.
template <typename Worker>
void run_tasks(int64_t n, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    worker([&next] { return next.fetch_add(1, std::memory_order_relaxed); });
    release_gemm_state();
  });
}

}  // namespace seqkern::cpu
