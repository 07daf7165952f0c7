// The recurrence kernels of one layer and direction (rnn_layer.cu's persistent design): the
// forward and the backward over a run of steps (all of them in one cooperative launch, or
// one a launch), and the grid barrier between steps. The blocks that multiply (Block,
// LaneBlock, MmaBlock) are in rnn_layer_blocks.cuh; the plans, launches and the step table
// in rnn_layer.cu, the one includer.
//
// Backward order: phase p first completes dh for the rows of step S-p (the product of the
// gate gradients written in phase p-1 with W_hh), then runs the pointwise backward of step
// S-1-p; one barrier per phase. dh and dc of a unit are only touched by its owner block,
// so only the gate gradients cross blocks.
//
// A block's hidden units and batch rows: KernelArgs' unit_blocks and batch_groups (a block
// takes its passes of a step from pass0, pass_stride rows apart).
#pragma once

#include "rnn.h"
#include "rnn_layer_blocks.cuh"

namespace seqkern::cuda::rnn {
namespace {  // one includer: rnn_layer.cu

constexpr int kBwdRows = 4;    // backward: rows of W_hh^T (hidden units) per thread
// Batch-lane blocks: hidden units per block. Every block stages the whole operand each step
// (h_prev: B x H forward, the gate gradients: B x G*H backward), so the backward's reads
// outweigh its products at 4 units a block (B64 H512: 512 KB a block a step); 8 units halve
// the blocks reading them. Measured on an H100 (bench/RESULTS.md): the backward still 1.42x
// slower than 8-row blocks at B64, so by default only the forward takes them (use_lanes).
constexpr int kLaneUnitsFwd = 4, kLaneUnitsBwd = 8;

// Grid-wide barrier over co-resident blocks (cooperative launch only). counter counts
// arrivals over the whole launch; barrier number n completes at n * gridDim.x. The fences
// make each block's writes visible before it arrives and order its later reads after it
// leaves; the readers then use ld.cg.
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned& target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    target += gridDim.x;
    __threadfence();
    atomicAdd(counter, 1u);
    while (static_cast<int>(*reinterpret_cast<volatile unsigned*>(counter) - target) < 0) {
    }
    __threadfence();
  }
  __syncthreads();
}


