// One recurrent layer, one direction, over a whole (optionally packed) sequence on CUDA:
// the recurrences of rnn_layer_fwd / rnn_layer_bwd (rnn.h). The input projection before
// and the weight gradients after are cuBLAS GEMMs made by the binding.
//
// Persistent design. A step is a tiny product (B rows of h against G*H rows of W_hh) whose
// cost is latency, so one cooperative launch runs every step: block k owns `units` hidden
// units (all G gates of them), keeps its slice of W_hh (forward) or of W_hh^T (backward)
// in shared memory for the whole sequence, reads the previous state (or the previous
// step's gate gradients) from L2 into shared memory, computes its gates with the fused cell
// and writes its slice of the new state; a grid-wide barrier separates the steps. When the
// slices do not fit in the co-resident blocks' shared memory (or cooperative launch is not
// available) the same kernel runs one launch per step, reading W_hh from L2.
//
// The recurrence kernels and the grid barrier are in rnn_layer_kernels.cuh, the blocks that
// multiply (Block, LaneBlock, MmaBlock) in rnn_layer_blocks.cuh; here the plans, the packed
// weights, the step table and the launches.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "rnn.h"
#include "rnn_layer_blocks.cuh"
#include "rnn_layer_kernels.cuh"

namespace seqkern::cuda::rnn {
namespace {

constexpr int kPad = 8;        // K padded to a multiple of 8: 16-byte rows in every dtype
constexpr int kUnitPad = 16;   // packed weights hold a multiple of 16 units (the widest block)
constexpr int kBatchTiles[3] = {1, 4, 8};
constexpr int kLaneMinBatch = 9;   // batch-lane blocks: the smallest batch they take
constexpr int kLaneDefaultMinBatch = 64;  // ... and by default (forward only), use_lanes
constexpr int kMmaDefaultMinBatch = 4;  // tensor-core blocks by default (fp16/bf16), use_mma

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename T>
__global__ void pack_w_kernel(const T* __restrict__ w, int64_t s0, int64_t s1, int G, int H,
                              int Kp, int64_t total, bool transpose, T* __restrict__ out) {
  // forward: out[(jj * G + g) * Kp + k] = W[g H + jj, k]; backward: out[jj * Kp + r] = W[r, jj]
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % Kp, rest = i / Kp;
    float v = 0.f;
    if (transpose) {
      if (rest < H && k < int64_t(G) * H) v = dev::to_float(w[k * s0 + rest * s1]);
    } else {
      const int64_t g = rest % G, jj = rest / G;
      if (jj < H && k < H) v = dev::to_float(w[(g * H + jj) * s0 + k * s1]);
    }
    out[i] = dev::from_float<T>(v);
  }
}

// The fp32 state (both parities) from h0, c0; h_n, c_n = h0, c0 (rows with no step keep
// them).
template <typename T>
__global__ void init_state_kernel(int64_t B, int64_t H, Strided2 h0, Strided2 c0,
                                  float* h_state, float* c_state, T* h_n, T* c_n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * H;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / H, jj = i - b * H;
    const T h = static_cast<const T*>(h0.data)[b * h0.s0 + jj * h0.s1];
    h_state[i] = h_state[B * H + i] = dev::to_float(h);
    h_n[i] = h;
    if (c_state) {
      const T c = static_cast<const T*>(c0.data)[b * c0.s0 + jj * c0.s1];
      c_state[i] = dev::to_float(c);
      c_n[i] = c;
    }
  }
}

// Tensor-core blocks' copy of the initial state (KernelArgs::op, both parities, row stride
// op_ld), from the fp32 state init_state_kernel wrote.
template <typename T>
__global__ void init_op_kernel(int64_t B, int64_t H, const float* h_state, T* op,
                               int64_t op_ld) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * H;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / H, jj = i - b * H;
    op[b * op_ld + jj] = op[(B + b) * op_ld + jj] = op_value<T>(h_state[i]);
  }
}

