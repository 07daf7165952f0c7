// sm_80 attention backward, FlashAttention-2 style: probabilities are recomputed from the
// forward's lse; nothing of size L x S is stored.
//
//  1. attention_bwd_delta_kernel: delta_i = rowsum(dO * O) (fp32, workspace).
//  2. attention_bwd_kernel: a block owns 64 keys of one (batch, kv head) and walks every query
//     block of every query head of the GQA group, so dK and dV accumulate in registers and are
//     written once (deterministic). Per query block it computes S^T = K Q^T and dP^T = V dO^T
//     (keys on rows, so P^T and dS^T come out in the layout dV and dK need), stores the
//     dropped P^T and dS^T in shared memory, then dV += P^T dO, dK += dS^T Q, and adds
//     dQ += dS K into an fp32 accumulator in global memory with atomicAdd.
//  3. attention_bwd_dq_kernel: dQ = scale * accumulator, in the output dtype and strides.
//
// 8 warps: for S^T and dP^T warp w takes keys 16 (w % 4).. and queries 32 (w / 4)..; for dV
// and dK keys 16 (w % 4).. and head-dim half w / 4; for dQ queries 16 (w % 4).. and head-dim
// half w / 4. dK and dV then cost HD / 2 accumulator registers per thread.
#include "attention.h"
#include "attention_common.cuh"

namespace seqkern::cuda {
namespace {

using namespace detail;

constexpr int kBwdBlockM = 64;  // query rows per step
constexpr int kBwdBlockN = 64;  // keys per block
constexpr int kBwdThreads = 256;
constexpr int kLdP = kBwdBlockM + kSmemPad;  // row length of the P^T and dS^T tiles

constexpr size_t bwd_smem_bytes(int hd) {
  // K, V, Q, dO tiles, P^T and dS^T (2-byte elements), lse and delta of the query block.
  return (static_cast<size_t>(2 * kBwdBlockN + 2 * kBwdBlockM) * (hd + kSmemPad) +
          2 * static_cast<size_t>(kBwdBlockN) * kLdP) * 2 +
         2 * kBwdBlockM * sizeof(float);
}

struct BwdArgs {
  const void* grad_out;  // [B, Hq, L, Dv]
  int64_t grad_out_stride[4];
  const void* out;       // [B, Hq, L, Dv]
  int64_t out_stride[4];
  const float* lse;      // [B, Hq, L] contiguous
  void* dq;              // [B, Hq, L, D]
  int64_t dq_stride[4];
  void* dk;              // [B, Hkv, S, D]
  int64_t dk_stride[4];
  void* dv;              // [B, Hkv, S, Dv]
  int64_t dv_stride[4];
  float* dq_acc;         // workspace: [B, Hq, L, D] fp32, dense, zeroed
  float* delta;          // workspace: [B, Hq, L] fp32
  KernelConsts c;
  float scale;
  bool grad_out_aligned;
  int m_blocks, n_blocks;
};

// delta_i = sum_d dO[i, d] * O[i, d]: one warp per row.
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const AttentionParams p,
                                                                  const BwdArgs a) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.L) return;
  const int i = static_cast<int>(row % p.L), h = static_cast<int>(row / p.L % p.Hq),
            b = static_cast<int>(row / p.L / p.Hq);
  const T* go = row_ptr<T>(a.grad_out, a.grad_out_stride, b, h, i);
  const T* o = row_ptr<T>(a.out, a.out_stride, b, h, i);
  float sum = 0.f;
  for (int d = lane; d < p.Dv; d += 32) sum += to_float(go[d]) * to_float(o[d]);
#pragma unroll
  for (int m = 16; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  if (lane == 0) a.delta[row] = sum;
}

