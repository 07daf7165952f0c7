// Framework-free CUDA recurrent kernels: LSTM, GRU and the vanilla RNN cells, one fused cell
// step (rnn_cell.cu) and whole-sequence layers (rnn_layer.cu). No torch headers; the torch
// binding (bind_rnn.cpp) does the large products with cuBLAS through ATen and launches these
// on the current stream. Gate order and semantics are torch.nn's: LSTM i, f, g, o
// (c' = f c + i g, h' = o tanh(c')); GRU r, z, n with n = tanh(x W_in + b_in + r (W_hn h +
// b_hn)) and h' = (1 - z) n + z h; RNN h' = tanh | relu(x W_ih + b_ih + h W_hh + b_hh).
// G = 4 (LSTM), 3 (GRU), 1 (RNN) gates; every [.., G*H] row holds the gates one after another.
// All arithmetic is fp32 whatever the storage dtype (fp16, bf16, fp32).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace seqkern::cuda::rnn {

enum class CellKind : int { kLSTM = 0, kGRU = 1, kRnnTanh = 2, kRnnRelu = 3 };
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

inline int gate_count(CellKind c) {
  return c == CellKind::kLSTM ? 4 : c == CellKind::kGRU ? 3 : 1;
}
// What one (step, row) saves for the backward, in units of H: LSTM i, f, g, o activated;
// GRU r, z, n activated then W_hn h + b_hn; RNN h' itself.
inline int saved_width(CellKind c) { return c == CellKind::kLSTM || c == CellKind::kGRU ? 4 : 1; }

// A matrix [rows, cols] (or a vector, with s1 unused) in elements of the problem's dtype;
// data == nullptr means absent. Any strides, 0 included (broadcast).
struct Strided2 {
  const void* data = nullptr;
  int64_t s0 = 0, s1 = 0;
};

// ---- One cell step ------------------------------------------------------------------------
// The products are the caller's (cuBLAS): gates_x = x W_ih^T and gates_h = hx W_hh^T, fp32,
// [B, G*H] contiguous, without biases. rnn_cell_fwd adds the biases and runs the cell:
//   b_ih, b_hh   [G*H] (stride s0) or both absent
//   hx           [B, H], read by GRU (z h) only; cx [B, H], LSTM only
//   h_out        [B, H] contiguous, dtype; c_out [B, H] contiguous (LSTM; else unused)
//   saved        fp32, contiguous: [B, W*H] (W = saved_width) then, LSTM, c' [B, H]; exactly
//                what rnn_cell_gate_grads reads. Outputs are fully written, alias nothing.
cudaError_t rnn_cell_fwd(CellKind cell, DType dtype, int64_t B, int64_t H, const float* gates_x,
                         const float* gates_h, Strided2 b_ih, Strided2 b_hh, Strided2 hx,
                         Strided2 cx, void* h_out, void* c_out, float* saved, cudaStream_t stream);

// Gradients of the gate pre-activations from dL/dh' (grad_h [B, H]) and, LSTM, dL/dc'
// (grad_c [B, H] or absent = 0). hx [B, H] (GRU), cx [B, H] (LSTM), saved: rnn_cell_fwd's.
// Outputs, contiguous, dtype: d_ih [B, G*H] (for x W_ih^T + b_ih, and for LSTM/RNN also for
// h W_hh^T + b_hh); GRU: d_hh [B, 3H] (for h W_hh^T + b_hh) and d_hx [B, H] (the part of
// dL/dhx that bypasses W_hh, z dh'); LSTM: d_cx [B, H]. Unused ones may be nullptr.
cudaError_t rnn_cell_gate_grads(CellKind cell, DType dtype, int64_t B, int64_t H, Strided2 grad_h,
                                Strided2 grad_c, Strided2 hx, Strided2 cx, const float* saved,
                                void* d_ih, void* d_hh, void* d_hx, void* d_cx,
                                cudaStream_t stream);

// ---- One layer, one direction, whole sequence ------------------------------------------------
// Steps in processing order: step s covers rows [0, n_s) of the batch at row offset off_s of
// the flattened input [N, .]. Padded input: n_s = B, off_s = t B. Packed: n_s =
// batch_sizes[t] (non-increasing, as torch packs), off_s = sum of the earlier sizes; rows
// past n_s keep their state. reverse processes t = T-1 .. 0, so a packed row starts at its
// own last element.
struct LayerProblem {
  CellKind cell = CellKind::kLSTM;
  DType dtype = DType::kFloat;
  int64_t steps = 0;                    // T
  int64_t batch = 0;                    // B, rows of h0 (= batch_sizes[0] when packed)
  int64_t hidden = 0;                   // H
  const int64_t* batch_sizes = nullptr;  // HOST array [T], or nullptr for a padded input
  bool reverse = false;
};

// N, the rows of the flattened input.
inline int64_t rnn_layer_rows(const LayerProblem& p) {
  if (!p.batch_sizes) return p.steps * p.batch;
  int64_t n = 0;
  for (int64_t s = 0; s < p.steps; ++s) n += p.batch_sizes[s];
  return n;
}

