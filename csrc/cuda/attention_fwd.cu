// sm_80 attention forward, FlashAttention-2 style: a block owns 64 query rows of one
// (batch, head) and streams key/value blocks through shared memory, keeping the softmax
// statistics online in fp32; nothing of size L x S is stored.
//
// Each of the 4 warps owns 16 query rows: S = Q K^T and O += P V run on mma.sync m16n8k16
// with fp32 accumulators, and P goes from the S accumulators to the A operand of P V in
// registers (the two fragment layouts coincide). K of the next block is fetched while P V
// runs, V while Q K^T runs (cp.async), so each tile has one buffer and each step two
// barriers. On compute capability 9.x, attention_fwd_sm90 (wgmma + TMA) runs instead where
// it applies; SEQKERN_CUDA_SM90=0 turns that off.
#include <cstdlib>
#include <cstring>

#include "attention.h"
#include "attention_common.cuh"

namespace seqkern::cuda {
namespace {

using namespace detail;

constexpr int kFwdBlockM = 64;  // query rows per block, 16 per warp
constexpr int kFwdThreads = 128;

// Keys per step: 64, or 32 from head dim 160 up so that the output accumulator (HD / 2
// registers per thread) and the score tile fit in registers together.
__host__ __device__ constexpr int fwd_block_n(int hd) { return hd <= 128 ? 64 : 32; }

// Q, K and V tiles of 2-byte elements.
constexpr size_t fwd_smem_bytes(int hd) {
  return static_cast<size_t>(kFwdBlockM + 2 * fwd_block_n(hd)) * (hd + kSmemPad) * 2;
}

struct FwdArgs {
  KernelConsts c;
  void* out;  // [B, Hq, L, Dv], strides out_stride
  int64_t out_stride[4];
  float* lse;    // [B, Hq, L] contiguous
  int m_blocks;  // ceil(L / kFwdBlockM)
};

template <typename T, int HD>
__global__ void __launch_bounds__(kFwdThreads)
    attention_fwd_kernel(const AttentionParams p, const FwdArgs a) {
  constexpr int BM = kFwdBlockM, BN = fwd_block_n(HD), LD = HD + kSmemPad;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][LD]
  T* sK = sQ + BM * LD;                // [BN][LD]
  T* sV = sK + BN * LD;                // [BN][LD]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Last query blocks first: under causal masking they see the most keys.
  const int mb = a.m_blocks - 1 - static_cast<int>(blockIdx.x % a.m_blocks);
  const int bh = static_cast<int>(blockIdx.x / a.m_blocks);
  const int h = bh % p.Hq, b = bh / p.Hq, hk = h / (p.Hq / p.Hkv);
  const int i0 = mb * BM;

  const T* q = row_ptr<T>(p.q.data, p.q.stride, b, h, i0);
  const T* k = row_ptr<T>(p.k.data, p.k.stride, b, hk, 0);
  const T* v = row_ptr<T>(p.v.data, p.v.stride, b, hk, 0);

  // Causal rows i < i0 + BM see keys j <= i only.
  const int key_end = p.causal ? min(p.S, i0 + BM) : p.S;
  const int n_blocks = (key_end + BN - 1) / BN;

  stage_tile<BM, HD, kFwdThreads>(sQ, q, p.q.stride[2], min(BM, p.L - i0), p.D, a.c.q_aligned);
  stage_tile<BN, HD, kFwdThreads>(sK, k, p.k.stride[2], min(BN, p.S), p.D, a.c.k_aligned);
  cp_async_commit();

  float o[HD / 8][4];  // this warp's 16 rows x HD output columns
#pragma unroll
  for (int t = 0; t < HD / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  // Per fragment row (lane / 4 and lane / 4 + 8): running max (log2 units) and this lane's
  // part of the running sum (the quad's four parts are added at the end).
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int row0 = i0 + warp * 16 + lane / 4;  // rows row0 and row0 + 8

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int n0 = nb * BN;
    cp_async_wait_all();
    __syncthreads();  // K[nb] (and Q) staged; every warp is done with V[nb - 1]
    stage_tile<BN, HD, kFwdThreads>(sV, v + n0 * p.v.stride[2], p.v.stride[2],
                                    min(BN, p.S - n0), p.Dv, a.c.v_aligned);
    cp_async_commit();

    float s[BN / 8][4];
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
    warp_mma_smem<T, HD / 16, BN / 16, true>(s, sQ, LD, warp * 16, 0, sK, LD, 0, 0, lane);

    const bool need_mask = tile_needs_mask(p, i0, n0, BN);
    float new_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[t][e] * a.c.scale_log2;
        if (need_mask)
          x = masked_score<T>(p, b, h, row0 + (e / 2) * 8, n0 + t * 8 + 2 * (lane % 4) + e % 2, x);
        s[t][e] = x;
        new_max[e / 2] = fmaxf(new_max[e / 2], x);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 1));
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 2));
      // A row with nothing visible so far subtracts 0, not -inf: exp2(-inf - 0) = 0 where
      // exp2(-inf - -inf) would be NaN. alpha = 0 then clears nothing that is not 0 already.
      const float ref = new_max[r] == -INFINITY ? 0.f : new_max[r];
      alpha[r] = exp2f(row_max[r] - ref);
      row_max[r] = new_max[r];
      new_max[r] = ref;
    }
    float block_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = exp2f(s[t][e] - new_max[e / 2]);
        block_sum[e / 2] += prob;
        s[t][e] = prob;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + block_sum[r];