int grid_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + 255) / 256, 1 << 16));
}

size_t elem_size(DType d) { return d == DType::kFloat ? 4 : 2; }

// Byte offsets in a call's scratch: barrier counter, step table, (forward) the fp32 states,
// packed weights, the operand's copy for tensor-core blocks (KernelArgs::op, op_bytes).
struct Scratch {
  size_t steps = 256, h_state = 0, c_state = 0, w = 0, op = 0, op_bytes = 0, total = 0;
  int64_t op_ld = 0;  // the operand copy's row stride: K rounded up to kPad
};

Scratch scratch_layout(const LayerProblem& p, bool backward) {
  const auto al = [](int64_t bytes) { return size_t(round_up(bytes, 256)); };
  const int64_t G = gate_count(p.cell), H = p.hidden, BH = p.batch * H;
  Scratch s;
  size_t at = s.steps + al(p.steps * 2 * int64_t(sizeof(int)));
  if (!backward) {
    s.h_state = at, at += al(2 * BH * 4);
    s.c_state = at, at += p.cell == CellKind::kLSTM ? al(BH * 4) : 0;
  }
  const int64_t Hr = round_up(H, kUnitPad);
  const int64_t w_elems = backward ? Hr * round_up(G * H, kPad) : Hr * G * round_up(H, kPad);
  s.w = at, at += al(w_elems * int64_t(elem_size(p.dtype)));
  s.op_ld = round_up(backward ? G * H : H, kPad);
  s.op = at, s.op_bytes = size_t(2 * p.batch * s.op_ld * int64_t(elem_size(p.dtype)));
  s.total = at + al(s.op_bytes);
  return s;
}

// [S][2] (row offset, live rows) in processing order: a packed sequence's, from its
// batch_sizes on the host.
std::vector<int> step_table(const LayerProblem& p) {
  std::vector<int> offsets(p.steps + 1, 0), t(2 * p.steps);
  for (int64_t s = 0; s < p.steps; ++s)
    offsets[s + 1] = int(offsets[s] + (p.batch_sizes ? p.batch_sizes[s] : p.batch));
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t time = p.reverse ? p.steps - 1 - s : s;
    t[2 * s] = offsets[time], t[2 * s + 1] = offsets[time + 1] - offsets[time];
  }
  return t;
}

// The same table for a padded sequence (every step B rows), made on the device: no copy from
// host memory, which a captured CUDA graph would replay from a buffer long freed.
__global__ void padded_steps_kernel(int S, int B, bool reverse, int* steps) {
  for (int s = blockIdx.x * blockDim.x + threadIdx.x; s < S; s += gridDim.x * blockDim.x) {
    const int t = reverse ? S - 1 - s : s;
    steps[2 * s] = t * B, steps[2 * s + 1] = B;
  }
}

// A packed sequence's table, carried to the device in the parameters of kernels that write
// it, kStepsPerLaunch steps a launch. Not cudaMemcpyAsync from the host vector: from pageable
// memory the driver may wait for the stream's earlier work before it returns (the CUDA
// runtime's "API synchronization behavior"), which held the host back at every packed layer
// call, and a captured CUDA graph would replay the copy from a buffer long freed. Launch
// parameters are copied at the launch, into the graph too.
constexpr int kStepsPerLaunch = 480;  // 3.8 KB of parameters, under the 4 KB every GPU takes
struct StepChunk {
  int first = 0, count = 0;        // steps [first, first + count)
  int v[2 * kStepsPerLaunch] = {};  // their (row offset, live rows)
};
__global__ void packed_steps_kernel(const StepChunk chunk, int* steps) {
  for (int i = threadIdx.x; i < 2 * chunk.count; i += blockDim.x)
    steps[2 * chunk.first + i] = chunk.v[i];
}

