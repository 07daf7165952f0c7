// CPU attention kernels (csrc/cpu/attention_{fwd,bwd}.cpp), instantiated for fp32, fp64,
// fp16 and bf16 inputs; fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.
#pragma once

#include <type_traits>

#include "attention_common.h"

namespace seqkern::cpu {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// out: [B, Hq, L, Dv] contiguous, written in full. lse: [B, Hq, L] contiguous, written in
// full (-inf for rows with no visible key).
template <typename scalar_t>
void attention_fwd_kernel(const AttentionProblem<scalar_t>& p, scalar_t* out,
                          acc_type_t<scalar_t>* lse);

// grad_out: [B, Hq, L, Dv] strides go_s*; out: [B, Hq, L, Dv] strides out_s*; lse: [B, Hq, L]
// contiguous. dq [B, Hq, L, D], dk [B, Hkv, S, D], dv [B, Hkv, S, Dv]: contiguous outputs,
// written in full (zeros where no gradient flows).
template <typename scalar_t>
void attention_bwd_kernel(const AttentionProblem<scalar_t>& p, View4<scalar_t> grad_out,
                          View4<scalar_t> out, const acc_type_t<scalar_t>* lse, scalar_t* dq,
                          scalar_t* dk, scalar_t* dv);

}  // namespace seqkern::cpu