#pragma unroll
    for (int t = 0; t < HD / 8; ++t) {
      o[t][0] *= alpha[0], o[t][1] *= alpha[0];
      o[t][2] *= alpha[1], o[t][3] *= alpha[1];
    }
    // Dropout after the sums: the lse is that of the undropped softmax.
    if (a.c.dropout) {
#pragma unroll
      for (int t = 0; t < BN / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool keep = dropout_keep(p, a.c.drop_threshold, b, h, row0 + (e / 2) * 8,
                                         n0 + t * 8 + 2 * (lane % 4) + e % 2);
          s[t][e] = keep ? s[t][e] * a.c.keep_scale : 0.f;
        }
    }

    cp_async_wait_all();
    __syncthreads();  // V[nb] staged; every warp is done with K[nb]
    if (nb + 1 < n_blocks) {
      stage_tile<BN, HD, kFwdThreads>(sK, k + (n0 + BN) * p.k.stride[2], p.k.stride[2],
                                      min(BN, p.S - n0 - BN), p.D, a.c.k_aligned);
      cp_async_commit();
    }

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      // The accumulators of n-tiles 2kk, 2kk+1 are the A fragment of keys 16kk..16kk+15.
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < HD / 16; ++np) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, b_trans(sV, LD, kk * 16, np * 16, lane));
        mma_16816_x2<T>(o[2 * np], o[2 * np + 1], pa, vb);
      }
    }
  }
  cp_async_wait_all();  // nothing may be in flight at exit (n_blocks == 0 leaves K's)

  // out = o / sum, lse = max + log(sum); a row that saw no key gets 0 and -inf.
  T* out = static_cast<T*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = row0 + r * 8;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    if (i < p.L) {
      if (lane % 4 == 0)
        a.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.L + i] =
            sum > 0.f ? row_max[r] * kLn2 + logf(sum) : -INFINITY;
      T* out_row = out + i * a.out_stride[2];
#pragma unroll
      for (int t = 0; t < HD / 8; ++t) {
        const int c = t * 8 + 2 * (lane % 4);
        if (c < p.Dv) out_row[c] = from_float<T>(o[t][2 * r] * inv);
        if (c + 1 < p.Dv) out_row[c + 1] = from_float<T>(o[t][2 * r + 1] * inv);
      }
    }
  }
}

template <typename T, int HD>
cudaError_t launch_fwd(const AttentionParams& p, const FwdArgs& a, cudaStream_t stream) {
  const auto kernel = attention_fwd_kernel<T, HD>;
  constexpr size_t smem = fwd_smem_bytes(HD);
  cudaError_t err = prepare_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = static_cast<int64_t>(p.B) * p.Hq * a.m_blocks;
  if (blocks > 0x7fffffff) return cudaErrorNotSupported;
  kernel<<<static_cast<unsigned>(blocks), kFwdThreads, smem, stream>>>(p, a);
  return cudaGetLastError();
}

// SEQKERN_CUDA_SM90=0 keeps Hopper on the sm_80 kernel (read once).
bool sm90_path_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("SEQKERN_CUDA_SM90");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

bool device_is_sm90() {
  int major = 0, smem_optin = 0;
  return current_device(&major, &smem_optin) && major == 9;
}

}  // namespace

bool attention_fwd_supported(const AttentionParams& p) {
  return detail::sm80_supported(p, fwd_smem_bytes);
}

cudaError_t attention_fwd(const AttentionParams& p, void* out, const int64_t out_stride[4],
                          float* lse, cudaStream_t stream) {
  if (sm90_path_enabled() && device_is_sm90()) {
    const cudaError_t err = attention_fwd_sm90(p, out, out_stride, lse, stream);
    if (err != cudaErrorNotSupported) return err;
    (void)cudaGetLastError();  // clears what the declined attempt may have left for ours
  }
  if (!attention_fwd_supported(p)) return cudaErrorNotSupported;
  if (p.B == 0 || p.Hq == 0 || p.L == 0) return cudaSuccess;  // nothing to write

  FwdArgs a;
  a.out = out;
  for (int d = 0; d < 4; ++d) a.out_stride[d] = out_stride[d];
  a.lse = lse;
  a.c = make_kernel_consts(p);
  a.m_blocks = (p.L + kFwdBlockM - 1) / kFwdBlockM;
  return dispatch_kernel(p, [&](auto t, auto hd) {
    return launch_fwd<decltype(t), decltype(hd)::value>(p, a, stream);
  });
}

}  // namespace seqkern::cuda
