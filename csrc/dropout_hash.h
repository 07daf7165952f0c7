// The hash behind attention dropout's counter-based generator, one definition for the CPU
// kernels and the CUDA kernels (framework-free), bit-identical to seqkern.reference's
// _fmix32 and the Triton kernels: murmur3's 32-bit finalizer.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SEQKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SEQKERN_HOST_DEVICE inline
#endif

namespace seqkern {

SEQKERN_HOST_DEVICE uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

}  // namespace seqkern
