// Large CPU buffers that are reused instead of freshly mapped. glibc serves allocations
// above 32 MB with mmap, so every new workspace of a recurrent layer (92 MB for the
// fastrnns LSTM training step) is faulted in page by page, zero-filled by the kernel: about
// a third of the step's time on the 2-core machines. Tensors from cached_empty hand their
// memory back to a small cache when freed, and the next call of the same size reuses it,
// already mapped. The cache holds at most a few blocks (kMaxCachedBytes in all).
#pragma once

#include <ATen/ATen.h>

namespace seqkern::cpu {

// Like at::empty (contiguous, uninitialised; NaN under SEQKERN_POISON_OUTPUTS=1) for large CPU
// buffers.
at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace seqkern::cpu