// wide: the backward's tensor-core blocks of kMmaUnitsWide units (16-row tiles only).
template <class Cell, typename T>
const void* kernel_ptr(bool backward, int bt, bool mma = false, bool wide = false) {
  const auto pick = [&](auto fwd, auto bwd) {
    return backward ? reinterpret_cast<const void*>(bwd) : reinterpret_cast<const void*>(fwd);
  };
  if (mma && wide) {
    return backward && bt == 16 ? reinterpret_cast<const void*>(
                                      &layer_bwd_kernel<Cell, T, 16, true, kMmaUnitsWide>)
                                : nullptr;
  }
  if (mma) {  // 16- or 32-row tiles
    if (bt == 16)
      return pick(&layer_fwd_kernel<Cell, T, 16, true>, &layer_bwd_kernel<Cell, T, 16, true>);
    if (bt == 32)
      return pick(&layer_fwd_kernel<Cell, T, 32, true>, &layer_bwd_kernel<Cell, T, 32, true>);
    return nullptr;
  }
  if (bt == 1)
    return pick(&layer_fwd_kernel<Cell, T, 1, false>, &layer_bwd_kernel<Cell, T, 1, false>);
  if (bt == 4)
    return pick(&layer_fwd_kernel<Cell, T, 4, false>, &layer_bwd_kernel<Cell, T, 4, false>);
  if (bt == 16)
    return pick(&layer_fwd_kernel<Cell, T, 16, false>, &layer_bwd_kernel<Cell, T, 16, false>);
  if (bt == 32)
    return pick(&layer_fwd_kernel<Cell, T, 32, false>, &layer_bwd_kernel<Cell, T, 32, false>);
  // 64-row tiles are forward only (the backward's 8 units a block take at most 32 rows).
  if (bt == 64)
    return backward ? nullptr
                    : reinterpret_cast<const void*>(&layer_fwd_kernel<Cell, T, 64, false>);
  return pick(&layer_fwd_kernel<Cell, T, 8, false>, &layer_bwd_kernel<Cell, T, 8, false>);
}

// A SEQKERN_CUDA_RNN_<name> switch, read at every plan: 1 or 0 where it starts with '1' or
// '0', -1 where it is unset (the default decides).
int rnn_switch(const char* name) {
  const std::string var = std::string("SEQKERN_CUDA_RNN_") + name;
  const char* v = std::getenv(var.c_str());
  return v && v[0] == '1' ? 1 : v && v[0] == '0' ? 0 : -1;
}

bool use_lanes(const LayerProblem& p, bool backward) {
  const int lanes = rnn_switch("LANES");
  if (lanes >= 0) return lanes == 1 && p.batch >= kLaneMinBatch;
  return !backward && p.batch >= kLaneDefaultMinBatch;
}

// Whether all `blocks` blocks of kernel, with smem bytes of dynamic shared memory, are
// co-resident (what a cooperative launch needs). The kernel's limit is set to the device
// maximum, not smem: calls planning other sizes may run concurrently.
bool all_resident(const void* kernel, int blocks, size_t smem, int sms, int max_smem,
                  cudaError_t* err) {
  *err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
  int occupancy = 0;
  if (*err == cudaSuccess)
    *err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, kernel, kThreads, smem);
  return *err == cudaSuccess && blocks <= occupancy * sms;
}

// K staged in chunks beside `fixed` bytes of shared memory (the weight slice, the partial
// sums): bt rows of `elem`-byte elements, each row padded by `pad` elements; K (a multiple
// of `step`) in as few chunks of kc columns (a multiple of step, at least min_kc) as fit, the
// last one shorter where K is not a multiple of kc. false when min_kc columns do not fit.
bool stage_in_chunks(int64_t K, int64_t fixed, int bt, int64_t elem, int pad, int step,
                     int64_t min_kc, int max_smem, int64_t* kc, size_t* smem) {
  const int64_t fit = ((max_smem - fixed) / (bt * elem) - pad) / step * step;
  if (fit < min_kc) return false;
  const int64_t chunks = (K + fit - 1) / fit;
  *kc = round_up((K + chunks - 1) / chunks, step);
  *smem = size_t(fixed + bt * (*kc + pad) * elem);
  return true;
}

