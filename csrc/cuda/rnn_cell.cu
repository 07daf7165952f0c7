// One recurrent cell step on CUDA: the fused pointwise halves of rnn_cell_fwd and
// rnn_cell_gate_grads (rnn.h). The two products of the step (x W_ih^T, h W_hh^T) are cuBLAS
// GEMMs made by the binding, as torch's own fused CUDA cells do: for a single step the
// products have no recurrence to fuse across, and cuBLAS is the fastest GEMM for every
// shape. This file fuses everything after them (biases, activations, the new state, the
// saved activations) into one pass, and the gate gradients into another, one thread per
// (batch row, hidden unit) with all G gates of that unit.
#include "rnn.h"

namespace seqkern::cuda::rnn {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < (1 << 20) ? blocks : (1 << 20));  // grid-stride beyond
}

template <class Cell, typename T>
__global__ void __launch_bounds__(kThreads)
    cell_fwd_kernel(const Cell cell, int64_t B, int64_t H, const float* __restrict__ gates_x,
                    const float* __restrict__ gates_h, Strided2 b_ih, Strided2 b_hh,
                    Strided2 hx, Strided2 cx, T* __restrict__ h_out, T* __restrict__ c_out,
                    float* __restrict__ saved) {
  constexpr int G = Cell::kGates, W = Cell::kSaved;
  const int64_t total = B * H, GH = G * H;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t b = idx / H, j = idx - b * H;
    float x[G], h[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t col = g * H + j;
      x[g] = gates_x[b * GH + col] + (b_ih.data ? dev::load<T>(b_ih, col, 0) : 0.f);
      h[g] = gates_h[b * GH + col] + (b_hh.data ? dev::load<T>(b_hh, col, 0) : 0.f);
    }
    const float h_prev = Cell::kSplitHidden ? dev::load<T>(hx, b, j) : 0.f;
    float c = Cell::kHasCell ? dev::load<T>(cx, b, j) : 0.f;
    float s[W];
    const float h_new = cell.fwd(x, h, h_prev, c, s);
    h_out[idx] = dev::from_float<T>(h_new);
#pragma unroll
    for (int w = 0; w < W; ++w) saved[b * W * H + w * H + j] = s[w];
    if constexpr (Cell::kHasCell) {
      c_out[idx] = dev::from_float<T>(c);
      saved[B * W * H + idx] = c;
    }
  }
}

template <class Cell, typename T>
__global__ void __launch_bounds__(kThreads)
    cell_gate_grads_kernel(const Cell cell, int64_t B, int64_t H, Strided2 grad_h,
                           Strided2 grad_c, Strided2 hx, Strided2 cx,
                           const float* __restrict__ saved, T* __restrict__ d_ih,
                           T* __restrict__ d_hh, T* __restrict__ d_hx, T* __restrict__ d_cx) {
  constexpr int G = Cell::kGates, W = Cell::kSaved;
  const int64_t total = B * H, GH = G * H;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t b = idx / H, j = idx - b * H;
    float s[W];
#pragma unroll
    for (int w = 0; w < W; ++w) s[w] = saved[b * W * H + w * H + j];
    const float dh = dev::load<T>(grad_h, b, j);
    float dc = Cell::kHasCell && grad_c.data ? dev::load<T>(grad_c, b, j) : 0.f;
    const float c_new = Cell::kHasCell ? saved[B * W * H + idx] : 0.f;
    const float c_prev = Cell::kHasCell ? dev::load<T>(cx, b, j) : 0.f;
    const float h_prev = Cell::kSplitHidden ? dev::load<T>(hx, b, j) : 0.f;
    float dx[G], dhid[G];
    const float direct = cell.bwd(s, c_new, c_prev, h_prev, dh, dc, dx, dhid);
#pragma unroll
    for (int g = 0; g < G; ++g) d_ih[b * GH + g * H + j] = dev::from_float<T>(dx[g]);
    if constexpr (Cell::kSplitHidden) {
#pragma unroll
      for (int g = 0; g < G; ++g) d_hh[b * GH + g * H + j] = dev::from_float<T>(dhid[g]);
      d_hx[idx] = dev::from_float<T>(direct);
    }
    if constexpr (Cell::kHasCell) d_cx[idx] = dev::from_float<T>(dc);
  }
}

}  // namespace

cudaError_t rnn_cell_fwd(CellKind cell, DType dtype, int64_t B, int64_t H, const float* gates_x,
                         const float* gates_h, Strided2 b_ih, Strided2 b_hh, Strided2 hx,
                         Strided2 cx, void* h_out, void* c_out, float* saved,
                         cudaStream_t stream) {
  if (B <= 0 || H <= 0) return cudaSuccess;
  return dev::with_cell_and_type(cell, dtype, [&](auto c, auto t) {
    using T = decltype(t);
    cell_fwd_kernel<<<grid_for(B * H), kThreads, 0, stream>>>(
        c, B, H, gates_x, gates_h, b_ih, b_hh, hx, cx, static_cast<T*>(h_out),
        static_cast<T*>(c_out), saved);
    return cudaGetLastError();
  });
}

cudaError_t rnn_cell_gate_grads(CellKind cell, DType dtype, int64_t B, int64_t H, Strided2 grad_h,
                                Strided2 grad_c, Strided2 hx, Strided2 cx, const float* saved,
                                void* d_ih, void* d_hh, void* d_hx, void* d_cx,
                                cudaStream_t stream) {
  if (B <= 0 || H <= 0) return cudaSuccess;
  return dev::with_cell_and_type(cell, dtype, [&](auto c, auto t) {
    using T = decltype(t);
    cell_gate_grads_kernel<<<grid_for(B * H), kThreads, 0, stream>>>(
        c, B, H, grad_h, grad_c, hx, cx, saved, static_cast<T*>(d_ih), static_cast<T*>(d_hh),
        static_cast<T*>(d_hx), static_cast<T*>(d_cx));
    return cudaGetLastError();
  });
}

}  // namespace seqkern::cuda::rnn
