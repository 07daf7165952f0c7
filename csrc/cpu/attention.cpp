// The CPU implementations of seqkern_C::attention_fwd / attention_bwd: argument checks,
// the problem description, output allocation and dtype dispatch. The kernels are in
// attention_fwd.cpp and attention_bwd.cpp.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../attention_args.h"
#include "../below_autograd.h"
#include "../new_outputs.h"
#include "attention_kernels.h"

namespace seqkern::cpu {

// The instruction set the kernels run with: ATen's own choice for this CPU (it honours
// ATEN_CPU_CAPABILITY), read once at run time.
std::string kernel_capability() {
#if defined(__x86_64__)
  static const std::string name = [] {
    const std::string aten = at::get_cpu_capability();
    if (aten.rfind("AVX512", 0) == 0) return std::string("AVX512");
    if (aten == "AVX2") return std::string("AVX2");
    return std::string("DEFAULT");
  }();
  return name;
#else
  return "DEFAULT";
#endif
}

namespace {

template <typename scalar_t>
void run_fwd(const AttentionProblem<scalar_t>& p, scalar_t* out, acc_type_t<scalar_t>* lse) {
  SEQKERN_CPU_DISPATCH(attention_fwd_kernel<scalar_t>, p, out, lse);
}

template <typename scalar_t>
void run_bwd(const AttentionProblem<scalar_t>& p, View4<scalar_t> grad_out, View4<scalar_t> out,
             const acc_type_t<scalar_t>* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  SEQKERN_CPU_DISPATCH(attention_bwd_kernel<scalar_t>, p, grad_out, out, lse, dq, dk, dv);
}

template <typename scalar_t>
void run_weights(const AttentionProblem<scalar_t>& p, const acc_type_t<scalar_t>* lse,
                 bool average_heads, scalar_t* weights) {
  SEQKERN_CPU_DISPATCH(attention_weights_kernel<scalar_t>, p, lse, average_heads, weights);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_mask,
                  const std::optional<at::Tensor>& key_padding_mask) {
  check_attention_inputs(q, k, v, attn_mask, key_padding_mask);
  TORCH_CHECK(q.device().is_cpu(), "seqkern cpu attention: tensors must be on the CPU");
}

template <typename scalar_t>
AttentionProblem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v,
                                        const std::optional<at::Tensor>& attn_mask,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        double dropout_p, bool is_causal, double scale,
                                        const std::optional<at::Tensor>& seed_offset) {
  AttentionProblem<scalar_t> p;
  p.B = q.size(0), p.Hq = q.size(1), p.L = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.S = k.size(2), p.Dv = v.size(3);
  p.q = view4<scalar_t>(q), p.k = view4<scalar_t>(k), p.v = view4<scalar_t>(v);
  if (attn_mask) {
    if (attn_mask->scalar_type() == at::kBool) {
      p.mask_kind = MaskKind::kBool;
      p.bool_mask = view4<bool>(*attn_mask);
    } else {
      p.mask_kind = MaskKind::kFloat;
      p.float_mask = view4<scalar_t>(*attn_mask);
    }
  }
  if (key_padding_mask) {
    p.key_padding = key_padding_mask->data_ptr<bool>();
    p.kp_sb = key_padding_mask->stride(0), p.kp_ss = key_padding_mask->stride(1);
  }
  p.causal = is_causal;
  p.scale = scale;
  p.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    std::tie(p.seed, p.offset) = dropout_seed_offset(seed_offset);
  }
  return p;
}

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, double scale, const std::optional<at::Tensor>& seed_offset) {
  check_inputs(q, k, v, attn_mask, key_padding_mask);
  at::Tensor out = new_heads_inner(q.size(0), q.size(1), q.size(2), v.size(3), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)},
                              q.options().dtype(lse_dtype(q.scalar_type())));
  if (q.numel() == 0 || out.numel() == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    auto p = make_problem<scalar_t>(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal,
                                    scale, seed_offset);
    run_fwd<scalar_t>(p, out.data_ptr<scalar_t>(),
                                   lse.data_ptr<acc_type_t<scalar_t>>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal,
    double scale, const std::optional<at::Tensor>& seed_offset) {
  check_inputs(q, k, v, attn_mask, key_padding_mask);
  check_attention_grads(q, v, grad_out, out, lse, lse_dtype(q.scalar_type()));
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = new_heads_inner(q.size(0), q.size(1), q.size(2), q.size(3), q.options());
  at::Tensor dk = new_heads_inner(k.size(0), k.size(1), k.size(2), k.size(3), k.options());
  at::Tensor dv = new_heads_inner(v.size(0), v.size(1), v.size(2), v.size(3), v.options());
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0)
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    auto p = make_problem<scalar_t>(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal,
                                    scale, seed_offset);
    run_bwd<scalar_t>(p, view4<scalar_t>(grad_out), view4<scalar_t>(out),
                                   lse_c.data_ptr<acc_type_t<scalar_t>>(),
                                   dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                   dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

at::Tensor attention_weights_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& attn_mask,
                                 const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
                                 double scale, double dropout_p,
                                 const std::optional<at::Tensor>& seed_offset, bool average_heads) {
  check_inputs(q, k, k, attn_mask, key_padding_mask);
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()) && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must be the forward's [B, Hq, L] log-sum-exp");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor weights = average_heads
                           ? new_output({q.size(0), q.size(2), k.size(2)}, q.options())
                           : new_output({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options());
  if (weights.numel() == 0) return weights;
  if (q.size(1) == 0) return weights.zero_();  // no heads to average
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_weights", [&] {
    auto p = make_problem<scalar_t>(q, k, k, attn_mask, key_padding_mask, dropout_p, is_causal,
                                    scale, seed_offset);
    run_weights<scalar_t>(p, lse_c.data_ptr<acc_type_t<scalar_t>>(), average_heads,
                          weights.data_ptr<scalar_t>());
  });
  return weights;
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_FRAGMENT(seqkern_C, m) {
  m.def("cpu_capability() -> str", &seqkern::cpu::kernel_capability);
}

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  using namespace seqkern::cpu;
  using seqkern::below_autograd;
  m.impl("attention_fwd", below_autograd<&attention_fwd_cpu>);
  m.impl("attention_bwd", below_autograd<&attention_bwd_cpu>);
  m.impl("attention_weights", below_autograd<&attention_weights_cpu>);
}
