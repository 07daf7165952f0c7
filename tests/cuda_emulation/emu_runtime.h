// Test-only host emulation of the CUDA runtime and device primitives that the kernels in
// csrc/cuda use, so that their real sources (rewritten by build.py) run under g++ on a
// machine without a GPU.
//
// One POSIX thread per block; its CUDA threads are fibers that it runs in turn,
// each switching back at a barrier: __syncthreads waits for the block's threads, and warp
// collectives (shuffles, ldmatrix, mma.sync) publish each lane's registers in per-warp slots
// between two warp barriers, so every lane sees the whole warp's operands. (A POSIX thread per
// CUDA thread before: a cooperative launch of 33 blocks ran 8448 of them on two cores, and
// waking them at each barrier took most of the run.) A block whose threads all wait at
// barriers that none of them can reach stops the run with the barrier's report instead of
// hanging. Shared memory is filled with 0xff bytes (NaN as fp32, fp16 and bf16) so that reads
// of unwritten shared memory show up as NaN in the results; cp.async copies land at the
// wait, as late as they may. Built with AddressSanitizer (build.py's sanitize), each block's
// shared memory is exactly the launch's bytes, so that ASan stops any access past it, and the
// fiber switches are announced to ASan. Plain launches run their blocks one after another
// (CUDA promises no co-residency); cooperative launches run every block at once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
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

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define __launch_bounds__(...)

// The device the kernels query (the harness sets these before a launch).
inline int g_emu_cc_major = 8;               // compute capability major
inline int g_emu_smem_optin = 166912;        // opt-in shared memory per block (A100)
inline int g_emu_sms = 4;                    // multiprocessors
inline int g_emu_coop = 1;                   // cooperative launch supported
inline int g_emu_max_blocks_per_sm = 2;      // occupancy answer cap
inline int g_emu_min_work = 8 * 256;         // replaces rnn_layer.cu's `8 * kThreads`
inline int g_emu_launches = 0, g_emu_coop_launches = 0;

// A fiber's saved context and the switch between two. On x86-64 a switch saves the
// callee-saved registers on the stack it leaves and loads them from the one it enters
// (emu_context_switch below: no system call, nothing ASan intercepts); elsewhere, or where
// EMU_FIBERS_UCONTEXT is defined (tests/test_cuda_emulation.py builds the runtime checks so,
// to keep that path compiled and run), ucontext's swapcontext.
#if defined(__x86_64__) && !defined(EMU_FIBERS_UCONTEXT)
struct EmuContext {
  void* sp = nullptr;
};
extern "C" void emu_context_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl emu_context_switch
  .type emu_context_switch, @function
