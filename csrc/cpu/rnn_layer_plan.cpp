// The CPU layer's plan (rnn_layer_plan.h): its steps, row blocks and chunks of steps.
#include "rnn_layer_plan.h"

#include <cstdlib>

namespace seqkern::cpu {

// forward_on_one_thread. Measured (bench/RESULTS.md, "one thread for the smallest layer
// calls"): the C++ op on one thread against two, fp32, I = H, T1 B1 to B8 and T16 / T100 at
// B1 / B4, three runs. One thread was faster in every run up to ~0.5 MFLOP with the weights in
// one core's L2: RNN H128 T1 B1 1.28-1.41x, B8 1.33-1.47x; RNN H256 T1 B1 1.12-1.18x; GRU H128
// T1 B1 1.18-1.70x; LSTM H128 T1 B1 1.15-1.18x. Around 1 MFLOP the runs disagreed (RNN H256 T1
// B4 0.95-1.04x, GRU H128 T1 B4 0.98-1.43x, LSTM H128 T1 B4 0.88-1.38x, RNN H128 T16 B1
// 0.94-1.13x); beyond, two threads won (GRU H256 T1 B1, 1.5 MB of weights: 1.25x; LSTM H128
// T16 B1 1.39x). A cell's step (parallel in its products only) gained 8-15% from one thread at
// H128 B1 alone: not changed.
// SEQKERN_CPU_ONE_THREAD_CALLS=0 turns it off (tests/test_rnn_layers_cpu.py: its small cases
// are for the team loop and the row split).
bool forward_on_one_thread(int64_t rows, int64_t gate_rows, int64_t in, int64_t state) {
  constexpr int64_t kWeightBytes = int64_t(512) << 10, kFlops = 600'000;
  const int64_t weights = gate_rows * (in + state);
  if (weights * int64_t(sizeof(float)) > kWeightBytes || 2 * rows * weights > kFlops)
    return false;
  const char* env = std::getenv("SEQKERN_CPU_ONE_THREAD_CALLS");
  return env == nullptr || env[0] != '0';
}

// Packing copies the whole weight (a transpose for the forward's W^T), which for a decoding
// step (T = 1, small B) costs several times its products (forward, GRU H = 512, B = 1: 248 ->
// 49 us a layer, LSTM H = 1024: 1580 -> 205). Products on the weight as given are slower per
// row than brgemm on panels (the forward's dot products most), so packing pays once a weight
// meets enough rows. Measured on the forward (bench/RESULTS.md, "decoding steps"; LSTM and
// GRU, H = 256 to 1024): W_ih, one product over the chunk's rows: as given up to 32 rows
// (0.88-1.14x at 64); W_hh, one product a step: up to 32 rows over all steps, or T <= 2 steps
// of up to 128 rows (1.11-1.42x at T = 1, 2 and B = 64, 128; 0.81-1.14x for T = 4 and 8 at
// 64 rows).
// bf16 products: up to 8 rows only (T1 B1 2.9-4.5x, T1 B8 1.5-1.7x; at 16 rows 0.85-1.7x,
// at 32 0.75-1.0x), as brgemm's bf16 kernels take pairs of k a multiply-add where rows_dot
// converts to fp32.
bool w_ih_in_place(size_t chunks, int64_t rows, bool bf16) {
  return chunks == 1 && rows <= (bf16 ? 8 : 32);
}
bool w_hh_in_place(size_t steps, int64_t batch, bool bf16) {
  if (bf16) return int64_t(steps) * batch <= 8;
  return int64_t(steps) * batch <= 32 || (steps <= 2 && batch <= 128);
}
// The backward (fp32; brgemm through W's row stride instead of panels), measured apart
// (training steps, backward as given against packed, LSTM and GRU at H = 256 to 1024): 1.1-1.7x
// at T1 B1 to B32 and T4 B8, T8 B4 for H >= 512 (GRU H256 1.07-1.44x, LSTM H256 0.85x); at
// T1 / T2 with 64-128 rows 0.94-1.30x, at T32 B1 0.90-1.15x: up to 32 rows and 8 steps.
bool w_hh_in_place_backward(size_t steps, int64_t batch) {
  return int64_t(steps) * batch <= 32 && steps <= 8;
}

namespace {
constexpr size_t kPathLog = 64;
thread_local std::vector<LayerPath> path_log;
}  // namespace

void log_layer_path(const LayerPath& path) {
  if (path_log.size() >= kPathLog) path_log.erase(path_log.begin());
  path_log.push_back(path);
}

std::vector<std::string> take_layer_paths() {
  std::vector<std::string> out;
  for (const LayerPath& p : path_log) {
    const auto where = [](bool in_place) { return in_place ? "in_place" : "packed"; };
    out.push_back(std::string(p.backward ? "bwd" : "fwd") + " team=" + (p.team ? "1" : "0") +
                  " row_blocks=" + std::to_string(p.row_blocks) + " bf16=" +
                  (p.bf16 ? "1" : "0") + " w_ih=" + where(p.w_ih_in_place) +
                  " w_hh=" + where(p.w_hh_in_place));
  }
  path_log.clear();
  return out;
}

std::vector<Step> make_steps(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                             bool reverse) {
  std::vector<Step> steps;
  if (batch_sizes) {
    const at::Tensor sizes = batch_sizes->to(at::kLong).contiguous();
    const int64_t* s = sizes.data_ptr<int64_t>();
    int64_t offset = 0;
    for (int64_t t = 0; t < sizes.numel(); ++t) {
      steps.push_back({offset, s[t]});
      offset += s[t];
    }
  } else {
    const int64_t T = input.size(0), B = input.size(1);
    for (int64_t t = 0; t < T; ++t) steps.push_back({t * B, B});
  }
  if (reverse) std::reverse(steps.begin(), steps.end());
  return steps;
}

std::vector<std::pair<int64_t, int64_t>> row_blocks(const std::vector<Step>& steps,
                                                    int64_t batch) {
  const int64_t threads = kernel_threads();
  if (threads < 2 || batch < 4 * threads || at::in_parallel_region()) return {{0, batch}};
  // Two blocks a thread where each keeps at least kBlockRows rows, else one, claimed by the
  // threads as they finish (for_row_blocks): a thread that loses part of its core to another
  // process takes fewer blocks instead of holding the others up. A whole number of blocks a
  // thread, so that a quiet machine's threads finish together.
  constexpr int64_t kBlockRows = 16;
  const int64_t n_blocks = batch >= 2 * threads * kBlockRows ? 2 * threads : threads;
  std::vector<int64_t> work(batch, 0);  // live steps of each row
  for (const Step& s : steps)
    for (int64_t r = 0; r < s.rows; ++r) ++work[r];
  int64_t total = 0;
  for (int64_t w : work) total += w;
  std::vector<std::pair<int64_t, int64_t>> blocks;
  int64_t start = 0, done = 0;
  for (int64_t r = 0; r < batch; ++r) {
    done += work[r];
    const int64_t target = total * (int64_t(blocks.size()) + 1) / n_blocks;
    if ((done >= target && int64_t(blocks.size()) < n_blocks - 1) || r == batch - 1) {
      blocks.push_back({start, r + 1});
      start = r + 1;
    }
  }
  return blocks;
}

std::vector<StepChunk> step_chunks(const std::vector<Step>& steps, int64_t row_bytes,
                                   int64_t chunk_bytes) {
  std::vector<StepChunk> chunks;
  const int64_t budget = std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, row_bytes));
  for (size_t i = 0; i < steps.size();) {
    StepChunk c{i, i, steps[i].offset, 0};
    while (c.last < steps.size() && (c.last == i || c.rows + steps[c.last].rows <= budget)) {
      c.row0 = std::min(c.row0, steps[c.last].offset);  // reverse: offsets go down
      c.rows += steps[c.last].rows;
      ++c.last;
    }
    chunks.push_back(c);
    i = c.last;
  }
  return chunks;
}

}  // namespace seqkern::cpu
