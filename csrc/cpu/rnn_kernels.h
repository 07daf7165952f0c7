// Pointwise step kernels of the recurrent layers (rnn_pointwise_impl.h), compiled once per
// CPU capability like the attention kernels and chosen at run time.
#pragma once

#include <cstdint>
#include <string>

namespace seqkern::cpu {

enum class RnnMode { kLSTM, kGRU, kRNN_TANH, kRNN_RELU };

inline int64_t gate_count(RnnMode mode) {
  return mode == RnnMode::kLSTM ? 4 : mode == RnnMode::kGRU ? 3 : 1;
}

// The instruction set the CPU kernels run with (csrc/cpu/attention.cpp).
std::string kernel_capability();

#define SEQKERN_DECLARE_RNN_KERNELS(NS)                                                      \
  namespace NS {                                                                             \
  template <typename T>                                                                      \
  void rnn_step_fwd(RnnMode mode, int64_t n, int64_t H, const T* x_gates, const T* h_gates, \
                    T* h, T* c, T* saved);                                                   \
  template <typename T>                                                                      \
  void rnn_step_bwd(RnnMode mode, int64_t n, int64_t H, const T* saved, const T* c_new,     \
                    const T* c_prev, const T* h_prev, T* dh, T* dc, T* dx_gates,             \
                    T* dh_gates);                                                            \
  }

SEQKERN_DECLARE_RNN_KERNELS(DEFAULT)
SEQKERN_DECLARE_RNN_KERNELS(AVX2)
SEQKERN_DECLARE_RNN_KERNELS(AVX512)

}  // namespace seqkern::cpu
