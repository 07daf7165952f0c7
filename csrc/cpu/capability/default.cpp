// Baseline x86-64 / any-CPU build of the kernels (at::vec's generic vectors).
#define CPU_CAPABILITY DEFAULT
#include "instantiate.h"
