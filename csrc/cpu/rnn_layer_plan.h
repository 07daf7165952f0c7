// How the CPU layer (rnn_layer.cpp, rnn_layer_bwd.cpp, rnn_layer_team.cpp) lays a sequence
// out: its steps, the blocks of batch rows its threads take, the chunks of steps whose
// products run together, and the workspace the forward leaves for the backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "rnn_kernels.h"
#include "round_bf16_kernel.h"
#include "threads.h"

namespace seqkern::cpu {

// Step s (in processing order) covers rows [0, rows) of the batch at row `offset` of the
// flattened input [N, I]: t * B for a padded input, the sum of earlier batch_sizes for a
// packed one.
struct Step {
  int64_t offset, rows;
};

// Consecutive steps [first, last) and the contiguous range of flat input rows they cover.
struct StepChunk {
  size_t first, last;
  int64_t row0, rows;
};

// The workspace the forward leaves for the backward: four blocks, each [N, width] row-major,
// one row per (step, live batch row) like the flattened input: the cell's saved gates, the
// state entering the step (h_prev, P wide) and, for LSTM, c_prev and c_new; with a
// projection (LSTM proj_size: the state is h = h_full W_hr^T, P < H) also h_full.
struct Workspace {
  int64_t N, H, P, saved_width;
  bool lstm, proj;
  int64_t numel() const { return N * (saved_width + P + (lstm ? 2 * H : 0) + (proj ? H : 0)); }
  template <typename T> T* saved(T* base) const { return base; }
  template <typename T> T* h_prev(T* base) const { return base + N * saved_width; }
  template <typename T> T* c_prev(T* base) const { return base + N * (saved_width + P); }
  template <typename T> T* c_new(T* base) const { return base + N * (saved_width + P + H); }
  int64_t h_full_offset() const { return N * (saved_width + P + 2 * H); }
  template <typename T> T* h_full(T* base) const { return base + h_full_offset(); }
};

// Whether an fp32 forward without a projection is too small to share between threads: its
// weights (W_ih and W_hh, [G*H, I + H], at most 512 KiB) fit one core's L2 and its products
// are at most 0.6 MFLOP, so that the fork/joins and barriers of two threads cost more than
// they save (rnn_layer_plan.cpp). The caller then runs it all on its own thread (OneThread,
// threads.h).
bool forward_on_one_thread(int64_t rows, int64_t gate_rows, int64_t in, int64_t state);

// Whether a layer's weights are multiplied as given (keep_weight, keep_rows) instead of packed
// into panels first (rnn_layer_plan.cpp), on fp32 or (bf16) bf16 products: W_ih, used once a
// chunk of steps on its rows (the input projection, dx); W_hh, once a step on its live rows.
bool w_ih_in_place(size_t chunks, int64_t rows, bool bf16);
bool w_hh_in_place(size_t steps, int64_t batch, bool bf16);
bool w_hh_in_place_backward(size_t steps, int64_t batch);  // fp32 products

// Which loop and operands a layer call (forward or backward) ran, logged per thread for the
// tests (seqkern_C::rnn_layer_cpu_paths returns and forgets this thread's calls since it last
// asked, the newest kPathLog kept): the tests written for one path (team or row split,
// weights packed or as given, bf16 products) assert that it ran, so that a change of threshold
// cannot move them silently onto another. row_blocks: the row split's blocks (1: none, the
// team loop or one block with each step's product parallel inside).
struct LayerPath {
  bool backward, team, bf16, w_ih_in_place, w_hh_in_place;
  int64_t row_blocks;
};
void log_layer_path(const LayerPath& path);
// "fwd team=1 row_blocks=1 bf16=0 w_ih=in_place w_hh=packed", one a call, oldest first.
std::vector<std::string> take_layer_paths();

// The steps of a layer in processing order (reverse: the last first) for a padded input
// [T, B, I] or packed data with batch_sizes (rnn_layer_plan.cpp).
std::vector<Step> make_steps(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                             bool reverse);

// float32 layers with fewer than 16 rows per thread split the hidden units instead
// (rnn_layer_team.h). Otherwise:
// Batch rows never interact in a recurrence, so the time loop runs once per block of rows,
// the blocks in parallel with no synchronisation between steps (a barrier per step, which
// a column split of each step needs, costs milliseconds whenever another process holds a
// core). Blocks are balanced by work: rows are sorted by length (packed sequences), so the
// split follows the cumulative count of live (step, row) pairs. With a spinning process on
// one of the two cores, B = 64 LSTM inference took 100-147 ms in four blocks claimed as the
// threads finish, 119-168 ms in two fixed ones (quiet: 57-62 ms either way). With fewer than
// four rows per thread one block takes all rows and each step's product and cell run in parallel:
// a block of one or two rows streams all of W_hh for almost no work (B=4, T=256, H=512
// LSTM inference: 18.9 ms in two blocks, 13.8-15.0 ms in one; oneDNN 18-20 ms).
std::vector<std::pair<int64_t, int64_t>> row_blocks(const std::vector<Step>& steps,
                                                    int64_t batch);

// Runs body(lo, hi) for each row block, in parallel when there are several: each thread
// claims the next unclaimed block until none is left.
template <typename Body>
void for_row_blocks(const std::vector<std::pair<int64_t, int64_t>>& blocks, const Body& body) {
  if (blocks.size() == 1) return body(blocks[0].first, blocks[0].second);
  // The body calls ATen ops: the workers take the caller's dispatch state (this op runs
  // below autograd) instead of their own.
  const at::ThreadLocalState caller_state;
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(kernel_threads(), int64_t(blocks.size()));
  parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (size_t b = next++; b < blocks.size(); b = next++) body(blocks[b].first, blocks[b].second);
  });
}