// Whether the layer kernels handle p: G*H <= kMaxGateRows (one fp32 row of the widest
// operand, G*H for the backward, must fit in shared memory) and N, B < 2^31. The Python
// backend mirrors this rule.
constexpr int64_t kMaxGateRows = 32768;
inline bool rnn_layer_supported(const LayerProblem& p) {
  return gate_count(p.cell) * p.hidden <= kMaxGateRows && rnn_layer_rows(p) < (int64_t(1) << 31) &&
         p.batch < (int64_t(1) << 31);
}

// How a layer will run on the current device (for tests and benchmarks): persistent
// (one cooperative launch, W_hh slice in shared memory) or one launch per step.
struct LayerPlan {
  bool persistent = false;
  int units = 0;       // hidden units per block
  int batch_tile = 0;  // batch rows per pass over the block's weights
  int blocks = 0;
  size_t smem_bytes = 0;
  int k_chunk = 0;     // batch-lane and tensor-core plans: reduction columns staged a chunk
  bool mma = false;    // tensor-core blocks (rnn_layer.cu's use_mma)
  bool prefetch = false;  // ... with two staging buffers (rnn_layer.cu's use_prefetch)
  int batch_groups = 1;   // ... the batch's passes spread over this many groups of blocks
                          // (blocks = units' blocks x batch_groups; rnn_layer.cu's use_split)
};
cudaError_t rnn_layer_plan(const LayerProblem& p, bool backward, LayerPlan* plan);

// Forward.
//   x_gates   fp32 [N, G*H] contiguous: x W_ih^T, no bias (the caller's GEMM)
//   bias_x    fp32 [G*H] or nullptr: b_ih + b_hh (GRU: b_ih, plus b_hr, b_hz on r, z)
//   bias_hn   fp32 [H] or nullptr: GRU's b_hn, added inside r * (W_hn h + b_hn)
//   w_hh      [G*H, H], dtype, any strides
//   h0, c0    [B, H], dtype, any strides; c0 LSTM only
//   out       [N, H] dtype contiguous; h_n, c_n [B, H] dtype contiguous (c_n LSTM only)
//   workspace fp32, nullptr for inference, else rnn_layer_workspace_numel(p) elements:
//             [N, W*H] saved (W = saved_width), [N, H] h_prev, then LSTM [N, H] c_prev and
//             [N, H] c' (the CPU kernel's layout, so the size matches the op's fake)
//   scratch   rnn_layer_fwd_scratch_bytes(p) bytes of device memory, private to this call
// Every output element is written; none may alias an input.
inline int64_t rnn_layer_workspace_numel(const LayerProblem& p) {
  const int64_t H = p.hidden, lstm = p.cell == CellKind::kLSTM;
  return rnn_layer_rows(p) * (saved_width(p.cell) * H + H + 2 * lstm * H);
}
size_t rnn_layer_fwd_scratch_bytes(const LayerProblem& p);
cudaError_t rnn_layer_fwd(const LayerProblem& p, const float* x_gates, const float* bias_x,
                          const float* bias_hn, Strided2 w_hh, Strided2 h0, Strided2 c0,
                          void* out, void* h_n, void* c_n, float* workspace, void* scratch,
                          cudaStream_t stream);

