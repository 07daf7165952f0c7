// The product machinery of the layer kernels (rnn_layer.cu, its only includer): the
// kernels' argument struct and the two block types that multiply a step's operand (h_prev
// forward, the gate gradients backward) by the block's slice of W_hh.
//
// Inside a block, 8 warps form `groups` thread groups; a group owns RT weight rows (the G
// gates of one unit forward, 4 units of W_hh^T backward), its threads split the reduction
// dimension K in 4-element slices, each accumulating RT x BT fp32 dot products (BT = batch
// rows per pass). A warp reduce-scatter and a sum over the group's warps in shared memory
// finish the products, and one thread per (unit, batch row) runs the cell.
//
// Batches over 8 rows may use (rnn_layer.cu's use_lanes: by default the forward at B >= 64)
// batch-lane blocks instead (LaneBlock): 16, 32 or 64 batch rows a pass, the lanes of every
// warp over the rows (and, 16-row tiles, two K slices), the 8 warps splitting K, each thread
// accumulating all of the block's weight rows for its batch rows. Weights are read as
// broadcasts, so the product needs no shuffles, and a step takes one pass up to B = 64
// (eight of 8 rows before); K is staged in chunks when the rows do not fit (the backward's
// K = G*H).
//
// Tensor-core blocks (MmaBlock; rnn_layer.cu's use_mma: by default fp16/bf16 at B >= 4, fp32
// layers on TF32 only with SEQKERN_CUDA_RNN_MMA=1 SEQKERN_CUDA_RNN_TF32=1): 8 units a block,
// 16 or 32 batch rows a pass (the backward with SEQKERN_CUDA_RNN_WIDE=1: 16 units, 16 rows),
// the product on mma.sync from a rounded copy of the operand rows.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mma.cuh"
#include "rnn.h"

