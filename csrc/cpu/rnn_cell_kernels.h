// CPU recurrent-cell kernels (rnn_cell_impl.h), compiled once per CPU capability like the
// attention kernels (csrc/cpu/capability/) and chosen at run time. LSTM, GRU and the two
// vanilla RNN cells share one kernel and differ by a CellMode: the gate count, whether the
// last gate keeps its hidden product apart (GRU's n gate), and the pointwise epilogue.
// fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

namespace seqkern::cpu {

enum class CellMode : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };

// Gates per hidden unit: rows of w_ih / w_hh are [gates * H].
inline int64_t cell_gates(CellMode m) {
  return m == CellMode::kLSTM ? 4 : m == CellMode::kGRU ? 3 : 1;
}

// Columns (in units of H) of the `saved` tensor the forward writes for the backward:
// LSTM i, f, g, o (activated) and tanh(c'); GRU r, z, n and W_hn h + b_hn; RNN nothing
// (its backward needs only h').
inline int64_t cell_saved(CellMode m) {
  return m == CellMode::kLSTM ? 5 : m == CellMode::kGRU ? 4 : 0;
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
  CellMode mode;
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
     [B, cell_saved(mode) * H] contiguous, accumulator dtype (unused for RNN). All written    \
     in full; none may alias an input. */                                                     \
  template <typename scalar_t>                                                                \
  void rnn_cell_fwd_kernel(const CellProblem<scalar_t>& p, scalar_t* h_out, scalar_t* c_out, \
                           cell_acc_t<scalar_t>* saved);                                      \
  /* Gradients of the gate pre-activations from the output gradients, all [B, *]           \
     contiguous. grad_h: [B, H]; grad_c: [B, H] or nullptr (LSTM); hx, cx: [B, H] (GRU reads  \
     hx, LSTM cx); h: the forward's h' [B, H] (RNN); saved: the forward's. Writes            \
     d_gates_ih [B, gates * H]; GRU also d_gates_hh [B, 3H] (which differs from d_gates_ih    \
     in the n gate) and d_hx_direct [B, H] (z * grad_h); LSTM d_cx [B, H]. */                  \
  template <typename scalar_t>                                                                \
  void rnn_cell_gate_grads_kernel(CellMode mode, int64_t B, int64_t H, const scalar_t* grad_h, \
                                  const scalar_t* grad_c, const scalar_t* hx,                 \
                                  const scalar_t* cx, const scalar_t* h,                      \
                                  const cell_acc_t<scalar_t>* saved, scalar_t* d_gates_ih,    \
                                  scalar_t* d_gates_hh, scalar_t* d_hx_direct,               \
                                  scalar_t* d_cx);                                            \
  }

SEQKERN_DECLARE_RNN_CELL_KERNELS(DEFAULT)
SEQKERN_DECLARE_RNN_CELL_KERNELS(AVX2)
SEQKERN_DECLARE_RNN_CELL_KERNELS(AVX512)

}  // namespace seqkern::cpu
