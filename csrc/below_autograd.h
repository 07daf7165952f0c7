// The kernel entry points, registered below autograd: `m.impl(name, below_autograd<&fn>)`
// (the CPU and CUDA bindings) runs fn with at::AutoDispatchBelowADInplaceOrView, so that the
// ATen calls it makes (views, allocations, products) skip the Autograd and ADInplaceOrView
// kernels that each would otherwise pass through on its way to the backend's. Nothing there is
// for them to do: an entry point's tensors are its own (no output aliases an input, no input
// is written: the ops' schemas, which torch.library.opcheck checks in the tests), and the
// public ops' autograd is their own (seqkern/ops/). They cost 3-7 us a decoding step's layer
// call on the CPU (T1 B1 H256, the C++ op alone: RNN 22.8 -> 19.4 us, GRU 36.0 -> 28.6, LSTM
// 42.2 -> 38.2; an A/B in one process, best of 15 rounds).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>

#include <utility>

namespace seqkern {

template <auto Fn>
struct BelowAutograd;

template <typename R, typename... Args, R (*Fn)(Args...)>
struct BelowAutograd<Fn> {
  static R call(Args... args) {
    const at::AutoDispatchBelowADInplaceOrView guard;
    return Fn(std::forward<Args>(args)...);
  }
};

template <auto Fn>
constexpr auto below_autograd = &BelowAutograd<Fn>::call;

}  // namespace seqkern