template <typename T, int HD>
__global__ void __launch_bounds__(kBwdThreads)
    attention_bwd_kernel(const AttentionParams p, const BwdArgs a) {
  constexpr int BM = kBwdBlockM, BN = kBwdBlockN, LD = HD + kSmemPad, HALF = HD / 2;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // [BN][LD]
  T* sV = sK + BN * LD;                // [BN][LD]
  T* sQ = sV + BN * LD;                // [BM][LD]
  T* sdO = sQ + BM * LD;               // [BM][LD]
  T* sP = sdO + BM * LD;               // [BN][kLdP]: dropped P^T
  T* sdS = sP + BN * kLdP;             // [BN][kLdP]: dS^T (unscaled)
  float* sLse = reinterpret_cast<float*>(sdS + BN * kLdP);  // [BM]: lse * log2(e), or +inf
  float* sDelta = sLse + BM;                                // [BM]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wr = warp % 4, half = warp / 4;  // row group of 16, column half
  const int nb = static_cast<int>(blockIdx.x % a.n_blocks);
  const int bhk = static_cast<int>(blockIdx.x / a.n_blocks);
  const int hk = bhk % p.Hkv, b = bhk / p.Hkv, G = p.Hq / p.Hkv;
  const int n0 = nb * BN;

  stage_tile<BN, HD, kBwdThreads>(sK, row_ptr<T>(p.k.data, p.k.stride, b, hk, n0),
                                  p.k.stride[2], min(BN, p.S - n0), p.D, a.c.k_aligned);
  stage_tile<BN, HD, kBwdThreads>(sV, row_ptr<T>(p.v.data, p.v.stride, b, hk, n0),
                                  p.v.stride[2], min(BN, p.S - n0), p.Dv, a.c.v_aligned);
  cp_async_commit();

  float dk[HALF / 8][4], dv[HALF / 8][4];  // keys 16 wr.., columns HALF * half..
#pragma unroll
  for (int t = 0; t < HALF / 8; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;

  // Causal: queries i < n0 see none of these keys.
  const int m_start = p.causal ? n0 / BM : 0;
  const int key0 = n0 + wr * 16 + lane / 4;  // this lane's keys: key0, key0 + 8

  for (int g = 0; g < G; ++g) {
    const int h = hk * G + g;
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + h;
    for (int mb = m_start; mb < a.m_blocks; ++mb) {
      const int i0 = mb * BM;
      stage_tile<BM, HD, kBwdThreads>(sQ, row_ptr<T>(p.q.data, p.q.stride, b, h, i0),
                                      p.q.stride[2], min(BM, p.L - i0), p.D, a.c.q_aligned);
      stage_tile<BM, HD, kBwdThreads>(sdO, row_ptr<T>(a.grad_out, a.grad_out_stride, b, h, i0),
                                      a.grad_out_stride[2], min(BM, p.L - i0), p.Dv,
                                      a.grad_out_aligned);
      cp_async_commit();
      for (int r = threadIdx.x; r < BM; r += kBwdThreads) {
        const int i = i0 + r;
        // lse = -inf (no visible key) and rows past L become +inf: exp2(s - inf) = 0 for
        // every s including -inf, so such rows add nothing anywhere.
        const float lse = i < p.L ? a.lse[bh * p.L + i] : -INFINITY;
        sLse[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
        sDelta[r] = i < p.L ? a.delta[bh * p.L + i] : 0.f;
      }
      cp_async_wait_all();
      __syncthreads();  // Q, dO, lse, delta (and on the first pass K, V) staged

      // S^T = K Q^T and dP^T = V dO^T for keys 16 wr.. x queries 32 half..
      float st[4][4], dpt[4][4];
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[t][e] = dpt[t][e] = 0.f;
      warp_mma_smem<T, HD / 16, 2, true>(st, sK, LD, wr * 16, 0, sQ, LD, half * 32, 0, lane);
      warp_mma_smem<T, HD / 16, 2, true>(dpt, sV, LD, wr * 16, 0, sdO, LD, half * 32, 0, lane);

      // P = exp(s - lse); dS = P * (dP - delta), with dP taken through the dropout
      // (dP = keep * dP_dropped / (1 - p)) and P^T stored dropped, as it multiplied V.
      const bool need_mask = tile_needs_mask(p, i0, n0, BN);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int il = half * 32 + t * 8 + 2 * (lane % 4);  // this lane's queries il, il + 1
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {  // keys key0 + 8 rr
          float pd[2], ds[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int e = 2 * rr + c, i = i0 + il + c, j = key0 + 8 * rr;
            float x = st[t][e] * a.c.scale_log2;
            if (need_mask) x = masked_score<T>(p, b, h, i, j, x);
            const float prob = exp2f(x - sLse[il + c]);
            float dp = dpt[t][e];
            pd[c] = prob;
            if (a.c.dropout) {
              const bool keep = dropout_keep(p, a.c.drop_threshold, b, h, i, j);
              pd[c] = keep ? prob * a.c.keep_scale : 0.f;
              dp = keep ? dp * a.c.keep_scale : 0.f;
            }
            // A softmax over one key has no gradient; computed, dP - delta would be the
            // rounding difference of two dot products (dO.v, dO.O with O = v), not 0.
            ds[c] = p.S == 1 ? 0.f : prob * (dp - sDelta[il + c]);
          }
          const int off = (wr * 16 + lane / 4 + 8 * rr) * kLdP + il;
          *reinterpret_cast<uint32_t*>(sP + off) = pack2<T>(pd[0], pd[1]);
          *reinterpret_cast<uint32_t*>(sdS + off) = pack2<T>(ds[0], ds[1]);
        }
      }
      __syncthreads();  // P^T and dS^T complete

      // dV += P^T dO and dK += dS^T Q: keys 16 wr.., columns HALF * half..
      warp_mma_smem<T, BM / 16, HALF / 16, false>(dv, sP, kLdP, wr * 16, 0, sdO, LD, 0,
                                                  half * HALF, lane);
      warp_mma_smem<T, BM / 16, HALF / 16, false>(dk, sdS, kLdP, wr * 16, 0, sQ, LD, 0,
                                                  half * HALF, lane);

      // dQ += dS K for queries 16 wr.., columns HALF * half.., 16 columns at a time. dS is
      // stored transposed, so its A fragments come by ldmatrix .trans with b_rows's
      // addresses (rows: keys, columns: queries).
      uint32_t dsa[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        ldsm_x4_trans(dsa[kk], b_rows(sdS, kLdP, kk * 16, wr * 16, lane));
      float* dq_rows = a.dq_acc + (bh * p.L + i0 + wr * 16 + lane / 4) * p.D;
#pragma unroll
      for (int np = 0; np < HALF / 16; ++np) {
        const int c0 = half * HALF + np * 16;
        if (c0 >= p.D) break;  // warp-uniform: the head-dim tail is padding
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t kb[4];
          ldsm_x4_trans(kb, b_trans(sK, LD, kk * 16, c0, lane));
          mma_16816_x2<T>(acc[0], acc[1], dsa[kk], kb);
        }
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = (e / 2) * 8, c = c0 + t * 8 + 2 * (lane % 4) + e % 2;
            if (i0 + wr * 16 + lane / 4 + r < p.L && c < p.D)
              atomicAdd(dq_rows + static_cast<int64_t>(r) * p.D + c, acc[t][e]);
          }
      }
      __syncthreads();  // every warp is done with Q, dO, P^T, dS^T before the next step
    }
  }
  cp_async_wait_all();  // K and V are still in flight when there was no query block

  // dK = scale * dS^T Q (scores are scale * q.k), dV as accumulated.
  T* dk_out = static_cast<T*>(a.dk) + b * a.dk_stride[0] + hk * a.dk_stride[1];
  T* dv_out = static_cast<T*>(a.dv) + b * a.dv_stride[0] + hk * a.dv_stride[1];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int j = key0 + 8 * rr;
    if (j >= p.S) continue;
#pragma unroll
    for (int t = 0; t < HALF / 8; ++t)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = half * HALF + t * 8 + 2 * (lane % 4) + c;
        if (col < p.D) dk_out[j * a.dk_stride[2] + col] = from_float<T>(dk[t][2 * rr + c] * a.scale);
        if (col < p.Dv) dv_out[j * a.dv_stride[2] + col] = from_float<T>(dv[t][2 * rr + c]);
      }
  }
}

