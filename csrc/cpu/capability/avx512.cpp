// AVX-512 build of the kernels, run where at::get_cpu_capability() says AVX512.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// The pragma enables the instructions but not the feature macros that sleef.h and at::vec
// test, so they are defined here, as -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma would.
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "instantiate.h"
#endif