namespace seqkern::cuda::rnn {
namespace {  // one includer: rnn_layer.cu

constexpr int kThreads = 256, kWarps = kThreads / 32;

__host__ __device__ constexpr int pow2_ceil(int v) { return v <= 1 ? 1 : 2 * pow2_ceil((v + 1) / 2); }
__host__ __device__ constexpr int log2_ceil(int v) { return v <= 1 ? 0 : 1 + log2_ceil((v + 1) / 2); }

// Everything a layer kernel reads; one struct for both directions.
struct KernelArgs {
  int S = 0, B = 0, H = 0;      // steps, batch, hidden
  int units = 0, groups = 0;    // hidden units per block; thread groups per block
  // Blocks over the hidden units, and over the batch (SEQKERN_CUDA_RNN_SPLIT: rnn_layer.cu's
  // use_split): block k takes the units of unit block k % unit_blocks and, of every step,
  // the passes of BT rows starting at (k / unit_blocks) BT, batch_groups BT apart.
  int unit_blocks = 0, batch_groups = 1;
  int K = 0, Kp = 0;            // reduction length (forward H, backward G*H), padded
  int kc = 0;                   // batch-lane (multiple of 32) and tensor-core blocks: staged
                                // columns a chunk
  bool prefetch = false;        // tensor-core blocks: two staging buffers, the next chunk
                                // (or pass) staged while this one multiplies (MmaBlock)
  bool w_in_smem = false;       // persistent: the block's weight slice sits in shared memory
  bool vec4 = false;            // rows of the staged operand can be read as float4
  const int* steps = nullptr;   // [S][2] (row offset, live rows), processing order
  const void* w = nullptr;      // packed weights: forward [Hr][G][Kp], backward [Hr][Kp]
  unsigned* barrier = nullptr;  // arrival counter, zero at launch
  int64_t N = 0;
  float* ws = nullptr;          // forward: written unless nullptr; backward: read
  const float *x_gates = nullptr, *bias_x = nullptr, *bias_hn = nullptr;
  float* h_state = nullptr;     // [2][B][H] ping-pong
  float* c_state = nullptr;     // [B][H] (LSTM)
  void *out = nullptr, *h_n = nullptr, *c_n = nullptr;
  const void* grad_out = nullptr;
  float *d_h = nullptr, *d_c = nullptr, *d_gx = nullptr, *d_gh = nullptr;
  // The operand of the step product as tensor-core blocks read it (op_value: rounded to the
  // layer's dtype, or to TF32), [2][B][Kp] by step parity (columns K..Kp zero), written by
  // the step before (forward: the state, backward: the gate gradients W_hh^T takes).
  void* op = nullptr;
};

// This block's unit block (its weight slice and hidden units) and batch group (KernelArgs).
__device__ __forceinline__ int unit_block(const KernelArgs& a) {
  return static_cast<int>(blockIdx.x) % a.unit_blocks;
}
__device__ __forceinline__ int batch_group(const KernelArgs& a) {
  return static_cast<int>(blockIdx.x) / a.unit_blocks;
}

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
}
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
// Four fp16 / bf16 values (8 bytes) as two pairs P.
template <typename P, typename T>
__device__ __forceinline__ void load4_pairs(const T* p, float (&v)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  P lo, hi;
  memcpy(&lo, &raw.x, 4), memcpy(&hi, &raw.y, 4);
  const float2 a = to_float2(lo), b = to_float2(hi);
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
__device__ __forceinline__ void load4(const __half* p, float (&v)[4]) { load4_pairs<__half2>(p, v); }
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
  load4_pairs<__nv_bfloat162>(p, v);
}

// acc[r * BT + b] += w[r][k] v[b][k] over k = 4 klane + 4 nk i + (0..3), k < Kp. w: RT rows
// of Kp elements (shared or global); v: BT rows of Kp floats in shared memory.
template <typename T, int RT, int BT, int VP>
__device__ __forceinline__ void rows_dot(const T* w, int Kp, const float* v, int klane, int nk,
                                         float (&acc)[VP]) {
  for (int k = 4 * klane; k < Kp; k += 4 * nk) {
    float wv[RT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r) load4(w + r * Kp + k, wv[r]);
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      const float4 h = *reinterpret_cast<const float4*>(v + b * Kp + k);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        float s = acc[r * BT + b];
        s = fmaf(wv[r][0], h.x, s);
        s = fmaf(wv[r][1], h.y, s);
        s = fmaf(wv[r][2], h.z, s);
        acc[r * BT + b] = fmaf(wv[r][3], h.w, s);
      }
    }
  }
}

// Sums each of the V partial sums over the warp's lanes and stores the V totals in
// red[0, V). Reduce-scatter: at level s a lane keeps half of its values (the upper half if
// bit 4-s of its lane is set) and adds its partner's copy of them, so after the levels lane
// L holds values L*(V/32) .. (V >= 32) or value L >> (5 - log2 V) (V < 32, then finished by
// plain butterflies).
template <int V, int S>
__device__ __forceinline__ void scatter_levels(float (&v)[V], int lane) {
  if constexpr (S < 5 && (V >> S) > 1) {  // one template level per step: constant indices
    constexpr int o = 16 >> S, half = (V >> S) / 2;
    const bool upper = (lane & o) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
    }
    scatter_levels<V, S + 1>(v, lane);
  }
}