// dQ = scale * accumulator, one element per thread.
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_dq_kernel(const AttentionParams p,
                                                               const BwdArgs a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.B) * p.Hq * p.L * p.D) return;
  const int c = static_cast<int>(idx % p.D);
  const int64_t row = idx / p.D;
  const int i = static_cast<int>(row % p.L), h = static_cast<int>(row / p.L % p.Hq),
            b = static_cast<int>(row / p.L / p.Hq);
  static_cast<T*>(a.dq)[b * a.dq_stride[0] + h * a.dq_stride[1] + i * a.dq_stride[2] + c] =
      from_float<T>(a.dq_acc[idx] * a.scale);
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

size_t dq_acc_bytes(const AttentionParams& p) {
  return align256(static_cast<size_t>(p.B) * p.Hq * p.L * p.D * sizeof(float));
}

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int HD>
cudaError_t launch_bwd(const AttentionParams& p, const BwdArgs& a, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.L;
  const int64_t dq_elems = rows * p.D;
  const int64_t main_blocks = static_cast<int64_t>(p.B) * p.Hkv * a.n_blocks;
  if (div_up(dq_elems, 256) > 0x7fffffff || main_blocks > 0x7fffffff)
    return cudaErrorNotSupported;
  const auto kernel = attention_bwd_kernel<T, HD>;
  constexpr size_t smem = bwd_smem_bytes(HD);
  cudaError_t err = prepare_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(a.dq_acc, 0, static_cast<size_t>(dq_elems) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  attention_bwd_delta_kernel<T><<<static_cast<unsigned>(div_up(rows, 8)), 256, 0, stream>>>(p, a);
  kernel<<<static_cast<unsigned>(main_blocks), kBwdThreads, smem, stream>>>(p, a);
  attention_bwd_dq_kernel<T>
      <<<static_cast<unsigned>(div_up(dq_elems, 256)), 256, 0, stream>>>(p, a);
  return cudaGetLastError();
}

}  // namespace