// A persistent batch-lane plan (kLaneUnitsFwd / kLaneUnitsBwd units a block, 16, 32 or 64
// batch rows a pass, at most one (unit, row) a thread) if every block is co-resident: the
// forward stages whole rows; the backward K in as few chunks as fit beside the weight slice
// and the partial sums (room for at least min(128, K) columns required), each a multiple of
// 32 columns, the last one shorter where K is not a multiple of the chunk. false when none
// fits.
template <class Cell, typename T>
bool lane_plan(const LayerProblem& p, bool backward, int sms, int max_smem, LayerPlan* plan,
               cudaError_t* err) {
  const int G = Cell::kGates, units = backward ? kLaneUnitsBwd : kLaneUnitsFwd;
  const int R = backward ? units : units * G;
  const int64_t H = p.hidden, Kp = round_up(backward ? G * H : H, kPad);
  const int bt = std::min(p.batch > 32 ? 64 : p.batch > 16 ? 32 : 16, kThreads / units);
  const int parts = kWarps * 32 / std::min(bt, 32);  // LaneShape<bt>::P
  const int rs = red_stride(bt, units, R / units);
  if (rs < 0) return false;  // no conflict-free stride (not for the units and gates here)
  const int64_t fixed = R * Kp * int64_t(sizeof(T)) + int64_t(parts) * R * rs * 4;
  const int64_t K = round_up(Kp, 32);  // fp32 staged rows, 4-float pads
  int64_t kc = 0;
  size_t smem = 0;
  if (!stage_in_chunks(K, fixed, bt, 4, 4, 32, backward ? std::min<int64_t>(128, K) : K,
                       max_smem, &kc, &smem))
    return false;
  const int blocks = static_cast<int>((H + units - 1) / units);
  if (!all_resident(kernel_ptr<Cell, T>(backward, bt), blocks, smem, sms, max_smem, err))
    return false;
  *plan = {true, units, bt, blocks, smem, int(kc)};
  return true;
}

// Tensor-core blocks (MmaBlock): by default for fp16 / bf16 layers at batch >=
// kMmaDefaultMinBatch, as timed on an H100 (bench/RESULTS.md, 2026-11-26 20:52 UTC: bf16
// fastrnns B64 training step 1.27-1.37x and packed B16 inference 1.2x faster than the CUDA-core
// blocks, B4 within -6%..+10%; B1-B3 untimed, so they keep the CUDA-core blocks).
// SEQKERN_CUDA_RNN_MMA=1: at every batch; =0: never. fp32 layers on TF32 only when asked
// twice (SEQKERN_CUDA_RNN_MMA=1 SEQKERN_CUDA_RNN_TF32=1): on the H100 no faster than the fp32
// blocks (fastrnns 0.96-1.03x, packed training 0.42-0.80x), though cuDNN's fp32 layers do compute
// on TF32 under torch's default torch.backends.cudnn.allow_tf32 (error 3.7e-4 against 4.9e-7
// without it; these blocks 6.3e-5).
template <typename T>
bool use_mma(const LayerProblem& p) {
  const int mma = rnn_switch("MMA");
  if (mma == 0) return false;
  const bool asked = mma == 1;
  if constexpr (std::is_same_v<T, float>) return asked && rnn_switch("TF32") == 1;
  return asked || p.batch >= kMmaDefaultMinBatch;
}

// Tensor-core blocks with two staging buffers (MmaBlock's a.prefetch), opt-in until timed on
// a GPU: SEQKERN_CUDA_RNN_PREFETCH=1.
bool use_prefetch() { return rnn_switch("PREFETCH") == 1; }

