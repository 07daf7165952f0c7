// AVX-512 build of the kernels, run where at::get_cpu_capability() says AVX512, compiled
// with its own flags (flags.txt beside this file, read by setup.py and CMakeLists.txt).
#if defined(__x86_64__)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error "capability/avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "instantiate.h"
#endif
