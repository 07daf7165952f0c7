// The CUDA implementations of seqkern_C::attention_fwd / attention_bwd: the same argument
// checks, output layouts and empty-input handling as the CPU binding (csrc/cpu/attention.cpp),
// then the framework-free kernels of attention.h on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "../attention_args.h"
#include "../below_autograd.h"
#include "../new_outputs.h"
#include "attention.h"

namespace seqkern::cuda {
namespace {

// The kernels read rows with unit stride along the head dim.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_mask,
                  const std::optional<at::Tensor>& key_padding_mask) {
  check_attention_inputs(q, k, v, attn_mask, key_padding_mask);
  TORCH_CHECK(q.is_cuda(), "seqkern cuda attention: query, key, value must be CUDA tensors");
}

Strided4 strided4(const at::Tensor& t) {
  Strided4 s;
  s.data = t.data_ptr();
  for (int d = 0; d < 4; ++d) s.stride[d] = t.stride(d);
  return s;
}

// q, k, v must have unit last stride (unit_last_stride) and outlive the returned params.
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& attn_mask,
                            const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                            bool is_causal, double scale,
                            const std::optional<at::Tensor>& seed_offset) {
  AttentionParams p;
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "seqkern cuda attention: query, key, value must be float16 or bfloat16, got ",
              q.scalar_type());
  p.dtype = q.scalar_type() == at::kHalf ? DType::kHalf : DType::kBFloat16;
  p.B = q.size(0), p.Hq = q.size(1), p.L = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.S = k.size(2), p.Dv = v.size(3);
  p.q = strided4(q), p.k = strided4(k), p.v = strided4(v);
  if (attn_mask) {
    p.mask_kind = attn_mask->scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kFloat;
    p.mask = strided4(*attn_mask);  // any strides: the kernels index all four
  }
  if (key_padding_mask) {
    p.key_padding = key_padding_mask->data_ptr<bool>();
    p.kp_stride_b = key_padding_mask->stride(0), p.kp_stride_s = key_padding_mask->stride(1);
  }
  p.causal = is_causal;
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p > 0.0) {
    std::tie(p.seed, p.offset) = dropout_seed_offset(seed_offset);
  }
  return p;
}

void check_supported(bool supported, const char* what, const AttentionParams& p) {
  TORCH_CHECK(supported, "seqkern cuda ", what, " does not support this problem: it takes float16 "
              "or bfloat16, head dims 1..256, on a GPU of compute capability 8.0 or newer with "
              "enough shared memory for the head dim (got D=", p.D, ", Dv=", p.Dv, ")");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "seqkern cuda ", what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, double scale, const std::optional<at::Tensor>& seed_offset) {
  check_inputs(query, key, value, attn_mask, key_padding_mask);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = new_heads_inner(query.size(0), query.size(1), query.size(2), value.size(3),
                                   query.options());
  at::Tensor lse = new_output({query.size(0), query.size(1), query.size(2)},
                              query.options().dtype(at::kFloat));
  if (query.numel() == 0 || out.numel() == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  const at::Tensor q = unit_last_stride(query), k = unit_last_stride(key),
                   v = unit_last_stride(value);
  const AttentionParams p = make_params(q, k, v, attn_mask, key_padding_mask, dropout_p,
                                        is_causal, scale, seed_offset);
  check_supported(attention_fwd_supported(p), "attention_fwd", p);
  const int64_t out_stride[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  check_cuda(attention_fwd(p, out.data_ptr(), out_stride, lse.data_ptr<float>(),
                           c10::cuda::getCurrentCUDAStream().stream()),
             "attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, double scale, const std::optional<at::Tensor>& seed_offset) {
  check_inputs(query, key, value, attn_mask, key_padding_mask);
  check_attention_grads(query, value, grad_out, out, lse, at::kFloat);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor dq = new_heads_inner(query.size(0), query.size(1), query.size(2), query.size(3),
                                  query.options());
  at::Tensor dk = new_heads_inner(key.size(0), key.size(1), key.size(2), key.size(3),
                                  key.options());
  at::Tensor dv = new_heads_inner(value.size(0), value.size(1), value.size(2), value.size(3),
                                  value.options());
  if (query.numel() == 0 || key.numel() == 0 || value.numel() == 0)
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  const at::Tensor q = unit_last_stride(query), k = unit_last_stride(key),
                   v = unit_last_stride(value), go = unit_last_stride(grad_out),
                   o = unit_last_stride(out), lse_c = lse.contiguous();
  const AttentionParams p = make_params(q, k, v, attn_mask, key_padding_mask, dropout_p,
                                        is_causal, scale, seed_offset);
  check_supported(attention_bwd_supported(p), "attention_bwd", p);
  at::Tensor workspace = at::empty({static_cast<int64_t>(attention_bwd_workspace_bytes(p))},
                                   query.options().dtype(at::kByte));
  const int64_t go_stride[4] = {go.stride(0), go.stride(1), go.stride(2), go.stride(3)};
  const int64_t o_stride[4] = {o.stride(0), o.stride(1), o.stride(2), o.stride(3)};
  const int64_t dq_stride[4] = {dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3)};
  const int64_t dk_stride[4] = {dk.stride(0), dk.stride(1), dk.stride(2), dk.stride(3)};
  const int64_t dv_stride[4] = {dv.stride(0), dv.stride(1), dv.stride(2), dv.stride(3)};
  check_cuda(attention_bwd(p, go.data_ptr(), go_stride, o.data_ptr(), o_stride,
                           lse_c.data_ptr<float>(), dq.data_ptr(), dq_stride, dk.data_ptr(),
                           dk_stride, dv.data_ptr(), dv_stride, workspace.data_ptr(),
                           c10::cuda::getCurrentCUDAStream().stream()),
             "attention_bwd");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace seqkern::cuda

TORCH_LIBRARY_IMPL(seqkern_C, CUDA, m) {
  using namespace seqkern::cuda;
  using seqkern::below_autograd;
  m.impl("attention_fwd", below_autograd<&attention_fwd_cuda>);
  m.impl("attention_bwd", below_autograd<&attention_bwd_cuda>);
}
