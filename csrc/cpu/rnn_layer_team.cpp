// The team time loops of rnn_layer_team.h: hidden units split over the threads of one
// OpenMP parallel region per chunk of steps, one barrier per step.
#include "rnn_layer_team.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <atomic>
#include <cstring>
#include <exception>

namespace seqkern::cpu {
namespace {

// Fewer rows than this per thread: the team loop; more: the row split, whose threads never
// wait for each other and whose per-thread products are wide enough (see use_team).
constexpr int64_t kTeamMaxRowsPerThread = 16;

// dst[r, u0:u1] = src[r, u0:u1] for r < n.
template <typename T>
void copy_units(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t n, int64_t u0,
                int64_t u1) {
  for (int64_t r = 0; r < n; ++r)
    std::memcpy(dst + r * ld_dst + u0, src + r * ld_src + u0, (u1 - u0) * sizeof(T));
}

// Runs body(u0, u1, i, phase) for every step i of the chunk (in order, or reversed) and phase
// 0 .. phases - 1 on every thread of one parallel region, [u0, u1) being the thread's hidden
// units (whole panels; empty for threads beyond the panel count). The team meets at a barrier
// between the phases of a step, and after its last one when barrier_after_step. An exception
// ends the work but not the barriers, and is rethrown on the caller's thread.
template <typename Body>
void for_team_steps(int64_t H, const StepChunk& chunk, bool reversed, int phases,
                    bool barrier_after_step, const Body& body) {
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  // No num_threads clause: ATen leaves it out too (GOMP's pool, pytorch#32008); the team is
  // at::get_num_threads() threads, and its real size is asked inside.
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t panels = H / kPanelWidth;
    const int64_t u0 = panels * t / threads * kPanelWidth;
    const int64_t u1 = panels * (t + 1) / threads * kPanelWidth;
    const size_t count = chunk.last - chunk.first;
    for (size_t k = 0; k < count; ++k) {
      const size_t i = reversed ? chunk.last - 1 - k : chunk.first + k;
      for (int phase = 0; phase < phases; ++phase) {
        if (u1 > u0 && !failed.load(std::memory_order_relaxed)) {
          try {
            body(u0, u1, i, phase);
          } catch (...) {
            if (!failed.exchange(true)) error = std::current_exception();
          }
        }
        if (phase + 1 < phases || barrier_after_step) {
#pragma omp barrier
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

bool use_team(bool float32, bool proj, int64_t batch, int64_t H) {
  const int64_t threads = kernel_threads();
  // Every thread owns at least one panel: a thread with none would only wait at the
  // barriers (and the team was measured on two cores only).
  if (!float32 || proj || threads < 2 || at::in_parallel_region() || H % kPanelWidth != 0 ||
      H / kPanelWidth < threads || batch >= kTeamMaxRowsPerThread * threads)
    return false;
  return true;
}

void team_forward_chunk(const TeamForward& a) {
  const int64_t H = a.H, G = gate_count(a.mode), GH = G * H;
  const bool lstm = a.mode == RnnMode::kLSTM;
  // One phase a step, then the barrier: the next step's product reads every unit of h.
  for_team_steps(H, a.chunk, false, 1, true, [&](int64_t u0, int64_t u1, size_t i, int) {
    const Step& s = (*a.steps)[i];
    const int64_t n = s.rows, row = s.offset;
    const bool backwards = i % 2 == 1;  // alternate the walk over W_hh (step_product)
    const float* h_cur = a.h[i % 2];
    float* h_next = a.h[(i + 1) % 2];
    if (a.ws_base) {
      copy_units(h_cur, H, a.ws.h_prev(a.ws_base) + row * H, H, n, u0, u1);
      if (lstm) copy_units(a.c, H, a.ws.c_prev(a.ws_base) + row * H, H, n, u0, u1);
    }
    if (a.bias_h) {
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < G; ++g)
          std::memcpy(a.h_gates + r * GH + g * H + u0, a.bias_h + g * H + u0,
                      (u1 - u0) * sizeof(float));
    }
    // The own columns of every gate: panels (g H + u0) / 64 on.
    for (int64_t k = 0; k < G; ++k) {
      const int64_t g = backwards ? G - 1 - k : k;
      if (a.h_bf16[0])
        panel_matmul_raw(n, a.h_bf16[i % 2], H, *a.whh_t, (g * H + u0) / kPanelWidth,
                         (u1 - u0) / kPanelWidth, a.h_gates, GH, a.bias_h != nullptr, backwards);
      else
        panel_matmul_raw(n, h_cur, H, *a.whh_t, (g * H + u0) / kPanelWidth,
                         (u1 - u0) / kPanelWidth, a.h_gates, GH, a.bias_h != nullptr, backwards);
    }
    float* saved = a.ws_base ? a.ws.saved(a.ws_base) + row * a.ws.saved_width : nullptr;
    run_rnn_step_fwd<float>(a.mode, n, H, a.x_gates + (row - a.chunk.row0) * GH, a.x_bias,
                            a.h_gates, h_cur, h_next, a.c, saved, u0, u1);
    if (lstm && a.ws_base) copy_units(a.c, H, a.ws.c_new(a.ws_base) + row * H, H, n, u0, u1);
    if (a.h_bf16[0]) {  // the own units of the next step's bf16 left operand, and of out
      round_units_bf16(h_next, a.h_bf16[(i + 1) % 2], H, n, u0, u1);
      copy_units(a.h_bf16[(i + 1) % 2], H, a.out_bf16 + row * H, H, n, u0, u1);
    } else {
      copy_units(h_next, H, a.out + row * H, H, n, u0, u1);
    }
  });
}

void team_backward_chunk(const TeamBackward& a) {
  const int64_t H = a.H, G = gate_count(a.mode), GH = G * H;
  const bool lstm = a.mode == RnnMode::kLSTM, gru = a.mode == RnnMode::kGRU;
  const float* base = a.ws_base;
  // Two phases a step, the barrier between them: the pointwise gradient of the own units
  // (which needs only the own columns of dh, written by the owner's previous product), then the
  // own columns of dh_prev += dG W_hh (which reads every unit of dG; the next step's
  // pointwise writes other rows of the gate buffers and only its own columns of dh, so no
  // barrier after it).
  for_team_steps(H, a.chunk, true, 2, false, [&](int64_t u0, int64_t u1, size_t i, int phase) {
    const Step& s = (*a.steps)[i];
    const int64_t n = s.rows, row = s.offset, chunk_row = row - a.chunk.row0;
    if (phase == 0) {
      if (a.d_out)
        add_strided_rows(a.dh, H, a.d_out + row * a.d_out_row_stride, a.d_out_row_stride,
                         a.d_out_col_stride, n, u0, u1);
      run_rnn_step_bwd<float>(a.mode, n, H, a.ws.saved(base) + row * a.ws.saved_width,
                              lstm ? a.ws.c_new(base) + row * H : nullptr,
                              lstm ? a.ws.c_prev(base) + row * H : nullptr,
                              a.ws.h_prev(base) + row * H, a.dh, lstm ? a.dc : nullptr,
                              a.dx_gates + chunk_row * GH,
                              gru ? a.dh_gates + chunk_row * GH : nullptr, u0, u1);
      if (a.dh_gates_bf16)  // the own units of every gate, rounded for the product
        for (int64_t g = 0; g < G; ++g)
          round_units_bf16(a.dh_gates + chunk_row * GH + g * H,
                           a.dh_gates_bf16 + chunk_row * GH + g * H, GH, n, u0, u1);
    } else if (a.dh_gates_bf16) {
      panel_matmul_raw(n, a.dh_gates_bf16 + chunk_row * GH, GH, *a.whh, u0 / kPanelWidth,
                       (u1 - u0) / kPanelWidth, a.dh, H, /*accumulate=*/true,
                       /*backwards=*/i % 2 == 1);
    } else {
      panel_matmul_raw(n, a.dh_gates + chunk_row * GH, GH, *a.whh, u0 / kPanelWidth,
                       (u1 - u0) / kPanelWidth, a.dh, H, /*accumulate=*/true,
                       /*backwards=*/i % 2 == 1);
    }
  });
}

}  // namespace seqkern::cpu
