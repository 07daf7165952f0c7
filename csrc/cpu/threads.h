// How many threads seqkern's CPU kernels use: at::get_num_threads(), or only the calling one
// inside a OneThread scope on that thread (a layer call too small to share:
// forward_on_one_thread, rnn_layer_plan.h). The kernels call cpu::parallel_for, not
// at::parallel_for, which takes no such limit: c10::ParallelGuard did not stop its calls
// (torch 2.13: at::in_parallel_region() asks OpenMP alone), and at::set_num_threads is
// process-wide.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace seqkern::cpu {

inline thread_local bool on_one_thread = false;

// Inside it (if enabled), this thread's seqkern kernels run all their work on this thread.
class OneThread {
 public:
  explicit OneThread(bool enabled) : previous_(on_one_thread) {
    on_one_thread = previous_ || enabled;
  }
  ~OneThread() { on_one_thread = previous_; }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  bool previous_;
};

inline int64_t kernel_threads() { return on_one_thread ? 1 : at::get_num_threads(); }

// at::parallel_for, or body(begin, end) on this thread inside a OneThread scope.
template <typename Body>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const Body& body) {
  if (!on_one_thread) return at::parallel_for(begin, end, grain, body);
  if (begin < end) body(begin, end);
}

}  // namespace seqkern::cpu
