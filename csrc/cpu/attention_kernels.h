// CPU attention kernels (attention_{fwd,bwd}_impl.h), compiled once per CPU capability
// (csrc/cpu/capability/{default,avx2,avx512}.cpp, each with its own instruction set and
// at::vec width) and chosen at run time from at::get_cpu_capability(), never at build time.
// fp16/bf16/fp32 inputs accumulate in fp32, fp64 in fp64.
#pragma once

#include <type_traits>

#include "attention_common.h"
#include "capability.h"

namespace seqkern::cpu {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

#define SEQKERN_DECLARE_ATTENTION_KERNELS(NS)                                                 \
  namespace NS {                                                                              \
  /* out: [B, Hq, L, Dv] laid out as a dense [B, L, Hq, Dv] (the layout of the projections \
     MultiheadAttention splits into heads); lse: [B, Hq, L] contiguous (-inf for rows with  \
     no visible key). Both written in full. */                                                \
  template <typename scalar_t>                                                                \
  void attention_fwd_kernel(const AttentionProblem<scalar_t>& p, scalar_t* out,              \
                            acc_type_t<scalar_t>* lse);                                       \
  /* grad_out, out: [B, Hq, L, Dv] (any strides); lse: [B, Hq, L] contiguous. dq, dk, dv:   \
     shaped like query, key, value, laid out as dense [B, T, H, D]; written in full (zeros  \
     where no gradient flows). */                                                             \
  template <typename scalar_t>                                                                \
  void attention_bwd_kernel(const AttentionProblem<scalar_t>& p, View4<scalar_t> grad_out,   \
                            View4<scalar_t> out, const acc_type_t<scalar_t>* lse,            \
                            scalar_t* dq, scalar_t* dk, scalar_t* dv);                        \
  /* lse: [B, Hq, L] contiguous (the forward's). weights: [B, L, S] (average_heads) or     \
     [B, Hq, L, S], contiguous, written in full (0 on rows with lse = -inf). */              \
  template <typename scalar_t>                                                                \
  void attention_weights_kernel(const AttentionProblem<scalar_t>& p,                         \
                                const acc_type_t<scalar_t>* lse, bool average_heads,          \
                                scalar_t* weights);                                           \
  }

SEQKERN_DECLARE_ATTENTION_KERNELS(DEFAULT)
SEQKERN_DECLARE_ATTENTION_KERNELS(AVX2)
SEQKERN_DECLARE_ATTENTION_KERNELS(AVX512)

}  // namespace seqkern::cpu
