// The CPU layer's time loop for small batches, with the hidden units split over a team of
// threads instead of the batch rows (rnn_layer.cpp splits rows, no synchronisation between
// steps, once every thread has at least four rows).
//
// With B = 4 or 16 a row split gives each thread 2 to 8 rows and makes it stream all of W_hh
// (4 MB fp32 at H = 512, over L2) every step for little work; a per-step parallel product and
// a parallel pointwise cost two fork/joins a step. Here thread k of the team owns the hidden
// units [u0, u1) (whole 64-column panels of every gate): each step it computes its own gate
// columns for all rows (its 1/k of W_hh), runs the cell on its own units, and the team meets
// once per step at a barrier (the next step's product reads every unit of h). Forward: the new
// h goes to the other of two buffers, as other threads may still be reading the previous one.
// Backward: the pointwise gradient of the own units, a barrier, then the own columns of
// dh_prev = dG W_hh, which only the owner reads next. The price is the one the row split
// avoids: a thread that loses its core to another process stalls the team at the next
// barrier. Measured side by side on the 2-core machines (LSTM, H = 512): 2-5% faster than the
// row split at B = 4 and 16, within 2% either way at B = 32 and 64.
#pragma once

#include <cstdint>
#include <vector>

#include "matmul.h"
#include "rnn_layer_plan.h"

namespace seqkern::cpu {

// Whether this layer runs the team loop (on at::get_num_threads() threads). Not where the
// row split runs instead: not float32, a projection, H not a multiple of the panel width or
// fewer panels than threads, one thread, already inside a parallel region, or a batch of at
// least 16 rows per thread.
bool use_team(bool float32, bool proj, int64_t batch, int64_t H);

struct TeamForward {
  RnnMode mode;
  int64_t H;
  const std::vector<Step>* steps;
  StepChunk chunk;
  const float* x_gates;  // the chunk's input projection [chunk.rows, G*H], without x_bias
  const float* x_bias;   // [G*H] or nullptr
  const float* bias_h;   // [G*H] (GRU's b_hh) or nullptr
  const PackedRight* whh_t;  // W_hh^T [H, G*H]
  float* h[2];  // the state [B, H]: step i reads h[i % 2], writes h[(i + 1) % 2]
  float* c;     // [B, H] (LSTM), updated in place
  float* h_gates;  // scratch [B, G*H]
  float* ws_base;        // the workspace (training) or nullptr
  Workspace ws;
  float* out;  // [N, H] (fp32 products; nullptr with bf16 products)
  // bf16 products (pack_right_bf16's whh_t): the state rounded to bf16, step i reading
  // h_bf16[i % 2]; nullptr for fp32 products.
  at::BFloat16* h_bf16[2];
  at::BFloat16* out_bf16;  // [N, H] with bf16 products: the rounded state, copied
};
void team_forward_chunk(const TeamForward& a);

struct TeamBackward {
  RnnMode mode;
  int64_t H;
  const std::vector<Step>* steps;
  StepChunk chunk;
  const float* ws_base;
  Workspace ws;
  const float* d_out;  // gradient of the output, [N, H] through its strides, or nullptr
  int64_t d_out_row_stride, d_out_col_stride;
  float* dh;  // [B, H]: in, the gradient of the state after the chunk; out, before it
  float* dc;  // [B, H] (LSTM), likewise
  float* dx_gates;  // the chunk's gate gradients [chunk.rows, G*H]
  float* dh_gates;  // GRU: the chunk's gradients of h W_hh^T + b_hh; otherwise dx_gates
  const PackedRight* whh;  // W_hh [G*H, H] (pack_rows_bf16's with bf16 products)
  // bf16 products: dh_gates rounded, the chain product's left operand, [chunk.rows, G*H];
  // nullptr for fp32 products.
  at::BFloat16* dh_gates_bf16;
};
void team_backward_chunk(const TeamBackward& a);

}  // namespace seqkern::cpu