emu_context_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_context_switch, .-emu_context_switch
)");
inline void emu_switch(EmuContext& from, EmuContext& to) { emu_context_switch(&from.sp, to.sp); }
// A context that enters entry() (which must never return) on [stack, stack + bytes): the
// frame emu_context_switch pops (MXCSR and x87 control word at their defaults, six
// registers, entry as the return address) under a null return address for entry itself.
inline void emu_make_context(EmuContext& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  uint64_t* sp = top - 9;
  memset(sp, 0, 9 * sizeof(uint64_t));
  const uint32_t mxcsr = 0x1f80;
  const uint16_t fpcw = 0x037f;
  memcpy(sp, &mxcsr, 4);
  memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fpcw, 2);
  sp[7] = reinterpret_cast<uint64_t>(entry);  // top - 2; top - 1: entry's return address, 0
  c.sp = sp;
}
#else
#include <ucontext.h>
struct EmuContext {
  ucontext_t uc;
};
inline void emu_switch(EmuContext& from, EmuContext& to) { swapcontext(&from.uc, &to.uc); }
inline void emu_make_context(EmuContext& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// A barrier of one block's fibers (they all run on the block's POSIX thread: no locks).
struct EmuBarrier {
  unsigned count, arrived = 0, generation = 0;
  const char* what;  // for the deadlock report
};
struct EmuWarp {
  EmuBarrier bar{32, 0, 0, "a warp collective"};
  uint64_t slot[32][8];
};
// A cp.async copy in flight (see cp_async16).
struct EmuCopy {
  void* dst;
  unsigned char bytes[16];
};
// One CUDA thread: its indices, its block's shared memory and barriers, its cp.async queues,
// and its fiber.
struct EmuThread {
  uint3 tid, bid;
  dim3 grid, block;
  unsigned char* smem;
  EmuBarrier* block_bar;
  EmuWarp* warp;
  std::vector<EmuCopy> pending_copies;                 // not yet committed
  std::vector<std::vector<EmuCopy>> copy_groups;       // committed, oldest first
  EmuContext context;
  unsigned char* stack = nullptr;  // mmap'd: a guard page (kEmuGuardBytes), then the stack
  const EmuBarrier* waiting_on = nullptr;  // blocked until its generation moves on
  unsigned waiting_generation = 0;
  bool spinning = false, done = false;
  void* asan_fake_stack = nullptr;
};
inline thread_local EmuThread* emu_t = nullptr;
#define threadIdx (emu_t->tid)
#define blockIdx (emu_t->bid)
#define gridDim (emu_t->grid)
#define blockDim (emu_t->block)

// The POSIX thread that runs a block: its own context, to which fibers switch back.
struct EmuBlockRunner {
  EmuContext context;
  const std::function<void()>* body = nullptr;
  const void* stack_bottom = nullptr;  // its stack, as ASan reports it on the first switch
  size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
};
inline thread_local EmuBlockRunner* emu_runner = nullptr;

// From the running fiber back to its block's runner (finished: never resumed again).
inline void emu_switch_to_runner(bool finished) {
  EmuThread* t = emu_t;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(finished ? nullptr : &t->asan_fake_stack,
                                 emu_runner->stack_bottom, emu_runner->stack_size);
#endif
  emu_switch(t->context, emu_runner->context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(t->asan_fake_stack, nullptr, nullptr);
#endif
}
inline void emu_barrier_wait(EmuBarrier& b) {
  if (++b.arrived == b.count) {  // the last to arrive releases the others and goes on
    b.arrived = 0;
    ++b.generation;
    return;
  }
  emu_t->waiting_on = &b;
  emu_t->waiting_generation = b.generation;
  emu_switch_to_runner(false);
}

inline unsigned char* emu_smem() { return emu_t->smem; }
inline int emu_lane() { return emu_t->tid.x & 31; }
// A spin loop's turn (the layer's grid barrier): the block's other threads run, and the
// runner gives its core away when all of its threads spin or wait.
inline void emu_yield() {
  emu_t->spinning = true;
  emu_switch_to_runner(false);
}
inline void __syncthreads() { emu_barrier_wait(*emu_t->block_bar); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Every lane stores `v` in its slot, then reads lane `src_lane(lane)`'s.
template <class F>
inline uint64_t emu_exchange(uint64_t v, F src_lane) {
  EmuWarp* w = emu_t->warp;
  const int lane = emu_lane();
  w->slot[lane][0] = v;
  emu_barrier_wait(w->bar);
  const uint64_t r = w->slot[src_lane(lane)][0];
  emu_barrier_wait(w->bar);
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
  emu_barrier_wait(w->bar);
  const int g = lane / 4, t = lane % 4;
  for (int m = 0; m < 4; ++m) {
    auto el = [&](int row, int col) {
      return reinterpret_cast<const uint16_t*>(w->slot[8 * m + row][0])[col];
    };
    const uint16_t lo = trans ? el(2 * t, g) : el(g, 2 * t);
    const uint16_t hi = trans ? el(2 * t + 1, g) : el(g, 2 * t + 1);
    r[m] = lo | (static_cast<uint32_t>(hi) << 16);
  }
  emu_barrier_wait(w->bar);
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
  emu_barrier_wait(w->bar);
  float A[16][K], B[K][8];
  for (int l = 0; l < 32; ++l) unpack(w->slot[l], l / 4, l % 4, A, B);
  emu_barrier_wait(w->bar);
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
inline void cp_async16(void* smem, const void* gmem) {
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16 != 0) {
    fprintf(stderr, "emu: cp.async of 16 bytes from %p to %p: both must be 16-byte aligned\n",
            gmem, smem);
    exit(3);
  }
  EmuCopy c{smem, {}};
  memcpy(c.bytes, gmem, 16);
  emu_t->pending_copies.push_back(c);
}
inline void cp_async_commit() {
  emu_t->copy_groups.push_back(std::move(emu_t->pending_copies));
  emu_t->pending_copies.clear();
}
inline void emu_land_groups(size_t count) {
  auto& groups = emu_t->copy_groups;
  for (size_t g = 0; g < count; ++g)
    for (const EmuCopy& c : groups[g]) memcpy(c.dst, c.bytes, 16);
  groups.erase(groups.begin(), groups.begin() + count);
}
inline void cp_async_wait_all() {
  cp_async_commit();  // wait_all covers uncommitted copies too
  emu_land_groups(emu_t->copy_groups.size());
}
template <int n>
inline void cp_async_wait_group() {
  auto& groups = emu_t->copy_groups;
  if (groups.size() > size_t(n)) emu_land_groups(groups.size() - n);
}
}  // namespace seqkern::cuda::detail

// ---- launches ------------------------------------------------------------------------------

constexpr size_t kEmuGuardBytes = 4096;       // below each fiber's stack, no access
constexpr size_t kEmuStackBytes = 256 << 10;  // a fiber's stack

// A fiber's first and only frame: the kernel, then back to the runner for good.
inline void emu_fiber_main() {
  EmuThread* t = emu_t;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &emu_runner->stack_bottom, &emu_runner->stack_size);
#endif
  (*emu_runner->body)();
  if (!t->pending_copies.empty() || !t->copy_groups.empty()) {  // shared memory ends with it
    fprintf(stderr, "emu: block %u thread %u exited with cp.async copies not waited for\n",
            t->bid.x, t->tid.x);
    exit(3);
  }
  t->done = true;
  emu_switch_to_runner(true);
  abort();  // never resumed
}
// From the block's runner into thread t's fiber, until it switches back.
inline void emu_resume(EmuThread& t) {
  emu_t = &t;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&emu_runner->asan_fake_stack, t.stack + kEmuGuardBytes,
                                 kEmuStackBytes);
#endif
  emu_switch(emu_runner->context, t.context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(emu_runner->asan_fake_stack, nullptr, nullptr);
#endif
  emu_t = nullptr;
}

struct EmuBlockJob {
  EmuThread* threads;
  unsigned count;
  const std::function<void()>* body;
};
// A block's POSIX thread: runs its threads' fibers in turn, skipping those that wait at a
// barrier not yet released, until all have ended.
inline void* emu_block_main(void* arg) {
  auto* job = static_cast<EmuBlockJob*>(arg);
  EmuBlockRunner runner;
  runner.body = job->body;
  emu_runner = &runner;
  EmuThread* threads = job->threads;
  for (unsigned i = 0; i < job->count; ++i) {
    EmuThread& t = threads[i];
    void* m = mmap(nullptr, kEmuGuardBytes + kEmuStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED || mprotect(m, kEmuGuardBytes, PROT_NONE) != 0) {
      fprintf(stderr, "emu: a fiber's stack could not be mapped\n");
      exit(3);
    }
    t.stack = static_cast<unsigned char*>(m);
    emu_make_context(t.context, t.stack + kEmuGuardBytes, kEmuStackBytes, emu_fiber_main);
  }
  for (;;) {
    bool live = false, moved = false, spun = false;
    for (unsigned i = 0; i < job->count; ++i) {
      EmuThread& t = threads[i];
      if (t.done) continue;
      live = true;
      if (t.waiting_on) {
        if (t.waiting_on->generation == t.waiting_generation) continue;
        t.waiting_on = nullptr;
      }
      t.spinning = false;
      emu_resume(t);
      (t.spinning ? spun : moved) = true;
    }
    if (!live) break;
    if (moved) continue;
    if (!spun) {  // every live thread waits at a barrier that none of them can release
      for (unsigned i = 0; i < job->count; ++i) {
        const EmuThread& t = threads[i];
        if (t.done || !t.waiting_on) continue;
        fprintf(stderr, "emu: block %u deadlocked: thread %u waits at %s (%u of %u arrived)\n",
                t.bid.x, t.tid.x, t.waiting_on->what, t.waiting_on->arrived,
                t.waiting_on->count);
        break;
      }
      exit(3);
    }
    sched_yield();  // only spinning threads: the blocks they wait for need a core
  }
  for (unsigned i = 0; i < job->count; ++i) {
#if defined(__SANITIZE_ADDRESS__)
    // frames left on a fiber's stack keep their redzones poisoned in ASan's shadow: cleared
    // before the pages go back, so that memory mapped there later is not taken for them
    __asan_unpoison_memory_region(threads[i].stack + kEmuGuardBytes, kEmuStackBytes);
#endif
    munmap(threads[i].stack, kEmuGuardBytes + kEmuStackBytes);
  }
  emu_runner = nullptr;
  return nullptr;
}

// Runs blocks [b0, b1) of a launch concurrently, each with its own shared memory and barriers.
inline void emu_run_blocks(dim3 grid, dim3 block, size_t smem, unsigned b0, unsigned b1,
                           const std::function<void()>& body) {
  const unsigned nb = b1 - b0, nt = block.x;
  std::vector<std::unique_ptr<unsigned char[]>> mem(nb);
  std::vector<std::unique_ptr<EmuBarrier>> bars(nb);
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
    bars[b] = std::make_unique<EmuBarrier>(EmuBarrier{nt, 0, 0, "__syncthreads"});
    warps[b].reset(new EmuWarp[(nt + 31) / 32]);
  }
  std::vector<std::vector<EmuThread>> threads(nb);
  std::vector<EmuBlockJob> jobs(nb);
  std::vector<pthread_t> runners(nb);
  for (unsigned b = 0; b < nb; ++b) {
    auto* base = aligned(mem[b].get());
    threads[b].resize(nt);
    for (unsigned t = 0; t < nt; ++t) {
      EmuThread& th = threads[b][t];
      th.tid = uint3{t, 0, 0}, th.bid = uint3{b0 + b, 0, 0}, th.grid = grid, th.block = block;
      th.smem = base, th.block_bar = bars[b].get(), th.warp = &warps[b][t / 32];
    }
    jobs[b] = {threads[b].data(), nt, &body};
    if (pthread_create(&runners[b], nullptr, emu_block_main, &jobs[b]) != 0) {
      fprintf(stderr, "emu: pthread_create failed\n");
      exit(3);
    }
  }
  for (auto& r : runners) pthread_join(r, nullptr);
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
