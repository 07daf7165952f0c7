// AVX2 + FMA build of the kernels, run where at::get_cpu_capability() says AVX2, compiled
// with its own flags (flags.txt beside this file, read by setup.py and CMakeLists.txt).
#if defined(__x86_64__)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "capability/avx2.cpp must be compiled with -mavx2 -mfma (flags.txt)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "instantiate.h"
#endif