template <int V>
__device__ __forceinline__ void warp_sum_to_smem(float (&v)[V], float* red, int lane) {
  constexpr int kLevels = log2_ceil(V) < 5 ? log2_ceil(V) : 5;
  scatter_levels<V, 0>(v, lane);
  if constexpr (V >= 32) {
#pragma unroll
    for (int i = 0; i < V / 32; ++i) red[lane * (V / 32) + i] = v[i];
  } else {
    constexpr int kShift = 5 - kLevels;
#pragma unroll
    for (int o = 16 >> kLevels; o >= 1; o >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
    if ((lane & ((1 << kShift) - 1)) == 0) red[lane >> kShift] = v[0];
  }
}

// The total of partial sum idx over the warps of a group.
__device__ __forceinline__ float group_sum(const float* red, int vp, int group, int wpg, int idx) {
  float s = 0.f;
  for (int w = 0; w < wpg; ++w) s += red[(group * wpg + w) * vp + idx];
  return s;
}

// dst[r][0, K) = src[r * ld + (0, K)] for r < rows. Through L2 (ld.cg): other blocks wrote
// src in this launch, so L1 may hold stale lines.
__device__ __forceinline__ void stage_rows(float* dst, int Kp, const float* src, int64_t ld,
                                           int rows, int K, bool vec4) {
  if (vec4) {
    const int K4 = K / 4;
    for (int i = threadIdx.x; i < rows * K4; i += kThreads) {
      const int r = i / K4, c = i - r * K4;
      const float4 x = __ldcg(reinterpret_cast<const float4*>(src + r * ld) + c);
      *reinterpret_cast<float4*>(dst + r * Kp + 4 * c) = x;
    }
  } else {
    for (int i = threadIdx.x; i < rows * K; i += kThreads) {
      const int r = i / K, c = i - r * K;
      dst[r * Kp + c] = __ldcg(src + r * ld + c);
    }
  }
}

// This block's weight slice (`slice` elements of the packed weights): copied to the start
// of shared memory when persistent (*bytes: the shared memory it takes), else read in place.
template <typename T>
__device__ __forceinline__ const T* place_slice(const KernelArgs& a, int64_t slice,
                                                unsigned char* smem, size_t* bytes) {
  const T* w = static_cast<const T*>(a.w) + unit_block(a) * slice;
  *bytes = 0;
  if (!a.w_in_smem) return w;
  *bytes = slice * sizeof(T);
  const uint4* src = reinterpret_cast<const uint4*>(w);
  uint4* dst = reinterpret_cast<uint4*>(smem);
  for (int64_t i = threadIdx.x; i < int64_t(*bytes / 16); i += kThreads) dst[i] = src[i];
  return reinterpret_cast<const T*>(smem);
}

// The (hidden unit, batch row) pair whose cell a thread runs: unit j = first unit of the
// block + u for batch row bb of each tile (the thread's place by assign or
// assign_units_fastest); owner where that exists.
struct CellPair {
  int u, bb, j;
  bool owner;
  // Thread (u, bb) = (tid / bt, tid % bt): the batch row fastest.
  __device__ void assign(const KernelArgs& a, int bt) {
    const int tid = threadIdx.x;
    u = tid / bt, bb = tid - u * bt, j = unit_block(a) * a.units + u;
    owner = tid < a.units * bt && j < a.H;
  }
  // Thread (u, bb) = (tid % units, tid / units): the unit fastest, so that a warp's accesses
  // to the step's [rows][H] tensors (input gates, states, outputs, workspace) are runs of
  // consecutive units (4, 8 or 16 of them: 4-8 sectors a warp), not 32 scattered elements.
  // units: the block's hidden units (tensor-core blocks pass their compile-time count, which
  // their weight slice's offset also uses, so the two cannot disagree).
  __device__ void assign_units_fastest(const KernelArgs& a, int bt, int units) {
    const int tid = threadIdx.x;
    bb = tid / units, u = tid - bb * units, j = unit_block(a) * units + u;
    owner = bb < bt && j < a.H;
  }
};

// Row stride (floats) of a block's partial sums [parts][rows][stride] for bt batch rows,
// read by assign_units_fastest's threads (a warp: `units` units x 32 / units batch rows) at
// ru weight rows a unit: the least >= bt with ru * stride = 32 / units (mod 64 / units), so
// that unit u's rows start at bank (32 / units) u * odd (mod 32), distinct multiples of the
// warp's rows, and a warp's reads of one partial sum fall in 32 distinct banks (stride bt put
// a warp's units in one set of banks: 4-8-way conflicts). At most bt + 64 / units - 1; -1
// where none exists (ru holding a higher power of 2 than 32 / units).
__host__ __device__ constexpr int red_stride(int bt, int units, int ru) {
  const int rows = 32 / units;
  for (int s = bt; s < bt + 2 * rows; ++s)
    if ((ru * s) % (2 * rows) == rows) return s;
  return -1;
}

// A block's shared memory and where each thread sits in it. Shared memory: [weight slice
// (persistent only)] [BT x Kp staged rows] [8 x VP partial sums]. Warps form a.groups
// groups; group q owns weight rows [q RT, q RT + RT) of the block's slice. Thread (u, bb) for
// u < units runs the cell of hidden unit j for batch row bb of each tile.
template <typename T, int RT, int BT>
struct Block : CellPair {
  static constexpr int VP = pow2_ceil(RT * BT);
  const T* w_rows;  // this thread group's RT rows (shared when persistent, else global)
  float *staged, *red;
  int lane, warp, wpg, klane;

  // Copies the weight slice in (persistent) and zeroes the staged rows' padding columns,
  // which staging never writes and the zero weight padding multiplies.
  __device__ Block(const KernelArgs& a, unsigned char* smem) {
    const int64_t slice = int64_t(a.groups) * RT * a.Kp;
    size_t w_bytes = 0;
    const T* w = place_slice<T>(a, slice, smem, &w_bytes);
    staged = reinterpret_cast<float*>(smem + w_bytes);
    red = staged + BT * a.Kp;
    const int pad = a.Kp - a.K;
    for (int i = threadIdx.x; i < BT * pad; i += kThreads)
      staged[(i / pad) * a.Kp + a.K + i % pad] = 0.f;
    const int tid = threadIdx.x;
    lane = tid & 31, warp = tid >> 5, wpg = kWarps / a.groups;
    const int group = warp / wpg;
    klane = (warp - group * wpg) * 32 + lane;
    w_rows = w + group * RT * a.Kp;
    assign(a, BT);
    __syncthreads();
  }

  // The group's RT rows times the staged rows, summed over the group's threads per warp
  // into red (then group_sum adds the group's warps).
  __device__ void product(int Kp) {
    float acc[VP];
#pragma unroll
    for (int i = 0; i < VP; ++i) acc[i] = 0.f;
    rows_dot<T, RT, BT>(w_rows, Kp, staged, klane, wpg * 32, acc);
    warp_sum_to_smem<VP>(acc, red + warp * VP, lane);
  }

  // Stages `rows` rows of src (row stride ld) and multiplies them (nothing when rows = 0);
  // the block's threads all call it. (op: MmaBlock's operand rows, unused here.)
  __device__ void multiply(const KernelArgs& a, const float* src, int64_t ld, int rows,
                           const void* /*op*/) {
    if (rows > 0) stage_rows(staged, a.Kp, src, ld, rows, a.K, a.vec4);
    __syncthreads();
    if (rows > 0) product(a.Kp);  // block-uniform condition
    __syncthreads();
  }

  // The total for row r of group q, batch row bb.
  __device__ float total(int q, int r) const { return group_sum(red, VP, q, wpg, r * BT + bb); }
  // Column col of staged batch row b (the forward's previous state).
  __device__ float staged_at(const KernelArgs& a, int b, int col) const {
    return staged[b * a.Kp + col];
  }
};

// Batch-lane block (BT = 16, 32 or 64): lane l of a warp takes batch rows l % RW + RW i
// (RW = min(BT, 32)) and K slice l / RW, so part p = KG warp + l / RW of the P = 8 KG parts
// accumulates all R weight rows of the block's slice for its rows over K columns
// 4 (p + P m) .. + 3 of each chunk; the parts' partial sums meet in red. Shared memory:
// [weight slice (persistent only)] [BT x (kc + 4) staged rows: the 4-float pad puts 8
// consecutive rows' float4s in distinct banks] [P x R x rs partial sums, rs = red_stride >=
// BT]. The staged rows are whole (kc >= Kp) when the forward reads the previous state from
// them. Threads run the cells with the unit fastest (assign_units_fastest).
template <int BT>
struct LaneShape {
  static constexpr int RW = BT < 32 ? BT : 32, KG = 32 / RW, BL = BT / RW, P = kWarps * KG;
};

template <typename T, int RT, int R, int BT>
struct LaneBlock : CellPair {
  static constexpr int RW = LaneShape<BT>::RW, BL = LaneShape<BT>::BL, P = LaneShape<BT>::P;
  const T* w;  // the block's R rows of Kp (shared when persistent, else global)
  float *staged, *red;
  int stride, row, part, rs;  // rs: red's row stride (red_stride)

  __device__ LaneBlock(const KernelArgs& a, unsigned char* smem) {
    const int64_t slice = int64_t(R) * a.Kp;
    size_t w_bytes = 0;
    w = place_slice<T>(a, slice, smem, &w_bytes);
    stride = a.kc + 4;
    staged = reinterpret_cast<float*>(smem + w_bytes);
    red = staged + BT * stride;
    const int tid = threadIdx.x, lane = tid & 31;
    row = lane % RW, part = (tid >> 5) * LaneShape<BT>::KG + lane / RW;
    rs = red_stride(BT, a.units, R / a.units);
    assign_units_fastest(a, BT, a.units);
    __syncthreads();
  }

  // Columns [k0, k0 + len) of `rows` rows of src into staged, zero from column K on. Through
  // L2 (ld.cg), as stage_rows; each thread has kInFlight loads in flight before it stores
  // (a B = 64 step stages 32 float4s a thread: one L2 round trip each, back to back, would
  // cost more than the product).
  __device__ void stage_chunk(const KernelArgs& a, const float* src, int64_t ld, int rows,
                              int k0, int len) const {
    constexpr int kInFlight = 8;
    const int n4 = len / 4, total = rows * n4;
    for (int i0 = threadIdx.x; i0 < total; i0 += kInFlight * kThreads) {
      float4 v[kInFlight];
#pragma unroll
      for (int q = 0; q < kInFlight; ++q) {
        const int i = i0 + q * kThreads, r = i / n4, k = k0 + 4 * (i - r * n4);
        const float* p = src + r * ld + k;
        if (i >= total) {
        } else if (a.vec4 && k + 4 <= a.K) {
          v[q] = __ldcg(reinterpret_cast<const float4*>(p));
        } else {
          v[q].x = k < a.K ? __ldcg(p) : 0.f, v[q].y = k + 1 < a.K ? __ldcg(p + 1) : 0.f;
          v[q].z = k + 2 < a.K ? __ldcg(p + 2) : 0.f, v[q].w = k + 3 < a.K ? __ldcg(p + 3) : 0.f;
        }
      }
#pragma unroll
      for (int q = 0; q < kInFlight; ++q) {
        const int i = i0 + q * kThreads, r = i / n4, c = 4 * (i - r * n4);
        if (i < total) *reinterpret_cast<float4*>(staged + r * stride + c) = v[q];
      }
    }
  }

  // As Block::multiply: stages and multiplies `rows` rows of src chunk by chunk.
  __device__ void multiply(const KernelArgs& a, const float* src, int64_t ld, int rows,
                           const void* /*op*/) {
    float acc[R * BL];
#pragma unroll
    for (int i = 0; i < R * BL; ++i) acc[i] = 0.f;
    for (int k0 = 0; k0 < a.Kp; k0 += a.kc) {
      const int len = min(a.kc, a.Kp - k0);
      if (k0 > 0) __syncthreads();  // the previous chunk is read
      if (rows > 0) stage_chunk(a, src, ld, rows, k0, len);
      __syncthreads();
      if (rows == 0) continue;  // block-uniform
      for (int c = 4 * part; c < len; c += 4 * P) {
        float4 h[BL];
#pragma unroll
        for (int i = 0; i < BL; ++i)
          h[i] = *reinterpret_cast<const float4*>(staged + (row + RW * i) * stride + c);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wv[4];
          load4(w + r * a.Kp + k0 + c, wv);  // one address a K slice: a broadcast
#pragma unroll
          for (int i = 0; i < BL; ++i) {
            float s = acc[r * BL + i];
            s = fmaf(wv[0], h[i].x, s);
            s = fmaf(wv[1], h[i].y, s);
            s = fmaf(wv[2], h[i].z, s);
            acc[r * BL + i] = fmaf(wv[3], h[i].w, s);
          }
        }
      }
    }
    if (rows > 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < BL; ++i) red[(part * R + r) * rs + row + RW * i] = acc[r * BL + i];
    }
    __syncthreads();
  }

  __device__ float total(int q, int r) const {
    float s = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) s += red[(p * R + q * RT + r) * rs + bb];
    return s;
  }
  __device__ float staged_at(const KernelArgs&, int b, int col) const {
    return staged[b * stride + col];
  }
};

