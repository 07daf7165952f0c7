// Hopper (sm_90a) attention forward: TMA loads into a shared-memory ring filled by a producer
// warp, warpgroup MMA (wgmma) and an fp32 online softmax in two consumer warpgroups.
//
// CTA = 3 warpgroups. Warpgroup 0 is the producer: one thread issues every TMA load (Q once,
// then K and V tiles of kBlockN keys into a kStages-deep ring); its registers are handed to the
// consumers with setmaxnreg. Warpgroups 1 and 2 each own 64 of the CTA's kBlockM = 128 query
// rows and run, per key block n: S = Q K_n^T (wgmma, A and B from shared memory), masking,
// online softmax, O += P_{n-1} V_{n-1} (wgmma, A = P from registers). Within a warpgroup the
// softmax of block n overlaps the P V product of block n-1; across the two warpgroups named
// barriers make them take turns issuing MMAs, so one's softmax overlaps the other's MMAs.
//
// Only compiled to wgmma for sm_90a (the "a" features: wgmma, setmaxnreg); for every other
// target the kernel body is a trap and the host entry point refuses to launch it.
#include "attention.h"

#include <cuda.h>  // CUtensorMap and its enums (types only: nothing here links libcuda)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SEQKERN_SM90A 1
#endif

namespace seqkern::cuda {
namespace {

constexpr int kBlockM = 128;   // query rows per CTA: 2 consumer warpgroups x wgmma's M = 64
constexpr int kConsumers = 2;  // consumer warpgroups
constexpr int kThreads = 128 * (kConsumers + 1);
// One swizzled smem row: 64 fp16/bf16, the TMA box's inner extent (128B swizzle's limit).
[[maybe_unused]] constexpr int kRowBytes = 128;
// setmaxnreg budgets: 128 * 24 + 256 * 240 = 64512 <= 65536 = 384 threads x 168 at launch;
// kBlockN = 176 needs ~220 registers per consumer thread (ptxas spills at 216).
[[maybe_unused]] constexpr int kProducerRegs = 24;
[[maybe_unused]] constexpr int kConsumerRegs = 240;
// Whether the two consumer warpgroups take turns issuing their MMAs (FA3's "ping-pong").
[[maybe_unused]] constexpr bool kPingpong = true;

// kBlockN: keys per pipeline stage (N of S = Q K^T, K of O += P V). 176 amortises the
// per-block softmax work better (S: 88 fp32 + P: 44 registers per thread), but causal tiles
// waste more of it on the diagonal: 128 there and for D = 64.
template <int D, int kBlockN>
struct Sm90Tile {
  static_assert((D == 64 || D == 128) && (kBlockN == 128 || kBlockN == 176), "tile");
  static constexpr int kStages = D == 128 ? 2 : 4;
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKVBytes = kBlockN * D * 2;  // one K or one V stage
  static constexpr int kBarOffset = kQBytes + 2 * kStages * kKVBytes;
  static constexpr int kBarriers = 1 + 4 * kStages;  // q, full_k/v[], empty_k/v[]
  // + 1024: the dynamic smem base is only 16-byte aligned; 128B swizzle needs 1024.
  static constexpr int kSmemBytes = kBarOffset + 8 * kBarriers + 1024;
};

struct Sm90Args {
  int L, S, Hq, group;        // group = Hq / Hkv
  float scale_log2;           // scale * log2(e): softmax runs on exp2
  int causal;
  const bool* key_padding;    // [B, S] or nullptr
  int64_t kp_stride_b, kp_stride_s;
  void* out;                  // [B, Hq, L, D]
  int64_t out_stride[3];      // elements, last dim contiguous
  float* lse;                 // [B, Hq, L] contiguous
};

#ifdef SEQKERN_SM90A

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier ------------------------------------------------------------------------------
// A phase completes when its pending arrivals reach 0 and its transaction count is back to 0;
// try_wait.parity(P) succeeds once the phase with parity P has completed. A fresh barrier is
// in phase 0, and waiting for parity 1 there succeeds at once (the phase "before" it counts as
// complete): that lets the producer's first pass over the ring skip the empty-slot waits.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}

// ---- TMA -----------------------------------------------------------------------------------
// One box of the 4-D map {D, rows, heads, batch} (innermost first) into smem; the bytes are
// credited to `bar`'s transaction count, also for elements out of bounds (zero-filled).
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                         int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// ---- named barriers (0 is __syncthreads; 1, 2 ping-pong turns; 3, 4 epilogue per group) ----
__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// ---- wgmma ---------------------------------------------------------------------------------
// Shared-memory matrix descriptor: bits 0-13 start address >> 4, 16-29 leading-dimension byte
// offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base offset (0: every tile is
// 1024-byte aligned, where the 128B swizzle pattern starts), 62-63 swizzle (1 = 128B).
// Every tile here is a stack of 128-byte rows written by TMA with SWIZZLE_128B (16-byte chunk
// c of row r stored at chunk c ^ (r % 8)), i.e. the 8 x 128 B swizzle atom of wgmma.
//  * K-major (Q as A, K as B; rows = M or N, 64 K-elements per row): SBO = 1024 (next 8 rows);
//    LBO unused for swizzled K-major (set to 1). Step k (16 elements = 32 B) inside the 128 B
//    row by adding 32 B to the start: the hardware applies the swizzle to address bits, so
//    the XOR still lines up; the next 64-column chunk is another tile rows x 128 B further.
//  * MN-major (V as B with imm-trans-b = 1; rows = keys = K, 64 N-elements per row):
//    LBO = distance between 64-wide N chunks, SBO = 1024 (next 8 keys); step k = 16 keys.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>(lbo >> 4) << 16) | (static_cast<uint64_t>(sbo >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// The compiler does not know wgmma is asynchronous: these empty asm statements "read and
// write" the registers, so no code touching them moves across a wait (or an issue) point.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#define SK_F8(r, i)                                                                        \
  "+f"(r[i]), "+f"(r[i + 1]), "+f"(r[i + 2]), "+f"(r[i + 3]), "+f"(r[i + 4]),            \
      "+f"(r[i + 5]), "+f"(r[i + 6]), "+f"(r[i + 7])
#define SK_F32(r, i) SK_F8(r, i), SK_F8(r, i + 8), SK_F8(r, i + 16), SK_F8(r, i + 24)
#define SK_REGS32                                                           \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define SK_REGS64                                                                      \
  SK_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
            "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, " \
            "%61, %62, %63"
#define SK_REGS88                                                                      \
  SK_REGS64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, " \
            "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87"

// S[64 x N] (+)= Q[64 x 16] K[N x 16]^T, both K-major in smem. Accumulator fragment of
// m64nNk16 (f32): warp w of the group holds rows 16w + lane/4 (d[4i], d[4i+1]) and
// 16w + lane/4 + 8 (d[4i+2], d[4i+3]), columns 8i + 2 (lane % 4) + {0, 1}, i < N / 8.
template <bool kBf16, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                         int accumulate) {
#define SK_WGMMA_SS128(TY)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                 \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" SK_REGS64      \
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                           \
               : SK_F32(d, 0), SK_F32(d, 32)                                                \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
#define SK_WGMMA_SS176(TY)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"                                 \
               "wgmma.mma_async.sync.aligned.m64n176k16.f32." TY "." TY " {" SK_REGS88      \
               "}, %88, %89, p, 1, 1, 0, 0;\n}\n"                                           \
               : SK_F32(d, 0), SK_F32(d, 32), SK_F8(d, 64), SK_F8(d, 72), SK_F8(d, 80)      \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
  if constexpr (N == 128) {
    if constexpr (kBf16) SK_WGMMA_SS128("bf16"); else SK_WGMMA_SS128("f16");
  } else {
    if constexpr (kBf16) SK_WGMMA_SS176("bf16"); else SK_WGMMA_SS176("f16");
  }
#undef SK_WGMMA_SS128
#undef SK_WGMMA_SS176
}

// O[64 x Dv] += P[64 x 16] V[16 x Dv]: P from registers in the A fragment of m64nNk16
// (a[0]: row lane/4, cols 2 (lane % 4) + {0, 1}; a[1]: row + 8; a[2], a[3]: cols + 8; rows
// offset by 16 w per warp), V MN-major in smem (imm-trans-b = 1).
template <bool kBf16, int Dv>
__device__ __forceinline__ void wgmma_rs(float (&d)[Dv / 2], const uint32_t* a, uint64_t desc_b) {
#define SK_WGMMA_RS64(TY)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" SK_REGS32      \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                            \
               : SK_F32(d, 0)                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define SK_WGMMA_RS128(TY)                                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" SK_REGS64     \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                            \
               : SK_F32(d, 0), SK_F32(d, 32)                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
  if constexpr (Dv == 64) {
    if constexpr (kBf16) SK_WGMMA_RS64("bf16"); else SK_WGMMA_RS64("f16");
  } else {
    if constexpr (kBf16) SK_WGMMA_RS128("bf16"); else SK_WGMMA_RS128("f16");
  }
#undef SK_WGMMA_RS64
#undef SK_WGMMA_RS128
}

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // lo -> low 16 bits
  if constexpr (kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

#endif  // SEQKERN_SM90A

template <int D, int kBlockN, bool kBf16>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q,
                              const __grid_constant__ CUtensorMap tm_k,
                              const __grid_constant__ CUtensorMap tm_v, const Sm90Args args) {
#ifdef SEQKERN_SM90A
  using Tile = Sm90Tile<D, kBlockN>;
  constexpr int kStages = Tile::kStages;
  constexpr int kChunks = D / 64;  // 128-byte column chunks of a row (one TMA box each)
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte alignment in the shared window (the swizzle pattern repeats every 1024 B, and
  // the descriptors assume base offset 0).
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t smem = (raw + 1023u) & ~1023u;
  const uint32_t sq = smem;                          // [kChunks][kBlockM][128 B]
  const uint32_t sk = sq + Tile::kQBytes;            // [kStages][kChunks][kBlockN][128 B]
  const uint32_t sv = sk + kStages * Tile::kKVBytes;  // same as sk
  const uint32_t bar_q = smem + Tile::kBarOffset;
  auto full_k = [&](int s) { return bar_q + 8u * (1 + s); };
  auto full_v = [&](int s) { return bar_q + 8u * (1 + kStages + s); };
  auto empty_k = [&](int s) { return bar_q + 8u * (1 + 2 * kStages + s); };
  auto empty_v = [&](int s) { return bar_q + 8u * (1 + 3 * kStages + s); };

  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal rows first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int m0 = m_block * kBlockM;
  const int L = args.L, S = args.S;
  // Key blocks this tile needs: causal rows i < min(L, m0 + kBlockM) see keys j <= i only.
  const int key_end = args.causal ? min(S, min(L, m0 + kBlockM)) : S;
  const int n_blocks = (key_end + kBlockN - 1) / kBlockN;  // >= 1 since m0 < L and S >= 1

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_k(s), 1);  // the producer's arrive.expect_tx + the TMA bytes
      mbar_init(full_v(s), 1);
      mbar_init(empty_k(s), 4 * kConsumers);  // one arrival per consumer warp
      mbar_init(empty_v(s), 4 * kConsumers);
    }
    // Make the initialised barriers visible to the async proxy (TMA's complete_tx).
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ---- producer ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (threadIdx.x == 0) {
      const int kv_head = head / args.group;
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tm_k)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tm_v)) : "memory");
      mbar_expect_tx(bar_q, Tile::kQBytes);
      for (int c = 0; c < kChunks; ++c)
        tma_load(sq + c * kBlockM * kRowBytes, &tm_q, bar_q, 64 * c, m0, head, batch);
      for (int n = 0; n < n_blocks; ++n) {
        const int s = n % kStages;
        const uint32_t phase = (n / kStages) & 1;
        // K and V slots are freed separately: K_j's once both groups have S_j (mid-iteration
        // j), V_j's once P_j V_j is done (end of iteration j + 1). So K_n is requested about
        // an iteration before it is needed; a shared K/V slot (2 stages) would free it only
        // at the end of iteration n - 1, leaving the TMA latency exposed every iteration.
        const uint32_t k_dst = sk + s * Tile::kKVBytes, v_dst = sv + s * Tile::kKVBytes;
        mbar_wait(empty_k(s), phase ^ 1);
        mbar_expect_tx(full_k(s), Tile::kKVBytes);
        for (int c = 0; c < kChunks; ++c)
          tma_load(k_dst + c * kBlockN * kRowBytes, &tm_k, full_k(s), 64 * c, n * kBlockN,
                   kv_head, batch);
        mbar_wait(empty_v(s), phase ^ 1);
        mbar_expect_tx(full_v(s), Tile::kKVBytes);
        for (int c = 0; c < kChunks; ++c)
          tma_load(v_dst + c * kBlockN * kRowBytes, &tm_v, full_v(s), 64 * c, n * kBlockN,
                   kv_head, batch);
      }
    }
    return;  // nothing below waits for the producer group (no CTA-wide barrier after this)
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
  const int cw = wg - 1;  // consumer warpgroup: query rows m0 + 64 cw + [0, 64)
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int row0 = m0 + 64 * cw + 16 * warp + lane / 4;  // this thread's rows: row0, row0 + 8
  const int col0 = 2 * (lane % 4);  // its columns in each 8-wide group: col0, col0 + 1
  const float sl2 = args.scale_log2;
  const bool* kp = args.key_padding
                       ? args.key_padding + static_cast<int64_t>(batch) * args.kp_stride_b
                       : nullptr;

  // Descriptors; in-tile offsets are added in 16-byte units (the start-address field), which
  // never carries out of its 14 bits since all of smem is below 256 KB.
  const uint64_t desc_q = make_desc(sq + 64 * cw * kRowBytes, 16, 1024);
  const uint64_t desc_k = make_desc(sk, 16, 1024);
  const uint64_t desc_v = make_desc(sv, kBlockN * kRowBytes, 1024);

  auto gemm_qk = [&](float (&s_acc)[kBlockN / 2], int stage) {
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const uint32_t in_row = (k % 4) * 32, chunk = k / 4;
      wgmma_ss<kBf16, kBlockN>(
          s_acc, desc_q + ((chunk * kBlockM * kRowBytes + in_row) >> 4),
          desc_k + ((stage * Tile::kKVBytes + chunk * kBlockN * kRowBytes + in_row) >> 4),
          k > 0);
    }
  };
  auto gemm_pv = [&](float (&o_acc)[D / 2], const uint32_t (&p_frag)[kBlockN / 4], int stage) {
#pragma unroll
    for (int k = 0; k < kBlockN / 16; ++k)
      wgmma_rs<kBf16, D>(o_acc, &p_frag[4 * k],
                         desc_v + ((stage * Tile::kKVBytes + k * 16 * kRowBytes) >> 4));
  };
  // Ping-pong: a group waits for its turn before issuing MMAs and passes it on after; group
  // 1 starts by handing group 0 the first turn. Group 1 does not pass after its last round,
  // so every bar.sync meets exactly one bar.arrive (both groups run n_blocks + 1 rounds).
  auto turn_wait = [&] {
    if (kPingpong) bar_sync(1 + cw, 256);
  };
  auto turn_pass = [&](bool last) {
    if (kPingpong && !(last && cw == 1)) bar_arrive(1 + (cw ^ 1), 256);
  };
  if (kPingpong && cw == 1) bar_arrive(1, 256);

  float s_acc[kBlockN / 2], o_acc[D / 2];
  uint32_t p_frag[kBlockN / 4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) s_acc[i] = 0.f;
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o_acc[i] = 0.f;

  // Key padding of this thread's columns of block n as bits 2i + e (column 8i + col0 + e),
  // loaded before the block's MMAs are issued so the loads' latency hides behind them.
  auto padding_bits = [&](int n) {
    uint64_t bits = 0;
    if (kp != nullptr) {
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = n * kBlockN + 8 * i + col0 + e;
          if (j < S && kp[static_cast<int64_t>(j) * args.kp_stride_s]) bits |= 1ull << (2 * i + e);
        }
      }
    }
    return bits;
  };
  // -inf for keys past S, causal j > i and key padding. Only blocks that can hold such a key
  // for this group's rows pay for it. Past-S and causal fold into one per-row key limit.
  auto mask_block = [&](int n, uint64_t padding) {
    const int key0 = n * kBlockN;
    const bool partial = key0 + kBlockN > S;
    const bool diagonal = args.causal && key0 + kBlockN - 1 > m0 + 64 * cw;
    if (partial || diagonal) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int limit = (args.causal ? min(S, row0 + 8 * h + 1) : S) - key0 - col0;
#pragma unroll
        for (int i = 0; i < kBlockN / 8; ++i) {
          if (8 * i >= limit) s_acc[4 * i + 2 * h] = -INFINITY;
          if (8 * i + 1 >= limit) s_acc[4 * i + 2 * h + 1] = -INFINITY;
        }
      }
    }
    if (kp != nullptr) {
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if ((padding >> (2 * i + e)) & 1) {
            s_acc[4 * i + e] = -INFINITY;
            s_acc[4 * i + 2 + e] = -INFINITY;
          }
        }
      }
    }
  };
  // Online softmax on the raw scores (scale > 0, so max commutes with it): new row max m',
  // P = exp2(s * sl2 - m' * sl2) in place, alpha = exp2((m - m') * sl2) for O and the sums.
  // A row with nothing visible yet keeps m' = -inf; using 0 as its shift gives P = 0 and
  // alpha = 0 instead of NaN. Row sums stay per thread (quad-reduced once at the end).
  auto softmax_block = [&](float (&alpha)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i)
        mx = fmaxf(mx, fmaxf(s_acc[4 * i + 2 * h], s_acc[4 * i + 2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes sharing the row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float shift = mx == -INFINITY ? 0.f : mx * sl2;
      alpha[h] = exp2f(row_max[h] * sl2 - shift);
      row_max[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(fmaf(s_acc[4 * i + 2 * h + e], sl2, -shift));
          s_acc[4 * i + 2 * h + e] = p;
          sum += p;
        }
      }
      row_sum[h] = row_sum[h] * alpha[h] + sum;
    }
  };
  // The accumulator of S columns 16k..16k+15 (d[8k..8k+7]) is exactly the A fragment of the
  // k-th 16-key slice of P: no shuffles, just packing pairs.
  auto convert_p = [&] {
#pragma unroll
    for (int k = 0; k < kBlockN / 16; ++k)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        p_frag[4 * k + r] = pack2<kBf16>(s_acc[8 * k + 2 * r], s_acc[8 * k + 2 * r + 1]);
  };
  auto release = [&](uint32_t bar) {  // one arrival per warp, after its wgmma wait
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  float alpha[2];
  uint64_t padding = padding_bits(0);
  mbar_wait(bar_q, 0);
  mbar_wait(full_k(0), 0);
  turn_wait();
  wgmma_fence();
  gemm_qk(s_acc, 0);
  wgmma_commit();
  turn_pass(false);
  wgmma_wait<0>();
  fence_regs(s_acc);
  release(empty_k(0));
  mask_block(0, padding);
  softmax_block(alpha);  // O is still 0: nothing to rescale
  convert_p();

  for (int n = 1; n < n_blocks; ++n) {
    const int s = n % kStages, ps = (n - 1) % kStages;
    padding = padding_bits(n);
    mbar_wait(full_k(s), (n / kStages) & 1);
    mbar_wait(full_v(ps), ((n - 1) / kStages) & 1);
    turn_wait();
    wgmma_fence();  // orders the register writes above (P, rescaled O) before the MMAs
    gemm_qk(s_acc, s);
    wgmma_commit();
    gemm_pv(o_acc, p_frag, ps);
    wgmma_commit();
    turn_pass(false);
    wgmma_wait<1>();  // S_n is ready; P_{n-1} V_{n-1} may still run (reads p_frag, writes O)
    fence_regs(s_acc);
    release(empty_k(s));
    mask_block(n, padding);
    softmax_block(alpha);
    wgmma_wait<0>();
    fence_regs(o_acc);
    fence_regs(s_acc);  // keeps convert_p (overwrites p_frag) after the wait
    release(empty_v(ps));
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o_acc[4 * i] *= alpha[0];
      o_acc[4 * i + 1] *= alpha[0];
      o_acc[4 * i + 2] *= alpha[1];
      o_acc[4 * i + 3] *= alpha[1];
    }
    convert_p();
  }
  const int ls = (n_blocks - 1) % kStages;
  mbar_wait(full_v(ls), ((n_blocks - 1) / kStages) & 1);
  turn_wait();
  wgmma_fence();
  gemm_pv(o_acc, p_frag, ls);
  wgmma_commit();
  turn_pass(true);
  wgmma_wait<0>();
  fence_regs(o_acc);

  // ---- epilogue: normalise, lse, O through smem (this group's Q rows) to coalesced stores ----
  const int64_t bh = static_cast<int64_t>(batch) * args.Hq + head;
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[h] = l > 0.f ? 1.f / l : 0.f;  // no visible key: O = 0, lse = -inf
    const float lse = l > 0.f ? (row_max[h] * sl2 + __log2f(l)) * 0.69314718055994531f
                              : -INFINITY;
    const int row = row0 + 8 * h;
    if ((lane & 3) == 0 && row < L) args.lse[bh * L + row] = lse;
  }
  // Staging layout = the TMA Q layout: 16-byte chunk c of local row r at
  // sq + (c / 8) * kBlockM * 128 + (64 cw + r) * 128 + ((c % 8) ^ (r % 8)) * 16, so the
  // fragment writes (8 rows x 4 words per warp store) and the 16-byte reads are conflict-free.
  bar_sync(3 + cw, 128);  // every warp of the group is past its last MMA reading Q
  uint8_t* stage_base = smem_raw + (sq - raw);
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * warp + lane / 4 + 8 * h;
      const uint32_t off = (i / 8) * kBlockM * kRowBytes + (64 * cw + r) * kRowBytes +
                           (((i % 8) ^ (r % 8)) * 16) + 4 * (lane % 4);
      *reinterpret_cast<uint32_t*>(stage_base + off) =
          pack2<kBf16>(o_acc[4 * i + 2 * h] * inv[h], o_acc[4 * i + 2 * h + 1] * inv[h]);
    }
  }
  bar_sync(3 + cw, 128);
  constexpr int kRowChunks = D / 8, kRowsPerPass = 128 / kRowChunks;
  uint16_t* out = static_cast<uint16_t*>(args.out) + batch * args.out_stride[0] +
                  head * args.out_stride[1];
