// New op outputs, the same for the CPU and CUDA bindings. SEQKERN_POISON_OUTPUTS=1 fills
// them with NaN before the kernel runs, so that tests catch elements a kernel never writes.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace seqkern {

inline bool poison_outputs() {
  const char* v = std::getenv("SEQKERN_POISON_OUTPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  return poison_outputs() ? at::full(shape, NAN, options) : at::empty(shape, options);
}

// [B, H, T, D] laid out as a dense [B, T, H, D] ("heads inner", seqkern/ops/attention.py):
// the layout of a projection split into heads, so MultiheadAttention merges heads without
// a copy.
inline at::Tensor new_heads_inner(int64_t B, int64_t H, int64_t T, int64_t D,
                                  const at::TensorOptions& options) {
  return new_output({B, T, H, D}, options).transpose(1, 2);
}

}  // namespace seqkern