// Tensor-core block (BT = 16 or 32): fp16 / bf16 layers on mma.sync m16n8k16, fp32 layers
// (opt-in) on TF32 m16n8k8. The block's R weight rows sit in shared memory as T (fp32:
// rounded to TF32), padded with zero rows to MT whole m16 tiles and with zero columns to a
// multiple of the k step (Kpk); the step's operand rows (the state forward, the gate
// gradients backward) are staged by cp.async from their copy in T (KernelArgs::op, rounded
// as the product reads them: to T as cuDNN's half-precision layers keep them, or to TF32),
// kc columns a chunk. Warp w takes m tile w % MT and every KG-th k step (KG = 8 / MT) of
// each chunk, accumulating its 16 x BT tile in fp32 (fp16 / bf16: detail::warp_mma_smem, the
// attention kernels' product); the KG partial tiles of a row meet in red. The forward reads
// the previous state's exact fp32 value from global memory, not from the rounded copy.
// With a.prefetch (SEQKERN_CUDA_RNN_PREFETCH=1) two staging buffers take turns: each chunk's
// copies are issued while the one before multiplies, a pass's last chunk overlapping the
// next pass's first (expect_next), so only a step's first chunk waits on its full latency.
// Shared memory: [16 MT x (Kpk + pad) weights] [BT x (kc + pad) staged, twice with
// a.prefetch] [KG x 16 MT x kRed partial sums, kRed = red_stride >= BT]; the pads (16 bytes)
// shift consecutive rows' banks for conflict-free fragment loads. Threads run the cells with
// the unit fastest (assign_units_fastest).
template <typename T>
struct MmaShape {
  static constexpr bool kTf32 = std::is_same_v<T, float>;
  static constexpr int kStep = kTf32 ? 8 : 16;       // k per mma
  static constexpr int kPad = 16 / int(sizeof(T));   // elements in 16 bytes
};