// Wider backward blocks, opt-in until timed on a GPU: SEQKERN_CUDA_RNN_WIDE=1. Every block
// stages the whole step's gate gradients (B x G*H: 256 KB bf16, 512 KB fp32 at B64 H512) each
// phase, so the L2 traffic of a phase grows with the block count: H / 8 tensor-core blocks
// (which fill half of their m16 tile with zero rows) and H / 4 CUDA-core ones (fp32's
// default at B64: 64 MB a phase, ~12 us of the H100's L2 bandwidth). Wide: tensor-core blocks
// of kMmaUnitsWide units in 16-row passes (the tile full, half the blocks, twice the passes),
// CUDA-core blocks of at least 8 units.
bool use_wide() { return rnn_switch("WIDE") == 1; }

// Tensor-core blocks over the batch too, opt-in until timed on a GPU: SEQKERN_CUDA_RNN_SPLIT=1.
// A block takes all of a step's rows in passes of 32 (16) one after another: at B64 two
// passes a step, each staging its rows from L2, multiplying, reducing and running the cell
// in turn (the fastrnns forward step took 16.5 us on an H100, against 4.4 us for a B4 step of
// one pass). With as many groups of blocks as the batch has passes and the multiprocessors
// hold (one block each), every block runs one pass a step: at B64 H512, 128 blocks of one
// pass instead of 64 of two, each staging half the rows (the backward: half of the 256 KB of
// gate gradients a block reads a step).
bool use_split() { return rnn_switch("SPLIT") == 1; }

// A persistent tensor-core plan: kMmaUnits units a block (the backward's wide blocks:
// kMmaUnitsWide), 16 or 32 batch rows a pass (wide: 16), the weight slice whole in shared
// memory and the staged rows in as few chunks of kc columns (a multiple of the k step, at
// least min(128, Kpk)) as fit beside it, if every block is co-resident. false when none fits.
template <class Cell, typename T>
bool mma_plan(const LayerProblem& p, bool backward, int sms, int max_smem, LayerPlan* plan,
              cudaError_t* err) {
  const bool wide = backward && use_wide();
  const int units = wide ? kMmaUnitsWide : kMmaUnits;
  const int G = Cell::kGates, R = backward ? units : units * G;
  const int M = (R + 15) / 16 * 16, KG = kWarps / (M / 16);
  const int step = MmaShape<T>::kStep, pad = MmaShape<T>::kPad;
  const int64_t H = p.hidden, Kpk = round_up(round_up(backward ? G * H : H, kPad), step);
  const int bt = !wide && p.batch > 16 ? 32 : 16;
  const int64_t elem = sizeof(T);
  const int64_t fixed = M * (Kpk + pad) * elem +
                       int64_t(KG) * M * red_stride(bt, units, R / units) * 4;
  const int64_t min_kc = std::min<int64_t>(128, Kpk);
  const int blocks = static_cast<int>((H + units - 1) / units);
  const void* kernel = kernel_ptr<Cell, T>(backward, bt, true, wide);
  // use_split: as many batch groups as the step has passes and the multiprocessors hold,
  // one block each; else (or where they are not all co-resident) one.
  const int split = use_split() ? std::max(1, std::min(int((p.batch + bt - 1) / bt),
                                                       sms / std::max(blocks, 1)))
                                : 1;
  // Two staging buffers of bt rows where asked for, they fit and every block stays
  // co-resident with them; else one.
  for (const int groups : {split, 1}) {
    for (const bool two : {true, false}) {
      if (two && !use_prefetch()) continue;
      int64_t kc = 0;
      size_t smem = 0;
      if (!stage_in_chunks(Kpk, fixed, two ? 2 * bt : bt, elem, pad, step, min_kc, max_smem,
                           &kc, &smem))
        continue;
      if (all_resident(kernel, blocks * groups, smem, sms, max_smem, err)) {
        *plan = {true, units, bt, blocks * groups, smem, int(kc), true, two, groups};
        return true;
      }
      if (*err != cudaSuccess) return false;
    }
    if (groups == 1) break;
  }
  return false;
}

