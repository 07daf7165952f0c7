// CPU recurrent-cell kernels (rnn_cell_impl.h), compiled once per CPU capability like the
// attention kernels (csrc/cpu/capability/) and chosen at run time. LSTM, GRU and the two
// vanilla RNN cells share one kernel and differ by the RnnMode: the gate count, whether the
// last gate keeps its hidden product apart (GRU's n gate), and the pointwise epilogue.
// fp16/bf16/fp32 accumulate in fp32, fp64 in fp64. The backward's pointwise part is the
// whole-sequence layer's rnn_step_bwd (rnn_kernels.h).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "rnn_kernels.h"

namespace seqkern::cpu {

// What the forward leaves for the backward, in the accumulator dtype, as one flat buffer:
// the layer's step layouts (rnn_pointwise_impl.h) so that the backward is the layer's own
// rnn_step_bwd. LSTM: gates [B, 4H] (i, f, g, o activated) then c' [B, H]; GRU: [B, 4H]
// (r, z, n activated, then h W_hn^T + b_hn); RNN: h' [B, H].
inline int64_t cell_saved_numel(RnnMode m, int64_t B, int64_t H) {
  return B * H * (m == RnnMode::kLSTM ? 5 : m == RnnMode::kGRU ? 4 : 1);
}

template <typename scalar_t>
using cell_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A 2-D tensor as (base pointer, row stride, column stride) in elements.
template <typename T>
struct View2 {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0;
  const T* row(int64_t r) const { return data + r * s0; }
};

// Everything one cell step reads.
template <typename scalar_t>
struct CellProblem {
  RnnMode mode;
  int64_t B, I, H;
  View2<scalar_t> x;     // [B, I]
  View2<scalar_t> hx;    // [B, H]
  View2<scalar_t> cx;    // [B, H], LSTM only
  View2<scalar_t> w_ih;  // [gates * H, I]
  View2<scalar_t> w_hh;  // [gates * H, H]
  const scalar_t* b_ih = nullptr;  // [gates * H] with stride sb_ih, or nullptr (no bias)
  const scalar_t* b_hh = nullptr;  // [gates * H] with stride sb_hh, or nullptr
  int64_t sb_ih = 1, sb_hh = 1;
};

#define SEQKERN_DECLARE_RNN_CELL_KERNELS(NS)                                                  \
  namespace NS {                                                                              \
  /* h_out: [B, H] contiguous. c_out: [B, H] contiguous (LSTM; else unused). saved:          \
     cell_saved_numel(mode, B, H) elements, accumulator dtype, layout above. All written in  \
     full; none may alias an input. */                                                        \
  template <typename scalar_t>                                                                \
  void rnn_cell_fwd_kernel(const CellProblem<scalar_t>& p, scalar_t* h_out, scalar_t* c_out, \
                           cell_acc_t<scalar_t>* saved);                                      \
  }

SEQKERN_DECLARE_RNN_CELL_KERNELS(DEFAULT)
SEQKERN_DECLARE_RNN_CELL_KERNELS(AVX2)
SEQKERN_DECLARE_RNN_CELL_KERNELS(AVX512)

}  // namespace seqkern::cpu
