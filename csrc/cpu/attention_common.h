// Shared pieces of the CPU attention forward and backward: the problem description,
// tile loads/stores, mask evaluation, the dropout hash and the tile GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdint>
#include <limits>

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
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

inline bool dropout_keep(uint64_t seed, uint64_t counter, float threshold) {
  uint32_t bits = fmix32(static_cast<uint32_t>(counter) ^ static_cast<uint32_t>(seed));
  bits = fmix32(bits ^ static_cast<uint32_t>(counter >> 32) ^ static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) >= threshold;
}

// The additive score bias of element (b, h, i, j) from attn_mask, causal and key padding:
// 0, a float mask value, or -inf.
template <typename scalar_t, typename acc_t>
inline acc_t mask_bias(const AttentionProblem<scalar_t>& p, int64_t b, int64_t h, int64_t i,
                       int64_t j) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (p.causal && j > i) return kNegInf;
  if (p.padded(b, j)) return kNegInf;
  switch (p.mask_kind) {
    case MaskKind::kBool:
      return *p.bool_mask.at(b, h, i, j) ? acc_t(0) : kNegInf;
    case MaskKind::kFloat:
      return static_cast<acc_t>(*p.float_mask.at(b, h, i, j));
    default:
      return acc_t(0);
  }
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

}  // namespace seqkern::cpu
