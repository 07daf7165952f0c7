// Included last by each capability translation unit: instantiates the attention kernels
// for every dtype inside that unit's CPU_CAPABILITY namespace.
#include "../attention_bwd_impl.h"
#include "../attention_fwd_impl.h"

namespace seqkern::cpu::CPU_CAPABILITY {
#define SEQKERN_INSTANTIATE(T)                                                              \
  template void attention_fwd_kernel<T>(const AttentionProblem<T>&, T*, acc_type_t<T>*);    \
  template void attention_bwd_kernel<T>(const AttentionProblem<T>&, View4<T>, View4<T>,     \
                                        const acc_type_t<T>*, T*, T*, T*);
SEQKERN_INSTANTIATE(float)
SEQKERN_INSTANTIATE(double)
SEQKERN_INSTANTIATE(at::Half)
SEQKERN_INSTANTIATE(at::BFloat16)
#undef SEQKERN_INSTANTIATE
}  // namespace seqkern::cpu::CPU_CAPABILITY
