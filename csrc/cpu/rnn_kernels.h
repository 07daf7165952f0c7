// Pointwise step kernels of the recurrent layers (rnn_pointwise_impl.h), compiled once per
// CPU capability like the attention kernels and chosen at run time.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "capability.h"

namespace seqkern::cpu {

enum class RnnMode { kLSTM, kGRU, kRNN_TANH, kRNN_RELU };

inline int64_t gate_count(RnnMode mode) {
  return mode == RnnMode::kLSTM ? 4 : mode == RnnMode::kGRU ? 3 : 1;
}


// The ops' mode strings (seqkern/ops/rnn_layer.py, rnn_cells.py).
inline RnnMode parse_rnn_mode(const std::string& mode, const char* op) {
  if (mode == "LSTM") return RnnMode::kLSTM;
  if (mode == "GRU") return RnnMode::kGRU;
  if (mode == "RNN_TANH") return RnnMode::kRNN_TANH;
  if (mode == "RNN_RELU") return RnnMode::kRNN_RELU;
  TORCH_CHECK(false, op, ": mode must be LSTM, GRU, RNN_TANH or RNN_RELU, got ", mode);
}

#define SEQKERN_DECLARE_RNN_KERNELS(NS)                                                      \
  namespace NS {                                                                             \
  template <typename T>                                                                      \
  void rnn_step_fwd(RnnMode mode, int64_t n, int64_t H, const T* x_gates, const T* x_bias, \
                    const T* h_gates, const T* h_prev, T* h, T* c, T* saved, int64_t u0,     \
                    int64_t u1);                                                             \
  template <typename T>                                                                      \
  void rnn_step_bwd(RnnMode mode, int64_t n, int64_t H, const T* saved, const T* c_new,     \
                    const T* c_prev, const T* h_prev, T* dh, T* dc, T* dx_gates,             \
                    T* dh_gates, int64_t u0, int64_t u1);                                    \
  }

SEQKERN_DECLARE_RNN_KERNELS(DEFAULT)
SEQKERN_DECLARE_RNN_KERNELS(AVX2)
SEQKERN_DECLARE_RNN_KERNELS(AVX512)

// The pointwise step kernels for the CPU's capability, over hidden units [u0, u1) (all of
// them by default). run_rnn_step_bwd is shared by the layer (rnn_layer.cpp) and the cell
// (rnn_cell.cpp), which both leave the products to GEMMs.
template <typename T>
void run_rnn_step_fwd(RnnMode mode, int64_t n, int64_t H, const T* xg, const T* x_bias,
                      const T* hg, const T* h_prev, T* h, T* c, T* saved, int64_t u0 = 0,
                      int64_t u1 = -1) {
  SEQKERN_CPU_DISPATCH(rnn_step_fwd<T>, mode, n, H, xg, x_bias, hg, h_prev, h, c, saved, u0,
                       u1 < 0 ? H : u1);
}
template <typename T>
void run_rnn_step_bwd(RnnMode mode, int64_t n, int64_t H, const T* saved, const T* c_new,
                      const T* c_prev, const T* h_prev, T* dh, T* dc, T* dxg, T* dhg,
                      int64_t u0 = 0, int64_t u1 = -1) {
  SEQKERN_CPU_DISPATCH(rnn_step_bwd<T>, mode, n, H, saved, c_new, c_prev, h_prev, dh, dc, dxg,
                       dhg, u0, u1 < 0 ? H : u1);
}

}  // namespace seqkern::cpu