// Backward through time.
//   w_hh       as in the forward; workspace: the forward's (must not be nullptr)
//   grad_out   dtype [N, H] contiguous, or nullptr (no gradient reaches the output)
//   d_h        fp32 [B, H] contiguous: dL/dh_n in, dL/dh0 out
//   d_c        fp32 [B, H] contiguous (LSTM): dL/dc_n in, dL/dc0 out
//   d_gates_x  fp32 [N, G*H]: gradient of the gate pre-activations as the input projection
//              (and, LSTM/RNN, the hidden product) sees them; fully written
//   d_gates_h  fp32 [N, 3H] (GRU only): gradient of h W_hh^T + b_hh; fully written
//   scratch    rnn_layer_bwd_scratch_bytes(p) bytes of device memory, private to this call
// The caller finishes with products: dx = d_gates_x W_ih, dW_ih = d_gates_x^T x,
// dW_hh = d_gates_h^T h_prev (d_gates_x for LSTM/RNN; h_prev from the workspace), db =
// column sums.
size_t rnn_layer_bwd_scratch_bytes(const LayerProblem& p);
cudaError_t rnn_layer_bwd(const LayerProblem& p, Strided2 w_hh, const float* workspace,
                          const void* grad_out, float* d_h, float* d_c, float* d_gates_x,
                          float* d_gates_h, void* scratch, cudaStream_t stream);

}  // namespace seqkern::cuda::rnn

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Device side, shared by rnn_cell.cu and rnn_layer.cu: storage conversions and the cell
// descriptions. A cell is a small object: gate count, saved width, the forward of one unit
// and the backward of one unit; the kernels are written once against it.
namespace seqkern::cuda::rnn::dev {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float load(Strided2 m, int64_t r, int64_t c) {
  return to_float(static_cast<const T*>(m.data)[r * m.s0 + c * m.s1]);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// tanh through expm1, accurate near 0 (fast-math builds may map tanhf to an approximation).
__device__ __forceinline__ float tanh_acc(float x) {
  const float t = expm1f(-2.f * fabsf(x));
  return copysignf(-t / (2.f + t), x);
}

// x[g]: input side of gate g (x W_ih^T + b_ih, plus b_hh where it folds in);
// h[g]: hidden side (h W_hh^T + b_hh). fwd returns h' and updates c (LSTM) in place.
// bwd takes dh = dL/dh' and dc = dL/dc' (LSTM, in/out: dL/dc_prev), writes dx[g] (gradient of
// gate g's pre-activation) and, kSplitHidden only, dhid[g] (gradient of the hidden side),
// and returns the part of dL/dh_prev that bypasses W_hh.
struct Lstm {
  static constexpr int kGates = 4, kSaved = 4;
  static constexpr bool kHasCell = true, kSplitHidden = false;
  explicit Lstm(CellKind) {}
  __device__ float fwd(const float* x, const float* h, float, float& c, float* saved) const {
    const float i = sigmoid(x[0] + h[0]), f = sigmoid(x[1] + h[1]);
    const float g = tanh_acc(x[2] + h[2]), o = sigmoid(x[3] + h[3]);
    c = f * c + i * g;
    saved[0] = i, saved[1] = f, saved[2] = g, saved[3] = o;
    return o * tanh_acc(c);
  }
  __device__ float bwd(const float* s, float c_new, float c_prev, float, float dh, float& dc,
                       float* dx, float*) const {
    const float i = s[0], f = s[1], g = s[2], o = s[3], tc = tanh_acc(c_new);
    const float dct = dc + dh * o * (1.f - tc * tc);
    dx[0] = dct * g * i * (1.f - i);
    dx[1] = dct * c_prev * f * (1.f - f);
    dx[2] = dct * i * (1.f - g * g);
    dx[3] = dh * tc * o * (1.f - o);
    dc = dct * f;
    return 0.f;
  }
};

struct Gru {
  static constexpr int kGates = 3, kSaved = 4;
  static constexpr bool kHasCell = false, kSplitHidden = true;
  explicit Gru(CellKind) {}
  __device__ float fwd(const float* x, const float* h, float h_prev, float&, float* saved) const {
    const float r = sigmoid(x[0] + h[0]), z = sigmoid(x[1] + h[1]);
    const float n = tanh_acc(x[2] + r * h[2]);
    saved[0] = r, saved[1] = z, saved[2] = n, saved[3] = h[2];
    return n + z * (h_prev - n);
  }
  __device__ float bwd(const float* s, float, float, float h_prev, float dh, float&, float* dx,
                       float* dhid) const {
    const float r = s[0], z = s[1], n = s[2], hn = s[3];
    const float dn = dh * (1.f - z) * (1.f - n * n);
    const float dr = dn * hn * r * (1.f - r);
    const float dz = dh * (h_prev - n) * z * (1.f - z);
    dx[0] = dhid[0] = dr;
    dx[1] = dhid[1] = dz;
    dx[2] = dn;
    dhid[2] = dn * r;
    return dh * z;
  }
};

struct Rnn {
  static constexpr int kGates = 1, kSaved = 1;
  static constexpr bool kHasCell = false, kSplitHidden = false;
  bool relu;
  explicit Rnn(CellKind k) : relu(k == CellKind::kRnnRelu) {}
  __device__ float fwd(const float* x, const float* h, float, float&, float* saved) const {
    const float a = x[0] + h[0];
    saved[0] = relu ? (a <= 0.f ? 0.f : a) : tanh_acc(a);  // NaN stays NaN (fmaxf drops it)
    return saved[0];
  }
  __device__ float bwd(const float* s, float, float, float, float dh, float&, float* dx,
                       float*) const {
    dx[0] = relu ? (s[0] <= 0.f ? 0.f : dh) : dh * (1.f - s[0] * s[0]);  // NaN passes dh
    return 0.f;
  }
};

// Calls f(Cell{kind}, T{}) for the cell and storage type of a problem.
template <class F>
cudaError_t with_cell_and_type(CellKind kind, DType dtype, F&& f) {
  auto with_type = [&](auto cell) -> cudaError_t {
    switch (dtype) {
      case DType::kHalf: return f(cell, __half{});
      case DType::kBFloat16: return f(cell, __nv_bfloat16{});
      case DType::kFloat: return f(cell, float{});
    }
    return cudaErrorInvalidValue;
  };
  switch (kind) {
    case CellKind::kLSTM: return with_type(Lstm(kind));
    case CellKind::kGRU: return with_type(Gru(kind));
    case CellKind::kRnnTanh:
    case CellKind::kRnnRelu: return with_type(Rnn(kind));
  }
  return cudaErrorInvalidValue;
}

}  // namespace seqkern::cuda::rnn::dev
#endif  // __CUDACC__