template <class Cell, typename T, int BT, bool Mma>
__global__ void __launch_bounds__(kThreads, 1)
    layer_fwd_kernel(const Cell cell, const KernelArgs a, int p_begin, int p_end) {
  constexpr int G = Cell::kGates, W = Cell::kSaved;
  extern __shared__ __align__(16) unsigned char smem[];
  // group u = unit u: its G gate rows
  BlockFor<T, G, (Mma ? kMmaUnits : kLaneUnitsFwd) * G, BT, Mma, kMmaUnits> blk(a, smem);
  const int H = a.H, j = blk.j, bb = blk.bb;
  const bool owner = blk.owner;
  const int64_t GH = int64_t(G) * H;
  float bias[G];
#pragma unroll
  for (int g = 0; g < G; ++g) bias[g] = owner && a.bias_x ? a.bias_x[g * H + j] : 0.f;
  const float bias_hn = owner && a.bias_hn ? a.bias_hn[j] : 0.f;
  unsigned target = 0;
  // this block's passes of a step: from pass0, pass_stride rows apart (KernelArgs)
  const int pass0 = batch_group(a) * BT, pass_stride = a.batch_groups * BT;
  int off = a.steps[2 * p_begin], n = a.steps[2 * p_begin + 1];
  for (int p = p_begin; p < p_end; ++p) {
    const bool has_next = p + 1 < a.S;
    const int off_next = has_next ? a.steps[2 * p + 2] : 0;
    const int n_next = has_next ? a.steps[2 * p + 3] : 0;
    const float* h_src = a.h_state + int64_t(p & 1) * a.B * H;
    float* h_dst = a.h_state + int64_t((p + 1) & 1) * a.B * H;
    // tensor-core blocks: the state's T copy, read (this step) and written (the next)
    const T* op_src = Mma ? static_cast<const T*>(a.op) + int64_t(p & 1) * a.B * a.Kp : nullptr;
    T* op_dst = Mma ? static_cast<T*>(a.op) + int64_t((p + 1) & 1) * a.B * a.Kp : nullptr;
    for (int b0 = pass0; b0 < n; b0 += pass_stride) {
      const int rows = min(BT, n - b0), b = b0 + bb;
      const bool live = owner && bb < rows;
      const int64_t row = int64_t(off) + b;
      // Loads the product does not feed, issued before it so that their latency overlaps
      // it: the input gates, the cell state and (tensor-core blocks, which stage only the T
      // copy of the state) the fp32 h_prev.
      const int64_t bj = int64_t(b) * H + j;
      float x[G];
#pragma unroll
      for (int g = 0; g < G; ++g) x[g] = live ? a.x_gates[row * GH + g * H + j] + bias[g] : 0.f;
      const float c_prev = Cell::kHasCell && live ? a.c_state[bj] : 0.f;
      float h_prev = Mma && live ? __ldcg(h_src + bj) : 0.f;
      if constexpr (Mma) {  // the step's next pass, whose rows are ready too
        const int b1 = b0 + pass_stride;
        blk.expect_next(op_src + int64_t(b1) * a.Kp, b1 < n ? min(BT, n - b1) : 0);
      }
      blk.multiply(a, h_src + int64_t(b0) * H, H, rows,
                   Mma ? op_src + int64_t(b0) * a.Kp : nullptr);
      if (live) {
        float hid[G];
#pragma unroll
        for (int g = 0; g < G; ++g) hid[g] = blk.total(blk.u, g);
        if constexpr (Cell::kSplitHidden) hid[G - 1] += bias_hn;
        if constexpr (!Mma) h_prev = blk.staged_at(a, bb, j);  // from shared memory
        float c = c_prev;
        float s[W];
        const float h = cell.fwd(x, hid, h_prev, c, s);
        h_dst[bj] = h;
        if constexpr (Mma) op_dst[int64_t(b) * a.Kp + j] = op_value<T>(h);
        static_cast<T*>(a.out)[row * H + j] = dev::from_float<T>(h);
        if constexpr (Cell::kHasCell) a.c_state[bj] = c;
        if (b >= n_next) {  // the row's last step: its final state
          static_cast<T*>(a.h_n)[bj] = dev::from_float<T>(h);
          if constexpr (Cell::kHasCell) static_cast<T*>(a.c_n)[bj] = dev::from_float<T>(c);
        }
        if (a.ws) {
#pragma unroll
          for (int w = 0; w < W; ++w) a.ws[row * W * H + w * H + j] = s[w];
          float* tail = a.ws + a.N * W * H;  // h_prev, then c_prev and c' (LSTM)
          tail[row * H + j] = h_prev;
          if constexpr (Cell::kHasCell) {
            tail[(a.N + row) * H + j] = c_prev;
            tail[(2 * a.N + row) * H + j] = c;
          }
        }
      }
      __syncthreads();
    }
    off = off_next, n = n_next;
    if (p + 1 < p_end) grid_barrier(a.barrier, target);
  }
}

