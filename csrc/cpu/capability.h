// Run-time choice of the instruction set the CPU kernels run with. Each kernel is compiled
// once per capability (csrc/cpu/capability/{default,avx2,avx512}.cpp) into a namespace of
// that name; SEQKERN_CPU_DISPATCH(fn, args...) returns NS::fn(args...) for the capability
// ATen chose for this CPU (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
#pragma once

#include <string>

namespace seqkern::cpu {

// "AVX512", "AVX2" or "DEFAULT" (csrc/cpu/attention.cpp).
std::string kernel_capability();

}  // namespace seqkern::cpu

#if defined(__x86_64__)
#define SEQKERN_CPU_DISPATCH(fn, ...)                                          \
  do {                                                                         \
    const std::string seqkern_capability = ::seqkern::cpu::kernel_capability(); \
    if (seqkern_capability == "AVX512") return AVX512::fn(__VA_ARGS__);        \
    if (seqkern_capability == "AVX2") return AVX2::fn(__VA_ARGS__);            \
    return DEFAULT::fn(__VA_ARGS__);                                           \
  } while (0)
#else
#define SEQKERN_CPU_DISPATCH(fn, ...) return DEFAULT::fn(__VA_ARGS__)
#endif
