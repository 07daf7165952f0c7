// Test-only host emulation of the CUDA runtime and device primitives that the kernels in
// csrc/cuda use, so that their real sources (rewritten by build.py) run under g++ on a
// machine without a GPU.
//
// One POSIX thread per CUDA thread. __syncthreads is a std::barrier per block; warp
// collectives (shuffles, ldmatrix, mma.sync) publish each lane's registers in per-warp slots
// between two warp barriers, so every lane sees the whole warp's operands. Shared memory is
// filled with 0xff bytes (NaN as fp32, fp16 and bf16) so that reads of unwritten shared
// memory show up as NaN in the results; cp.async copies land at the wait, as late as they
// may. Built with AddressSanitizer (build.py's sanitize), each block's shared memory is
// exactly the launch's bytes, so that ASan stops any access past it. Plain launches run their blocks one after another
// (CUDA promises no co-residency); cooperative launches run every block at once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#define __launch_bounds__(...)

// The device the kernels query (the harness sets these before a launch).
inline int g_emu_cc_major = 8;               // compute capability major
inline int g_emu_smem_optin = 166912;        // opt-in shared memory per block (A100)
inline int g_emu_sms = 4;                    // multiprocessors
inline int g_emu_coop = 1;                   // cooperative launch supported
inline int g_emu_max_blocks_per_sm = 2;      // occupancy answer cap
inline int g_emu_min_work = 8 * 256;         // replaces rnn_layer.cu's `8 * kThreads`
inline int g_emu_launches = 0, g_emu_coop_launches = 0;

struct EmuWarp {
  std::barrier<> bar{32};
  uint64_t slot[32][8];
};
struct EmuThread {
  uint3 tid, bid;
  dim3 grid, block;
  unsigned char* smem;
  std::barrier<>* block_bar;
  EmuWarp* warp;
};
inline thread_local EmuThread* emu_t = nullptr;
#define threadIdx (emu_t->tid)
#define blockIdx (emu_t->bid)
#define gridDim (emu_t->grid)
#define blockDim (emu_t->block)