#pragma unroll
  for (int pass = 0; pass < 64 / kRowsPerPass; ++pass) {
    const int r = pass * kRowsPerPass + tid / kRowChunks, c = tid % kRowChunks;
    const int row = m0 + 64 * cw + r;
    const uint32_t off = (c / 8) * kBlockM * kRowBytes + (64 * cw + r) * kRowBytes +
                         (((c % 8) ^ (r % 8)) * 16);
    if (row < L)
      *reinterpret_cast<uint4*>(out + row * args.out_stride[2] + 8 * c) =
          *reinterpret_cast<const uint4*>(stage_base + off);
  }
#else
  __trap();  // never launched: the host side checks for an sm_90 binary first
#endif
}

// ---- host ------------------------------------------------------------------------------------

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;
constexpr int kMaxDevices = 64;

EncodeTiled encode_tiled_fn() {
  // Resolved once through the runtime, so the library does not link libcuda itself.
  static const EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                       cudaEnableDefault, &found);
#else
    cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// 16-byte rules of TMA (and of the epilogue's stores): base 16-byte aligned, byte strides
// multiples of 16 (element strides of 8), inner dim contiguous. Strides of size-1 dims are
// never used (make_map replaces them). sizes: {d0, d1, d2} of the [d0, d1, d2, D] view.
bool aligned_16(const void* data, const int64_t stride[4], const int sizes[3]) {
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0 || stride[3] != 1) return false;
  for (int i = 0; i < 3; ++i)
    if (sizes[i] > 1 && (stride[i] < 0 || stride[i] % 8 != 0)) return false;
  return true;
}