// The value a layer's operand copy (KernelArgs::op) holds for v.
template <typename T>
__device__ __forceinline__ T op_value(float v) {
  if constexpr (MmaShape<T>::kTf32) return detail::to_tf32(v);
  else return dev::from_float<T>(v);
}

// Tensor-core blocks: hidden units per block (units x BT <= kThreads): 8, or 16 in the
// backward's wide blocks (rnn_layer.cu's use_wide: 16-row passes, the m16 tile all weights).
constexpr int kMmaUnits = 8, kMmaUnitsWide = 16;

// U: the block's hidden units (R = U G weight rows forward, U backward).
template <typename T, int RT, int R, int BT, int U>
struct MmaBlock : CellPair {
  static constexpr int MT = (R + 15) / 16, M = 16 * MT, KG = kWarps / MT, NP = BT / 16;
  static constexpr int kRed = red_stride(BT, U, R / U);
  static_assert(U * BT <= kThreads);
  static_assert(kRed > 0);
  static constexpr int kStep = MmaShape<T>::kStep, kPad16 = MmaShape<T>::kPad;
  static_assert(kWarps % MT == 0 && BT % 16 == 0);
  T* w;
  T *buf0, *buf1;  // staging buffers: one (buf1 = buf0), or two with a.prefetch
  float* red;
  int ldw, lds, lane, mt, kg;
  int cur = 0;                  // a.prefetch: the buffer of the chunk to multiply next
  bool ahead = false;           // ... issued already, by the pass before (expect_next) ...
  const T* ahead_op = nullptr;  // ... from these rows
  int ahead_rows = 0;
  const T* next_op = nullptr;   // the next pass's operand rows (expect_next)
  int next_rows = 0;

