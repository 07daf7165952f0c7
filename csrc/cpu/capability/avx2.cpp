// AVX2 + FMA build of the kernels, run where at::get_cpu_capability() says AVX2. Compiled
// with -mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -mpopcnt (setup.py and CMakeLists.txt give
// this file its own flags, as torch does for its capability units).
#if defined(__x86_64__)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "capability/avx2.cpp must be compiled with -mavx2 -mfma (see setup.py)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "instantiate.h"
#endif