inline unsigned char* emu_smem() { return emu_t->smem; }
inline int emu_lane() { return emu_t->tid.x & 31; }
inline void emu_yield() { sched_yield(); }
inline void __syncthreads() { emu_t->block_bar->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Every lane stores `v` in its slot, then reads lane `src_lane(lane)`'s.
template <class F>
inline uint64_t emu_exchange(uint64_t v, F src_lane) {
  EmuWarp* w = emu_t->warp;
  const int lane = emu_lane();
  w->slot[lane][0] = v;
  w->bar.arrive_and_wait();
  const uint64_t r = w->slot[src_lane(lane)][0];
  w->bar.arrive_and_wait();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  bits = static_cast<uint32_t>(emu_exchange(bits, [&](int lane) { return lane ^ mask; }));
  memcpy(&v, &bits, 4);
  return v;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline float __ldcg(const float* p) { return *p; }
inline float4 __ldcg(const float4* p) { return *p; }
inline float __expf(float x) { return expf(x); }
inline uint32_t __float_as_uint(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}
using std::max;
using std::min;

// The inline-PTX wrappers of attention_common.cuh (build.py drops the originals).
namespace seqkern::cuda::detail {
// ldmatrix .x4: lanes 8m..8m+7 give the row addresses of 8x8 b16 matrix m.
inline void emu_ldsm(uint32_t (&r)[4], const void* row_addr, bool trans) {
  EmuWarp* w = emu_t->warp;
  const int lane = emu_lane();
  w->slot[lane][0] = reinterpret_cast<uintptr_t>(row_addr);
  w->bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int m = 0; m < 4; ++m) {
    auto el = [&](int row, int col) {
      return reinterpret_cast<const uint16_t*>(w->slot[8 * m + row][0])[col];
    };
    const uint16_t lo = trans ? el(2 * t, g) : el(g, 2 * t);
    const uint16_t hi = trans ? el(2 * t + 1, g) : el(g, 2 * t + 1);
    r[m] = lo | (static_cast<uint32_t>(hi) << 16);
  }
  w->bar.arrive_and_wait();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* a) { emu_ldsm(r, a, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* a) { emu_ldsm(r, a, true); }

template <typename T>
inline float emu_b16_to_float(uint16_t b) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(b));
  } else {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
}
// A warp's mma.sync m16n8kK (fp32 accumulate), K = 16 (fp16 / bf16) or 8 (TF32): every lane
// publishes its fragments, unpack(slots of lane l, g, t, A, B) fills the whole A (16 x K) and
// B (K x 8) from each lane's registers by the PTX ISA's fragment layout, and each lane adds
// its four C elements (rows g, g + 8; columns 2t, 2t + 1).
template <int K, class Unpack>
inline void emu_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                    Unpack unpack) {
  EmuWarp* w = emu_t->warp;
  const int lane = emu_lane();
  for (int i = 0; i < 4; ++i) w->slot[lane][i] = a[i];
  w->slot[lane][4] = b0, w->slot[lane][5] = b1;
  w->bar.arrive_and_wait();
  float A[16][K], B[K][8];
  for (int l = 0; l < 32; ++l) unpack(w->slot[l], l / 4, l % 4, A, B);
  w->bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e / 2) * 8, col = 2 * t + e % 2;
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
    c[e] += s;
  }
}
// mma.sync m16n8k16, fp16 / bf16 operands: two elements a register, the lower column low.
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma<16>(c, a, b0, b1, [](const uint64_t* r, int g, int t, auto& A, auto& B) {
    auto lo = [&](int i) { return emu_b16_to_float<T>(static_cast<uint16_t>(r[i])); };
    auto hi = [&](int i) { return emu_b16_to_float<T>(static_cast<uint16_t>(r[i] >> 16)); };
    A[g][2 * t] = lo(0), A[g][2 * t + 1] = hi(0);
    A[g + 8][2 * t] = lo(1), A[g + 8][2 * t + 1] = hi(1);
    A[g][2 * t + 8] = lo(2), A[g][2 * t + 9] = hi(2);
    A[g + 8][2 * t + 8] = lo(3), A[g + 8][2 * t + 9] = hi(3);
    B[2 * t][g] = lo(4), B[2 * t + 1][g] = hi(4);
    B[2 * t + 8][g] = lo(5), B[2 * t + 9][g] = hi(5);
  });
}
// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero (finite inputs).
inline float to_tf32(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  memcpy(&x, &u, 4);
  return x;
}
// mma.sync m16n8k8 .tf32: one element a register, its low 13 bits ignored as the hardware
// does.
inline void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma<8>(c, a, b0, b1, [](const uint64_t* r, int g, int t, auto& A, auto& B) {
    auto val = [&](int i) {
      const uint32_t u = static_cast<uint32_t>(r[i]) & 0xffffe000u;
      float f;
      memcpy(&f, &u, 4);
      return f;
    };
    A[g][t] = val(0), A[g + 8][t] = val(1), A[g][t + 4] = val(2), A[g + 8][t + 4] = val(3);
    B[t][g] = val(4), B[t + 4][g] = val(5);
  });
}
// cp.async reads its source as early and lands as late as it may: the 16 bytes are read at
// issue (a source written after the issue, or by another block after a barrier the copy
// spans, is not seen) and wait in the thread's queue until a wait that covers their group
// (cp_async_wait_all, or cp_async_wait_group<n> once n newer groups are committed), so
// shared memory read before the wait (and the __syncthreads after it) still holds the 0xff
// fill or the previous chunk, never the new data by luck of timing.
struct EmuCopy {
  void* dst;
  unsigned char bytes[16];
};
inline thread_local std::vector<EmuCopy> emu_pending_copies;  // not yet committed
inline thread_local std::vector<std::vector<EmuCopy>> emu_copy_groups;  // committed, oldest first
inline void cp_async16(void* smem, const void* gmem) {
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16 != 0) {
    fprintf(stderr, "emu: cp.async of 16 bytes from %p to %p: both must be 16-byte aligned\n",
            gmem, smem);
    exit(3);
  }
  EmuCopy c{smem, {}};
  memcpy(c.bytes, gmem, 16);
  emu_pending_copies.push_back(c);
}
inline void cp_async_commit() {
  emu_copy_groups.push_back(std::move(emu_pending_copies));
  emu_pending_copies.clear();
}
inline void emu_land_groups(size_t count) {
  for (size_t g = 0; g < count; ++g)
    for (const EmuCopy& c : emu_copy_groups[g]) memcpy(c.dst, c.bytes, 16);
  emu_copy_groups.erase(emu_copy_groups.begin(), emu_copy_groups.begin() + count);
}
inline void cp_async_wait_all() {
  cp_async_commit();  // wait_all covers uncommitted copies too
  emu_land_groups(emu_copy_groups.size());
}
template <int n>
inline void cp_async_wait_group() {
  if (emu_copy_groups.size() > size_t(n)) emu_land_groups(emu_copy_groups.size() - n);
}
}  // namespace seqkern::cuda::detail