  __device__ MmaBlock(const KernelArgs& a, unsigned char* smem) {
    const int kpk = (a.Kp + kStep - 1) / kStep * kStep;
    ldw = kpk + kPad16, lds = a.kc + kPad16;
    w = reinterpret_cast<T*>(smem);
    buf0 = w + M * ldw;
    buf1 = a.prefetch ? buf0 + BT * lds : buf0;
    red = reinterpret_cast<float*>(buf1 + BT * lds);
    // Rows of a.Kp elements (a multiple of 8: 16-byte pieces) of the packed slice, zeros past
    // them; always copied (a per-step launch re-reads it, still correct).
    const T* g = static_cast<const T*>(a.w) + int64_t(unit_block(a)) * R * a.Kp;
    const int pieces = kpk / kPad16;
    for (int i = threadIdx.x; i < M * pieces; i += kThreads) {
      const int r = i / pieces, c = kPad16 * (i - r * pieces);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < R && c < a.Kp) v = *reinterpret_cast<const uint4*>(g + int64_t(r) * a.Kp + c);
      if constexpr (MmaShape<T>::kTf32) {
        v.x = __float_as_uint(detail::to_tf32(__uint_as_float(v.x)));
        v.y = __float_as_uint(detail::to_tf32(__uint_as_float(v.y)));
        v.z = __float_as_uint(detail::to_tf32(__uint_as_float(v.z)));
        v.w = __float_as_uint(detail::to_tf32(__uint_as_float(v.w)));
      }
      *reinterpret_cast<uint4*>(w + r * ldw + c) = v;
    }
    const int warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31, mt = warp % MT, kg = warp / MT;
    assign_units_fastest(a, BT, U);
    __syncthreads();
  }

  // Issues columns [k0, k0 + len) of `rows` operand rows (a.Kp elements each, 16-byte
  // aligned) into `staged` by cp.async, as one commit group; zeros for the columns from a.Kp
  // to Kpk.
  __device__ void stage_chunk(const KernelArgs& a, const T* op, int rows, int k0, int len,
                              T* staged) const {
    const int pieces = len / kPad16, total = rows * pieces;
    for (int i = threadIdx.x; i < total; i += kThreads) {
      const int r = i / pieces, c = kPad16 * (i - r * pieces);
      T* dst = staged + r * lds + c;
      if (k0 + c < a.Kp)
        detail::cp_async16(dst, op + int64_t(r) * a.Kp + k0 + c);
      else
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
    detail::cp_async_commit();
  }

  // Staging buffer i (a select, not an array: a run-time index put the block in local memory).
  __device__ T* buf(int i) const { return i ? buf1 : buf0; }

  // a.prefetch: the multiply after the next one (the step's next pass) reads `rows` operand
  // rows from op (0: none, or the step ends there), so that the next one stages their first
  // chunk during its own last.
  __device__ void expect_next(const void* op, int rows) {
    next_op = static_cast<const T*>(op), next_rows = rows;
  }

  // acc += the warp's m tile of W times the staged rows over k steps ks = kg, kg + KG, ...
  // below steps, chunk columns from k0.
  __device__ void product(float (&acc)[2 * NP][4], int k0, int steps, const T* staged) const {
    if constexpr (MmaShape<T>::kTf32) {
      const int g = lane >> 2, t = lane & 3;
      const T* wa = w + (16 * mt + g) * ldw + k0 + t;
      const T* sb = staged + g * lds + t;
      for (int ks = kg; ks < steps; ks += KG) {
        const int k = 8 * ks;
        const uint32_t a[4] = {__float_as_uint(wa[k]), __float_as_uint(wa[8 * ldw + k]),
                               __float_as_uint(wa[k + 4]), __float_as_uint(wa[8 * ldw + k + 4])};
#pragma unroll
        for (int n = 0; n < 2 * NP; ++n) {
          const T* b = sb + 8 * n * lds + k;
          detail::mma_1688_tf32(acc[n], a, __float_as_uint(b[0]), __float_as_uint(b[4]));
        }
      }
    } else {
      for (int ks = kg; ks < steps; ks += KG)
        detail::warp_mma_smem<T, 1, NP, true>(acc, w, ldw, 16 * mt, k0 + 16 * ks, staged, lds,
                                              0, 16 * ks, lane);
    }
  }

  // As Block::multiply, from the T copy of the operand rows (op, [rows][a.Kp]; the fp32
  // rows unused: the forward reads its fp32 h_prev from global memory, having no staged_at).
  // Rows past `rows` in the staged tile hold stale values that only reach their own (unread)
  // columns.
  __device__ void multiply(const KernelArgs& a, const float* /*rows*/, int64_t /*ld*/,
                           int rows, const void* op_rows) {
    const T* op = static_cast<const T*>(op_rows);
    const int kpk = ldw - kPad16;
    float acc[2 * NP][4];
#pragma unroll
    for (int n = 0; n < 2 * NP; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
    for (int k0 = 0; k0 < kpk; k0 += a.kc) {  // rows: block-uniform conditions
      const int len = min(a.kc, kpk - k0);
      if (!a.prefetch) {  // stage, wait, multiply
        if (k0 > 0) __syncthreads();  // the previous chunk is read
        if (rows > 0) stage_chunk(a, op, rows, k0, len, buf(0));
        detail::cp_async_wait_all();
        __syncthreads();
        if (rows > 0) product(acc, k0, len / kStep, buf(0));
        continue;
      }
      // This chunk is in flight to buf(cur) (issued by the chunk before, or by the pass
      // before: ahead); the next one (this pass's, else the next pass's first) goes to the
      // other buffer while this one multiplies.
      if (k0 == 0 && ahead && (op != ahead_op || rows != ahead_rows)) {
        detail::cp_async_wait_all();  // not the rows expect_next named: staged again below
        ahead = false;                // (block-uniform; nothing reads buf(cur) meanwhile)
      }
      if (k0 == 0 && !ahead && rows > 0) stage_chunk(a, op, rows, 0, len, buf(cur));
      ahead = false;
      bool more = false;
      if (k0 + a.kc < kpk && rows > 0) {
        stage_chunk(a, op, rows, k0 + a.kc, min(a.kc, kpk - k0 - a.kc), buf(cur ^ 1));
        more = true;
      } else if (k0 + a.kc >= kpk && next_rows > 0) {
        stage_chunk(a, next_op, next_rows, 0, min(a.kc, kpk), buf(cur ^ 1));
        more = ahead = true;
        ahead_op = next_op, ahead_rows = next_rows;
      }
      if (more) detail::cp_async_wait_group<1>();  // all but the copies just issued
      else detail::cp_async_wait_all();
      __syncthreads();
      if (rows > 0) product(acc, k0, len / kStep, buf(cur));
      __syncthreads();  // buf(cur) is read before a later chunk is issued into it
      cur ^= 1;
    }
    next_rows = 0;
    if (rows > 0) {
      const int g = lane >> 2, t = lane & 3;
#pragma unroll
      for (int n = 0; n < 2 * NP; ++n) {  // c[0..1]: row g, columns 2t, 2t+1; c[2..3]: row g+8
        float* at = red + (kg * M + 16 * mt + g) * kRed + 8 * n + 2 * t;
        at[0] = acc[n][0], at[1] = acc[n][1];
        at[8 * kRed] = acc[n][2], at[8 * kRed + 1] = acc[n][3];
      }
    }
    __syncthreads();
  }

  __device__ float total(int q, int r) const {
    const int row = q * RT + r;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < KG; ++k) s += red[(k * M + row) * kRed + bb];
    return s;
  }
};

// The block type of a kernel: tensor-core blocks (of U units) when Mma, else batch-lane
// blocks for BT >= 16, else Block.
template <typename T, int RT, int Rows, int BT, bool Mma, int U>
using BlockFor = std::conditional_t<
    Mma, MmaBlock<T, RT, Rows, BT, U>,
    std::conditional_t<(BT >= 16), LaneBlock<T, RT, Rows, BT>, Block<T, RT, BT>>>;

}  // namespace
}  // namespace seqkern::cuda::rnn