// A 4-D map {D, rows, heads, batch} (innermost first) with box {64, box_rows, 1, 1} and the
// 128B swizzle wgmma reads; out-of-bounds rows come back as zeros (FLOAT_OOB_FILL_NONE).
bool make_map(EncodeTiled encode, CUtensorMap* map, const Strided4& t, DType dtype, int D,
              int rows, int heads, int batch, int box_rows) {
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(rows),
                        static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  int64_t elem_strides[3] = {t.stride[2], t.stride[1], t.stride[0]};
  cuuint64_t strides[3];
  int64_t extent = static_cast<int64_t>(D) * 2;  // bytes spanned by the dims inside
  for (int i = 0; i < 3; ++i) {
    int64_t bytes = elem_strides[i] * 2;
    if (dims[i + 1] == 1) bytes = (extent + 15) / 16 * 16;  // unused: any legal value
    strides[i] = static_cast<cuuint64_t>(bytes);
    extent = bytes * static_cast<int64_t>(dims[i + 1]);
  }
  cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  cuuint32_t elem_step[4] = {1, 1, 1, 1};
  CUresult r = encode(map,
                      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                      4, const_cast<void*>(t.data), dims, strides, box, elem_step,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

template <int D, int kBlockN, bool kBf16>
cudaError_t launch_sm90(const AttentionParams& p, void* out, const int64_t out_stride[4],
                        float* lse, cudaStream_t stream, EncodeTiled encode, int device) {
  auto kernel = attention_fwd_sm90_kernel<D, kBlockN, kBf16>;
  constexpr int smem = Sm90Tile<D, kBlockN>::kSmemBytes;
  // Once per device: a build without sm_90a SASS would run the trap body (a plain sm_90 cubin,
  // e.g. from TORCH_CUDA_ARCH_LIST=9.0) or JIT the sm_80 code, so refuse unless the loaded
  // binary is sm_90 and holds the real kernel (which needs far more than 64 registers).
  static std::atomic<int> state[kMaxDevices];  // 0 unknown, 1 usable, 2 not
  if (device >= kMaxDevices) return cudaErrorNotSupported;
  if (state[device].load(std::memory_order_relaxed) == 0) {
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    if (attr.binaryVersion != 90 || attr.numRegs < 64) {
      state[device].store(2, std::memory_order_relaxed);
    } else {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return err;
      state[device].store(1, std::memory_order_relaxed);
    }
  }
  if (state[device].load(std::memory_order_relaxed) != 1) return cudaErrorNotSupported;

  alignas(64) CUtensorMap tm_q, tm_k, tm_v;
  if (!make_map(encode, &tm_q, p.q, p.dtype, D, p.L, p.Hq, p.B, kBlockM) ||
      !make_map(encode, &tm_k, p.k, p.dtype, D, p.S, p.Hkv, p.B, kBlockN) ||
      !make_map(encode, &tm_v, p.v, p.dtype, D, p.S, p.Hkv, p.B, kBlockN))
    return cudaErrorNotSupported;

  const Sm90Args args{p.L, p.S, p.Hq, p.Hq / p.Hkv, p.scale * 1.4426950408889634f,
                      p.causal ? 1 : 0, p.key_padding, p.kp_stride_b, p.kp_stride_s, out,
                      {out_stride[0], out_stride[1], out_stride[2]}, lse};
  const dim3 grid((p.L + kBlockM - 1) / kBlockM, p.Hq, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(tm_q, tm_k, tm_v, args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_fwd_sm90(const AttentionParams& p, void* out, const int64_t out_stride[4],
                               float* lse, cudaStream_t stream) {
  // Shapes and features (the rest, masks and dropout, is left to the sm_80 kernel).
  if (p.D != p.Dv || (p.D != 64 && p.D != 128)) return cudaErrorNotSupported;
  if (p.dtype != DType::kHalf && p.dtype != DType::kBFloat16) return cudaErrorNotSupported;
  if (p.mask_kind != MaskKind::kNone || p.dropout_p != 0.f) return cudaErrorNotSupported;
  if (p.B < 1 || p.Hq < 1 || p.Hkv < 1 || p.Hq % p.Hkv != 0 || p.L < 1 || p.S < 1)
    return cudaErrorNotSupported;
  if (p.Hq > 65535 || p.B > 65535) return cudaErrorNotSupported;  // grid y, z
  // The softmax takes row maxima of unscaled scores: needs a positive, finite scale.
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) return cudaErrorNotSupported;
  const int q_sizes[3] = {p.B, p.Hq, p.L}, kv_sizes[3] = {p.B, p.Hkv, p.S};
  if (!aligned_16(p.q.data, p.q.stride, q_sizes) || !aligned_16(p.k.data, p.k.stride, kv_sizes) ||
      !aligned_16(p.v.data, p.v.stride, kv_sizes) || !aligned_16(out, out_stride, q_sizes))
    return cudaErrorNotSupported;

  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major != 9) return cudaErrorNotSupported;
  const EncodeTiled encode = encode_tiled_fn();
  if (encode == nullptr) return cudaErrorNotSupported;

  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.D == 64)
    return bf16 ? launch_sm90<64, 128, true>(p, out, out_stride, lse, stream, encode, device)
                : launch_sm90<64, 128, false>(p, out, out_stride, lse, stream, encode, device);
  if (p.causal)
    return bf16 ? launch_sm90<128, 128, true>(p, out, out_stride, lse, stream, encode, device)
                : launch_sm90<128, 128, false>(p, out, out_stride, lse, stream, encode, device);
  return bf16 ? launch_sm90<128, 176, true>(p, out, out_stride, lse, stream, encode, device)
              : launch_sm90<128, 176, false>(p, out, out_stride, lse, stream, encode, device);
}

}  // namespace seqkern::cuda