// MU: tensor-core blocks' units (kMmaUnits, or kMmaUnitsWide in 16-row passes).
template <class Cell, typename T, int BT, bool Mma, int MU = kMmaUnits>
__global__ void __launch_bounds__(kThreads, 1)
    layer_bwd_kernel(const Cell cell, const KernelArgs a, int p_begin, int p_end) {
  constexpr int G = Cell::kGates, W = Cell::kSaved;
  extern __shared__ __align__(16) unsigned char smem[];
  // Block: group q holds the W_hh^T rows of units 4q .. 4q+3 (LaneBlock, MmaBlock: all the
  // block's, unit u at row u)
  BlockFor<T, kBwdRows, Mma ? MU : kLaneUnitsBwd, BT, Mma, MU> blk(a, smem);
  const int H = a.H, S = a.S, j = blk.j, bb = blk.bb;
  const bool owner = blk.owner;
  const int64_t GH = int64_t(G) * H, N = a.N;
  const float* d_hidden = Cell::kSplitHidden ? a.d_gh : a.d_gx;  // what W_hh^T multiplies
  const float* h_prev_ws = a.ws + N * W * H;
  const float* c_prev_ws = h_prev_ws + N * H;
  const float* c_new_ws = c_prev_ws + N * H;
  unsigned target = 0;
  const int pass0 = batch_group(a) * BT, pass_stride = a.batch_groups * BT;  // as forward
  // (off_a, n_a): step S-p, whose gate gradients phase p multiplies; (off_b, n_b): step
  // S-1-p, whose pointwise backward phase p runs. n = 0 where the step does not exist.
  const int sa = S - p_begin, sb = S - 1 - p_begin;
  int off_a = sa < S ? a.steps[2 * sa] : 0, n_a = sa < S ? a.steps[2 * sa + 1] : 0;
  int off_b = sb >= 0 ? a.steps[2 * sb] : 0, n_b = sb >= 0 ? a.steps[2 * sb + 1] : 0;
  for (int p = p_begin; p < p_end; ++p) {
    const int s_next = S - 2 - p;
    const int off_next = s_next >= 0 ? a.steps[2 * s_next] : 0;
    const int n_next = s_next >= 0 ? a.steps[2 * s_next + 1] : 0;
    // tensor-core blocks: the T copy of what W_hh^T multiplies, of step S-p (written by the
    // phase before) and of step S-1-p (written now)
    const T* op_a = Mma ? static_cast<const T*>(a.op) + int64_t((p + 1) & 1) * a.B * a.Kp : nullptr;
    T* op_b = Mma ? static_cast<T*>(a.op) + int64_t(p & 1) * a.B * a.Kp : nullptr;
    for (int b0 = pass0; b0 < max(n_a, n_b); b0 += pass_stride) {
      const int b = b0 + bb, rows_a = min(BT, n_a - b0);
      const bool in_a = owner && b < n_a, in_b = owner && b < n_b;
      const int64_t row = int64_t(off_b) + b;
      float s[W], c_new = 0.f, c_prev = 0.f, h_prev = 0.f, g_out = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) s[w] = in_b ? a.ws[row * W * H + w * H + j] : 0.f;
      if (in_b) {
        if constexpr (Cell::kHasCell) c_prev = c_prev_ws[row * H + j], c_new = c_new_ws[row * H + j];
        if constexpr (Cell::kSplitHidden) h_prev = h_prev_ws[row * H + j];
        if (a.grad_out) g_out = dev::to_float(static_cast<const T*>(a.grad_out)[row * H + j]);
      }
      // d_h and d_c: written by this thread in the phase before; read before the product
      // so that their latency overlaps it.
      const int64_t bj = int64_t(b) * H + j;
      float dh = in_a || in_b ? a.d_h[bj] : 0.f;  // in_a: the bypass part left by phase p-1
      float dc = Cell::kHasCell && in_b ? a.d_c[bj] : 0.f;
      if constexpr (Mma) {  // the phase's next pass (its multiply: step S-p, as this one's)
        const int b1 = b0 + pass_stride;
        blk.expect_next(op_a + int64_t(b1) * a.Kp, max(min(BT, n_a - b1), 0));
      }
      blk.multiply(a, d_hidden + (int64_t(off_a) + b0) * GH, GH, max(rows_a, 0),
                   Mma ? op_a + int64_t(b0) * a.Kp : nullptr);
      if (in_a || in_b) {
        if (in_a) dh += blk.total(blk.u / kBwdRows, blk.u % kBwdRows);
        if (in_b) {
          float dx[G], dhid[G];
          dh = cell.bwd(s, c_new, c_prev, h_prev, dh + g_out, dc, dx, dhid);
#pragma unroll
          for (int g = 0; g < G; ++g) a.d_gx[row * GH + g * H + j] = dx[g];
          if constexpr (Cell::kSplitHidden) {
#pragma unroll
            for (int g = 0; g < G; ++g) a.d_gh[row * GH + g * H + j] = dhid[g];
          }
          if constexpr (Mma) {
#pragma unroll
            for (int g = 0; g < G; ++g)
              op_b[int64_t(b) * a.Kp + g * H + j] =
                  op_value<T>(Cell::kSplitHidden ? dhid[g] : dx[g]);
          }
          if constexpr (Cell::kHasCell) a.d_c[bj] = dc;
        }
        a.d_h[bj] = dh;
      }
      __syncthreads();
    }
    off_a = off_b, n_a = n_b, off_b = off_next, n_b = n_next;
    if (p + 1 < p_end) grid_barrier(a.barrier, target);
  }
}

}  // namespace
}  // namespace seqkern::cuda::rnn
