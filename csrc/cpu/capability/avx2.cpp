// AVX2 + FMA build of the kernels, run where at::get_cpu_capability() says AVX2.
#if defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// The pragma enables the instructions but not the feature macros that sleef.h and at::vec
// test, so they are defined here, as -mavx2 -mfma would.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "instantiate.h"
#endif