// Consecutive steps whose rows fill about chunk_bytes of gates (at least one step).
std::vector<StepChunk> step_chunks(const std::vector<Step>& steps, int64_t row_bytes,
                                   int64_t chunk_bytes);

// dst[r, u0:u1] += src[r, u0:u1] for r < n; dst row-major (row stride ld_dst), src read
// through its strides (the output gradient: out.sum()'s is one value expanded, all strides 0).
template <typename T>
void add_strided_rows(T* dst, int64_t ld_dst, const T* src, int64_t row_stride,
                      int64_t col_stride, int64_t n, int64_t u0, int64_t u1) {
  for (int64_t r = 0; r < n; ++r, dst += ld_dst, src += row_stride) {
    if (col_stride == 1) {
      for (int64_t j = u0; j < u1; ++j) dst[j] += src[j];
    } else {
      for (int64_t j = u0; j < u1; ++j) dst[j] += src[j * col_stride];
    }
  }
}

// dst[r, u0:u1] = src[r, u0:u1] rounded to bf16, for r < n (both row strides ld): a left
// operand of the bf16 products (the state, a step's gate gradients).
template <typename S>
void round_units_bf16(const S* src, at::BFloat16* dst, int64_t ld, int64_t n, int64_t u0,
                      int64_t u1) {
  if constexpr (std::is_same_v<S, float>) {
    run_round_rows_bf16(src + u0, n, u1 - u0, ld, dst + u0, ld);
  } else {  // instantiated for double, never called with it (bf16 products compute in fp32)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t u = u0; u < u1; ++u) dst[r * ld + u] = at::BFloat16(float(src[r * ld + u]));
  }
}

inline Workspace workspace_layout(RnnMode mode, int64_t N, int64_t H, int64_t P) {
  const int64_t saved = mode == RnnMode::kLSTM || mode == RnnMode::kGRU ? 4 * H : H;
  return {N, H, P, saved, mode == RnnMode::kLSTM, P != H};
}

}  // namespace seqkern::cpu