// ---- launches ------------------------------------------------------------------------------

struct EmuJob {
  EmuThread t;
  const std::function<void()>* body;
};
inline void* emu_thread_main(void* arg) {
  auto* job = static_cast<EmuJob*>(arg);
  emu_t = &job->t;
  (*job->body)();
  if (!seqkern::cuda::detail::emu_pending_copies.empty() ||
      !seqkern::cuda::detail::emu_copy_groups.empty()) {  // a block's shared memory ends
    fprintf(stderr, "emu: block %u thread %u exited with cp.async copies not waited for\n",
            job->t.bid.x, job->t.tid.x);
    exit(3);
  }
  return nullptr;
}

// Runs blocks [b0, b1) of a launch concurrently, each with its own shared memory and barriers.
inline void emu_run_blocks(dim3 grid, dim3 block, size_t smem, unsigned b0, unsigned b1,
                           const std::function<void()>& body) {
  const unsigned nb = b1 - b0, nt = block.x;
  std::vector<std::unique_ptr<unsigned char[]>> mem(nb);
  std::vector<std::unique_ptr<std::barrier<>>> bars(nb);
  std::vector<std::unique_ptr<EmuWarp[]>> warps(nb);
  // Past each block's smem bytes, a canary: a write beyond what the launch asked for (a plan
  // that sized shared memory too small) is reported by block instead of corrupting the heap.
  // Under AddressSanitizer the block's shared memory is exactly smem bytes instead, so that
  // ASan stops a read or a write past it.
#if defined(__SANITIZE_ADDRESS__)
  constexpr size_t kCanary = 0, kAlignPad = 0;
#else
  constexpr size_t kCanary = 4096, kAlignPad = 16;
#endif
  constexpr unsigned char kCanaryByte = 0xa5;
  const auto aligned = [](unsigned char* p) {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 15) / 16 * 16);
  };
  for (unsigned b = 0; b < nb; ++b) {
    mem[b].reset(new unsigned char[smem + kAlignPad + kCanary]);  // new[]: 16-byte aligned
    memset(mem[b].get(), 0xff, smem + kAlignPad);
    memset(aligned(mem[b].get()) + smem, kCanaryByte, kCanary);
    bars[b] = std::make_unique<std::barrier<>>(nt);
    warps[b].reset(new EmuWarp[(nt + 31) / 32]);
  }
  std::vector<EmuJob> jobs(size_t(nb) * nt);
  std::vector<pthread_t> threads(jobs.size());
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 20);
  for (unsigned b = 0; b < nb; ++b) {
    auto* base = aligned(mem[b].get());
    for (unsigned t = 0; t < nt; ++t) {
      EmuJob& j = jobs[size_t(b) * nt + t];
      j.t = {uint3{t, 0, 0}, uint3{b0 + b, 0, 0}, grid, block, base, bars[b].get(),
             &warps[b][t / 32]};
      j.body = &body;
      if (pthread_create(&threads[size_t(b) * nt + t], &attr, emu_thread_main, &j) != 0) {
        fprintf(stderr, "emu: pthread_create failed\n");
        exit(3);
      }
    }
  }
  for (auto& th : threads) pthread_join(th, nullptr);
  pthread_attr_destroy(&attr);
  for (unsigned b = 0; b < nb; ++b) {
    const unsigned char* canary = aligned(mem[b].get()) + smem;
    for (size_t i = 0; i < kCanary; ++i) {
      if (canary[i] != kCanaryByte) {
        fprintf(stderr, "emu: block %u wrote shared memory byte %zu, past the %zu bytes its "
                "launch asked for\n", b0 + b, smem + i, smem);
        exit(3);
      }
    }
  }
}
inline void emu_run(dim3 grid, dim3 block, size_t smem, bool cooperative,
                    const std::function<void()>& body) {
  if (block.y * block.z != 1 || grid.y * grid.z != 1) {
    fprintf(stderr, "emu: only 1-D launches\n");
    exit(3);
  }
  if (cooperative) return emu_run_blocks(grid, block, smem, 0, grid.x, body);
  for (unsigned b = 0; b < grid.x; ++b) emu_run_blocks(grid, block, smem, b, b + 1, body);
}
// Device memory for a harness: `bytes` of 0xff garbage (the kernels must initialise what
// they use), 256-byte aligned as cudaMalloc's, and exactly that size, so that an access past
// it is caught by AddressSanitizer (build.py's sanitize). Never freed: one run per process.
inline void* emu_device_alloc(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<size_t>(bytes, 1)) != 0) {
    fprintf(stderr, "emu: posix_memalign of %zu bytes failed\n", bytes);
    exit(3);
  }
  memset(p, 0xff, bytes);
  return p;
}

