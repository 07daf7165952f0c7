// Included last by each capability translation unit: instantiates the attention, RNN layer
// and recurrent-cell kernels for every dtype inside that unit's CPU_CAPABILITY namespace.
#include "../attention_bwd_impl.h"
#include "../attention_fwd_impl.h"
#include "../attention_weights_impl.h"
#include "../rnn_cell_impl.h"
#include "../round_bf16_impl.h"
#include "../rows_dot_impl.h"
#include "../transpose_impl.h"

namespace seqkern::cpu::CPU_CAPABILITY {
#define SEQKERN_INSTANTIATE(T)                                                              \
  template void attention_fwd_kernel<T>(const AttentionProblem<T>&, T*, acc_type_t<T>*);    \
  template void attention_bwd_kernel<T>(const AttentionProblem<T>&, View4<T>, View4<T>,     \
                                        const acc_type_t<T>*, T*, T*, T*);                  \
  template void attention_weights_kernel<T>(const AttentionProblem<T>&, const acc_type_t<T>*, \
                                            bool, T*);                                      \
  template void rnn_cell_fwd_kernel<T>(const CellProblem<T>&, T*, T*, cell_acc_t<T>*);
SEQKERN_INSTANTIATE(float)
SEQKERN_INSTANTIATE(double)
SEQKERN_INSTANTIATE(at::Half)
SEQKERN_INSTANTIATE(at::BFloat16)
#undef SEQKERN_INSTANTIATE
}  // namespace seqkern::cpu::CPU_CAPABILITY

#include "../rnn_pointwise_impl.h"

namespace seqkern::cpu::CPU_CAPABILITY {
#define SEQKERN_INSTANTIATE_RNN(T)                                                          \
  template void rnn_step_fwd<T>(RnnMode, int64_t, int64_t, const T*, const T*, const T*,    \
                                const T*, T*, T*, T*, int64_t, int64_t);                    \
  template void rnn_step_bwd<T>(RnnMode, int64_t, int64_t, const T*, const T*, const T*,    \
                                const T*, T*, T*, T*, T*, int64_t, int64_t);
SEQKERN_INSTANTIATE_RNN(float)
SEQKERN_INSTANTIATE_RNN(double)
#undef SEQKERN_INSTANTIATE_RNN
}  // namespace seqkern::cpu::CPU_CAPABILITY