bool attention_bwd_supported(const AttentionParams& p) {
  return detail::sm80_supported(p, bwd_smem_bytes);
}

size_t attention_bwd_workspace_bytes(const AttentionParams& p) {
  return dq_acc_bytes(p) + align256(static_cast<size_t>(p.B) * p.Hq * p.L * sizeof(float));
}

cudaError_t attention_bwd(const AttentionParams& p, const void* grad_out,
                          const int64_t grad_out_stride[4], const void* out,
                          const int64_t out_stride[4], const float* lse, void* dq,
                          const int64_t dq_stride[4], void* dk, const int64_t dk_stride[4],
                          void* dv, const int64_t dv_stride[4], void* workspace,
                          cudaStream_t stream) {
  if (!attention_bwd_supported(p)) return cudaErrorNotSupported;
  if (p.B == 0 || p.Hq == 0 || p.L == 0 || p.S == 0) return cudaSuccess;  // the binding zeroes

  BwdArgs a;
  a.grad_out = grad_out;
  a.out = out;
  a.lse = lse;
  a.dq = dq, a.dk = dk, a.dv = dv;
  for (int d = 0; d < 4; ++d) {
    a.grad_out_stride[d] = grad_out_stride[d], a.out_stride[d] = out_stride[d];
    a.dq_stride[d] = dq_stride[d], a.dk_stride[d] = dk_stride[d], a.dv_stride[d] = dv_stride[d];
  }
  a.dq_acc = static_cast<float*>(workspace);
  a.delta = reinterpret_cast<float*>(static_cast<char*>(workspace) + dq_acc_bytes(p));
  a.c = make_kernel_consts(p);
  a.scale = p.scale;
  Strided4 go;
  go.data = grad_out;
  for (int d = 0; d < 4; ++d) go.stride[d] = grad_out_stride[d];
  a.grad_out_aligned = rows_16b_aligned(go);
  a.m_blocks = (p.L + kBwdBlockM - 1) / kBwdBlockM;
  a.n_blocks = (p.S + kBwdBlockN - 1) / kBwdBlockN;
  return dispatch_kernel(p, [&](auto t, auto hd) {
    return launch_bwd<decltype(t), decltype(hd)::value>(p, a, stream);
  });
}

}  // namespace seqkern::cuda
