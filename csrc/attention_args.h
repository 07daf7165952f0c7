// The argument checks of seqkern_C::attention_* that do not depend on the device, shared by
// the CPU binding (csrc/cpu/attention.cpp) and the CUDA one (csrc/cuda/bind_attention.cpp),
// which each add their device checks. Shapes: seqkern/ops/attention.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace seqkern {

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& attn_mask,
                                   const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "seqkern attention: query, key, value must be 4-D [B, H, L, D]");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "seqkern attention: query, key, value must be on one device");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "seqkern attention: query, key, value must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ");
  TORCH_CHECK(k.size(3) == q.size(3), "query and key head dims differ");
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "value must match key's heads and length");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "query heads must be a multiple of key/value heads");
  if (attn_mask) {
    TORCH_CHECK(attn_mask->dim() == 4 && attn_mask->size(0) == q.size(0) &&
                    attn_mask->size(1) == q.size(1) && attn_mask->size(2) == q.size(2) &&
                    attn_mask->size(3) == k.size(2),
                "attn_mask must be broadcast to [B, Hq, L, S]");
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool ||
                    attn_mask->scalar_type() == q.scalar_type(),
                "attn_mask must be bool or the query's dtype");
    TORCH_CHECK(attn_mask->device() == q.device(), "attn_mask must be on the query's device");
  }
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == q.size(0) &&
                    key_padding_mask->size(1) == k.size(2) &&
                    key_padding_mask->scalar_type() == at::kBool,
                "key_padding_mask must be a [B, S] bool tensor");
    TORCH_CHECK(key_padding_mask->device() == q.device(),
                "key_padding_mask must be on the query's device");
  }
}

// attention_bwd's grad_out and out [B, Hq, L, Dv] (the query's B, Hq, L, the value's Dv,
// the query's dtype and device) and lse [B, Hq, L] of lse_dtype: the kernels read all three
// without bounds checks (grad_out and out were checked against each other only, and on the
// CPU lse by dtype and rank only).
inline void check_attention_grads(const at::Tensor& q, const at::Tensor& v,
                                  const at::Tensor& grad_out, const at::Tensor& out,
                                  const at::Tensor& lse, at::ScalarType lse_dtype) {
  TORCH_CHECK(out.dim() == 4 && grad_out.sizes() == out.sizes() && out.size(0) == q.size(0) &&
                  out.size(1) == q.size(1) && out.size(2) == q.size(2) &&
                  out.size(3) == v.size(3),
              "grad_out and out must be [B, Hq, L, Dv]");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad_out and out must have the query's dtype");
  TORCH_CHECK(lse.scalar_type() == lse_dtype && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must be the forward's [B, Hq, L] log-sum-exp");
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              "grad_out, out and lse must be on the query's device");
}

// Dropout's (seed, offset) from the op's seed_offset argument: a CPU int64 tensor [2].
inline std::pair<uint64_t, uint64_t> dropout_seed_offset(
    const std::optional<at::Tensor>& seed_offset) {
  TORCH_CHECK(seed_offset && seed_offset->numel() == 2 &&
                  seed_offset->scalar_type() == at::kLong && seed_offset->device().is_cpu(),
              "dropout needs seed_offset: a CPU int64 tensor [seed, offset]");
  const at::Tensor so = seed_offset->contiguous();
  return {static_cast<uint64_t>(so.data_ptr<int64_t>()[0]),
          static_cast<uint64_t>(so.data_ptr<int64_t>()[1])};
}

}  // namespace seqkern
