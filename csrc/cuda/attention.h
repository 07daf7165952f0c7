// Framework-free CUDA attention kernels: the problem description and the entry points.
// No torch headers here; the torch binding (bind_attention.cpp) fills AttentionParams from
// tensors and launches on the current stream. Semantics are those of seqkern/ops/attention.py
// and seqkern/reference/attention.py: Hq a multiple of Hkv (query head h reads key/value head
// h / (Hq / Hkv)); scores = scale * q.k (+ float mask), hidden keys (bool mask false,
// causal j > i top-left aligned, key padding true) get -inf; a row with no visible key has
// out 0 and lse -inf; dropout keeps element (b, h, i, j) iff
// fmix32(fmix32(lo32(c) ^ seed_lo) ^ hi32(c) ^ seed_hi) >> 8 >= dropout_p * 2^24 with
// c = ((b * Hq + h) * L + i) * S + j + offset (the same bits as the CPU and Triton kernels).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace seqkern::cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };
enum class MaskKind : int { kNone = 0, kBool = 1, kFloat = 2 };

// A strided 4-D view [d0, d1, d2, d3] in elements; the last stride must be 1 for q, k, v,
// out, grad_out and the gradients (the binding makes them so).
struct Strided4 {
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

struct AttentionParams {
  DType dtype = DType::kHalf;       // of q, k, v, out, grad_out, dq, dk, dv and a float mask
  int B = 0, Hq = 0, Hkv = 0;       // batch, query heads, key/value heads (Hq % Hkv == 0)
  int L = 0, S = 0;                 // query length, key length
  int D = 0, Dv = 0;                // head dims of q/k and of v/out
  Strided4 q, k, v;                 // [B, Hq, L, D], [B, Hkv, S, D], [B, Hkv, S, Dv]
  MaskKind mask_kind = MaskKind::kNone;
  Strided4 mask;                    // [B, Hq, L, S] (bool bytes or dtype), any strides (0 ok)
  const bool* key_padding = nullptr;  // [B, S], true = padding, or nullptr
  int64_t kp_stride_b = 0, kp_stride_s = 0;
  bool causal = false;
  float scale = 1.f;
  float dropout_p = 0.f;            // in [0, 1); 0 = no dropout
  uint64_t seed = 0, offset = 0;    // dropout's counter-based generator
};

// Forward. out: [B, Hq, L, Dv] with strides out_stride (last 1), written for every row;
// lse: [B, Hq, L] fp32, contiguous. Neither may alias an input.
// Returns cudaSuccess, cudaErrorNotSupported for shapes/dtypes it does not handle
// (see attention_fwd_supported), or the launch error.
cudaError_t attention_fwd(const AttentionParams& p, void* out, const int64_t out_stride[4],
                          float* lse, cudaStream_t stream);

// Backward. grad_out, out: [B, Hq, L, Dv] (last stride 1); lse: the forward's, contiguous
// fp32 [B, Hq, L]. dq [B, Hq, L, D], dk [B, Hkv, S, D], dv [B, Hkv, S, Dv] with the given
// strides (last 1), fully written. workspace: at least attention_bwd_workspace_bytes(p)
// bytes of device memory (fp32 accumulators, row deltas); not aliased with anything.
size_t attention_bwd_workspace_bytes(const AttentionParams& p);
cudaError_t attention_bwd(const AttentionParams& p, const void* grad_out,
                          const int64_t grad_out_stride[4], const void* out,
                          const int64_t out_stride[4], const float* lse, void* dq,
                          const int64_t dq_stride[4], void* dk, const int64_t dk_stride[4],
                          void* dv, const int64_t dv_stride[4], void* workspace,
                          cudaStream_t stream);

// Whether the kernels above handle p (dtype, head dims); the binding asks before launching
// and the Python backend mirrors it in its not_supported_reasons.
bool attention_fwd_supported(const AttentionParams& p);
bool attention_bwd_supported(const AttentionParams& p);

// The Hopper (sm_90a) forward: warpgroup MMA (wgmma) with TMA loads, for D == Dv in {64, 128},
// fp16/bf16. Returns cudaErrorNotSupported when p or the device does not qualify; then
// attention_fwd uses the sm_80 kernel. Defined in attention_fwd_sm90.cu.
cudaError_t attention_fwd_sm90(const AttentionParams& p, void* out, const int64_t out_stride[4],
                               float* lse, cudaStream_t stream);

}  // namespace seqkern::cuda