// Persistent if some (batch tile, units) has every block co-resident: the largest batch
// tile the batch can use first, then the fewest units that leave each thread >= 8 reduction
// elements, preferring one block per SM. Else one launch per step with 4 units per block.
template <class Cell, typename T>
cudaError_t make_plan(const LayerProblem& p, bool backward, bool allow_persistent,
                      LayerPlan* plan) {
  const int G = Cell::kGates, RT = backward ? kBwdRows : G;
  const int64_t H = p.hidden, Kp = round_up(backward ? G * H : H, kPad);
  int dev = 0, sms = 0, max_smem = 0, coop = 0;
  cudaError_t err = cudaGetDevice(&dev);
  for (auto [attr, value] : {std::pair{cudaDevAttrMultiProcessorCount, &sms},
                             std::pair{cudaDevAttrMaxSharedMemoryPerBlockOptin, &max_smem},
                             std::pair{cudaDevAttrCooperativeLaunch, &coop}})
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(value, attr, dev);
  if (err != cudaSuccess) return err;
  if (allow_persistent && coop && use_mma<T>(p) &&
      (mma_plan<Cell, T>(p, backward, sms, max_smem, plan, &err) || err != cudaSuccess))
    return err;
  if (allow_persistent && coop && use_lanes(p, backward) &&
      (lane_plan<Cell, T>(p, backward, sms, max_smem, plan, &err) || err != cudaSuccess))
    return err;
  const int bt_max = p.batch <= 1 ? 0 : p.batch <= 4 ? 1 : 2;
  const auto smem_for = [&](int groups, int bt, bool w) {
    return size_t((w ? groups * RT * Kp * int64_t(sizeof(T)) : 0) + bt * Kp * 4 +
                  kWarps * pow2_ceil(RT * bt) * 4);
  };
  const int units_fwd[] = {1, 2, 4, 8}, units_bwd[] = {4, 8, 16};
  const int* units = backward ? units_bwd : units_fwd;
  const int n_units = backward ? 3 : 4;
  int first = 0;
  const auto groups_of = [&](int us) { return backward ? us / kBwdRows : us; };
  while (first + 1 < n_units && Kp * groups_of(units[first]) < 8 * kThreads) ++first;
  if (backward && use_wide()) first = std::max(first, 1);  // at least 8 units a block
  for (int bi = bt_max; allow_persistent && coop && bi >= 0; --bi) {
    const void* kernel = kernel_ptr<Cell, T>(backward, kBatchTiles[bi]);
    for (int pass = 0; pass < 2; ++pass) {
      for (int ui = first; ui < n_units; ++ui) {
        const int groups = groups_of(units[ui]);
        const int blocks = static_cast<int>((H + units[ui] - 1) / units[ui]);
        const size_t smem = smem_for(groups, kBatchTiles[bi], true);
        if (smem > size_t(max_smem) || (pass == 0 && blocks > sms)) continue;
        if (!all_resident(kernel, blocks, smem, sms, max_smem, &err)) {
          if (err != cudaSuccess) return err;
          continue;
        }
        *plan = {true, units[ui], kBatchTiles[bi], blocks, smem};
        return cudaSuccess;
      }
    }
  }
  for (int bi = bt_max; bi >= 0; --bi) {
    const int groups = groups_of(4);
    const size_t smem = smem_for(groups, kBatchTiles[bi], false);
    if (smem > size_t(max_smem)) continue;
    err = cudaFuncSetAttribute(kernel_ptr<Cell, T>(backward, kBatchTiles[bi]),
                               cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
    *plan = {false, 4, kBatchTiles[bi], static_cast<int>((H + 3) / 4), smem};
    return err;
  }
  return cudaErrorNotSupported;
}

// Step table, packed weights and barrier into scratch, then the recurrence: one cooperative
// launch, or one launch per phase (the forward has S phases, the backward S + 1).
template <class Cell, typename T>
cudaError_t run_layer(const LayerProblem& p, bool backward, Cell cell, Strided2 w_hh,
                      KernelArgs a, unsigned char* scratch, cudaStream_t stream) {
  const Scratch sc = scratch_layout(p, backward);
  const int G = Cell::kGates;
  const int64_t H = p.hidden, K = backward ? G * H : H, Kp = round_up(K, kPad);
  const int64_t Hr = round_up(H, kUnitPad);
  cudaError_t err = cudaMemsetAsync(scratch, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  int* steps = reinterpret_cast<int*>(scratch + sc.steps);
  if (p.batch_sizes) {
    const std::vector<int> table = step_table(p);
    StepChunk chunk;
    for (int first = 0; first < int(p.steps) && err == cudaSuccess; first += kStepsPerLaunch) {
      chunk.first = first, chunk.count = std::min(kStepsPerLaunch, int(p.steps) - first);
      std::copy_n(table.begin() + 2 * first, 2 * chunk.count, chunk.v);
      packed_steps_kernel<<<1, 256, 0, stream>>>(chunk, steps);
      err = cudaGetLastError();
    }
  } else {
    padded_steps_kernel<<<grid_for(p.steps), 256, 0, stream>>>(int(p.steps), int(p.batch),
                                                                p.reverse, steps);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return err;
  T* w_packed = reinterpret_cast<T*>(scratch + sc.w);
  const int64_t w_elems = backward ? Hr * Kp : Hr * G * Kp;
  pack_w_kernel<T><<<grid_for(w_elems), 256, 0, stream>>>(
      static_cast<const T*>(w_hh.data), w_hh.s0, w_hh.s1, G, int(H), int(Kp), w_elems, backward,
      w_packed);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  a.S = int(p.steps), a.B = int(p.batch), a.H = int(H), a.K = int(K), a.Kp = int(Kp);
  a.vec4 = K % 4 == 0;
  a.steps = reinterpret_cast<const int*>(scratch + sc.steps);
  a.w = w_packed;
  a.barrier = reinterpret_cast<unsigned*>(scratch);
  a.N = rnn_layer_rows(p);
  const int phases = int(p.steps) + (backward ? 1 : 0);
  LayerPlan plan;
  for (bool allow_persistent : {true, false}) {
    if ((err = make_plan<Cell, T>(p, backward, allow_persistent, &plan)) != cudaSuccess) return err;
    a.units = plan.units, a.groups = backward ? plan.units / kBwdRows : plan.units;
    a.batch_groups = plan.batch_groups, a.unit_blocks = plan.blocks / plan.batch_groups;
    a.kc = plan.k_chunk, a.prefetch = plan.prefetch;
    // Batch-lane blocks loop over K in chunks of kc, and the forward reads the previous
    // state from its staged rows: lane_plan guarantees both; a plan that broke them would
    // hang or read stale shared memory. Tensor-core blocks: chunks of whole k steps.
    if (plan.mma ? a.kc < MmaShape<T>::kStep || a.kc % MmaShape<T>::kStep != 0
                 : plan.batch_tile >= 16 && (a.kc < 32 || a.kc % 32 != 0 ||
                                             (!backward && a.kc < Kp)))
      return cudaErrorInvalidValue;
    a.w_in_smem = plan.persistent;
    if (plan.mma) {  // the operand's copy: zero columns K .. Kp, forward: the initial state
      a.op = scratch + sc.op;
      if ((err = cudaMemsetAsync(a.op, 0, sc.op_bytes, stream)) != cudaSuccess) return err;
      if (!backward) {
        init_op_kernel<T><<<grid_for(p.batch * H), 256, 0, stream>>>(
            p.batch, H, a.h_state, static_cast<T*>(a.op), sc.op_ld);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
    }
    const void* kernel = kernel_ptr<Cell, T>(backward, plan.batch_tile, plan.mma,
                                             plan.mma && plan.units == kMmaUnitsWide);
    int begin = 0, end = phases;
    void* args[] = {&cell, &a, &begin, &end};
    if (!plan.persistent) {
      for (int ph = 0; ph < phases && err == cudaSuccess; ++ph) {
        begin = ph, end = ph + 1;
        err = cudaLaunchKernel(kernel, dim3(plan.blocks), dim3(kThreads), args, plan.smem_bytes,
                               stream);
      }
      return err;
    }
    err = cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kThreads), args,
                                      plan.smem_bytes, stream);
    if (err != cudaErrorCooperativeLaunchTooLarge) return err;
    (void)cudaGetLastError();  // fewer co-resident blocks than the occupancy query said
  }
  return err;
}

}  // namespace

size_t rnn_layer_fwd_scratch_bytes(const LayerProblem& p) { return scratch_layout(p, false).total; }
size_t rnn_layer_bwd_scratch_bytes(const LayerProblem& p) { return scratch_layout(p, true).total; }

cudaError_t rnn_layer_plan(const LayerProblem& p, bool backward, LayerPlan* plan) {
  if (!rnn_layer_supported(p)) return cudaErrorNotSupported;
  return dev::with_cell_and_type(p.cell, p.dtype, [&](auto cell, auto t) {
    return make_plan<decltype(cell), decltype(t)>(p, backward, true, plan);
  });
}

cudaError_t rnn_layer_fwd(const LayerProblem& p, const float* x_gates, const float* bias_x,
                          const float* bias_hn, Strided2 w_hh, Strided2 h0, Strided2 c0,
                          void* out, void* h_n, void* c_n, float* workspace, void* scratch,
                          cudaStream_t stream) {
  if (!rnn_layer_supported(p)) return cudaErrorNotSupported;
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  return dev::with_cell_and_type(p.cell, p.dtype, [&](auto cell, auto t) {
    using T = decltype(t);
    const Scratch sc = scratch_layout(p, false);
    auto* base = static_cast<unsigned char*>(scratch);
    KernelArgs a;
    a.h_state = reinterpret_cast<float*>(base + sc.h_state);
    a.c_state = p.cell == CellKind::kLSTM ? reinterpret_cast<float*>(base + sc.c_state) : nullptr;
    init_state_kernel<T><<<grid_for(p.batch * p.hidden), 256, 0, stream>>>(
        p.batch, p.hidden, h0, c0, a.h_state, a.c_state, static_cast<T*>(h_n),
        static_cast<T*>(c_n));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.steps == 0) return err;
    a.x_gates = x_gates, a.bias_x = bias_x, a.bias_hn = bias_hn;
    a.out = out, a.h_n = h_n, a.c_n = c_n, a.ws = workspace;
    return run_layer<decltype(cell), T>(p, false, cell, w_hh, a, base, stream);
  });
}

cudaError_t rnn_layer_bwd(const LayerProblem& p, Strided2 w_hh, const float* workspace,
                          const void* grad_out, float* d_h, float* d_c, float* d_gates_x,
                          float* d_gates_h, void* scratch, cudaStream_t stream) {
  if (!rnn_layer_supported(p)) return cudaErrorNotSupported;
  if (p.batch == 0 || p.hidden == 0 || p.steps == 0) return cudaSuccess;
  return dev::with_cell_and_type(p.cell, p.dtype, [&](auto cell, auto t) {
    KernelArgs a;
    a.ws = const_cast<float*>(workspace);  // read only in the backward
    a.grad_out = grad_out, a.d_h = d_h, a.d_c = d_c, a.d_gx = d_gates_x, a.d_gh = d_gates_h;
    return run_layer<decltype(cell), decltype(t)>(p, true, cell, w_hh, a,
                                                  static_cast<unsigned char*>(scratch), stream);
  });
}

}  // namespace seqkern::cuda::rnn