// What build.py turns `kernel<<<grid, block, smem, stream>>>(args)` into.
template <class F>
void emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, F&& call) {
  ++g_emu_launches;
  emu_run(grid, block, smem, false, std::function<void()>(call));
}

// Kernels launched through cudaLaunchKernel / cudaLaunchCooperativeKernel take `void** args`;
// the harness registers, per kernel pointer, how to call it with them.
using EmuLauncher = std::function<void(dim3, dim3, size_t, bool, void**)>;
inline std::map<const void*, EmuLauncher>& emu_registry() {
  static std::map<const void*, EmuLauncher> r;
  return r;
}

extern "C" {
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *v = g_emu_cc_major; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = g_emu_smem_optin; break;
    case cudaDevAttrMultiProcessorCount: *v = g_emu_sms; break;
    case cudaDevAttrCooperativeLaunch: *v = g_emu_coop; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int,
                                                                 size_t smem) {
  *n = std::min<int>(233472 / (smem + 1024), g_emu_max_blocks_per_sm);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind,
                                   cudaStream_t) {
  memcpy(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaLaunchKernel(const void* f, dim3 g, dim3 b, void** args, size_t smem,
                                    cudaStream_t) {
  ++g_emu_launches;
  emu_registry().at(f)(g, b, smem, false, args);
  return cudaSuccess;
}
cudaError_t cudaLaunchCooperativeKernel(const void* f, dim3 g, dim3 b, void** args,
                                               size_t smem, cudaStream_t) {
  if (!g_emu_coop || int(g.x) > g_emu_sms * g_emu_max_blocks_per_sm)
    return cudaErrorCooperativeLaunchTooLarge;
  ++g_emu_coop_launches;
  emu_registry().at(f)(g, b, smem, true, args);
  return cudaSuccess;
}
}
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
