// sm_80 pieces shared by the attention kernels and the recurrent layer's MMA blocks: bf16 /
// fp16 mma.sync m16n8k16 (and TF32 m16n8k8) with fp32 accumulation, ldmatrix loads from
// shared memory, the row addresses of their three patterns, and cp.async copies. Inline PTX
// (sm_80+); the CUDA emulation (tests/cuda_emulation) replaces the PTX wrappers with host
// versions of the same layouts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace seqkern::cuda::detail {

// Two floats as one 32-bit MMA operand register: lo in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint16_t a, b;
  if constexpr (std::is_same_v<T, __half>) {
    a = __half_as_ushort(__float2half_rn(lo));
    b = __half_as_ushort(__float2half_rn(hi));
  } else {
    a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  }
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// ---- tensor cores ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, and r[m] holds
// this lane's two elements of matrix m (row lane/4, columns 2*(lane%4), +1; transposed with
// .trans). The "memory" clobber keeps the loads after the barriers that publish the tile.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr))
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr))
               : "memory");
}

// c (16x8 fp32) += a (16x16, row-major fragment) * b (16x8, column fragment b0, b1).
// Fragment layout (PTX ISA, mma.m16n8k16): g = lane / 4, t = lane % 4; c[0], c[1] are row g,
// columns 2t, 2t+1; c[2], c[3] row g + 8; a = {rows g, g+8} x {k 2t.., k 2t+8..}.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// fp32 rounded to TF32 (10 mantissa bits, to nearest, ties away), as a float whose low 13
// bits are zero: what mma_1688_tf32 reads exactly.
__device__ __forceinline__ float to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

// c (16x8 fp32) += a (16x8 TF32, row-major fragment) * b (8x8 TF32, column fragment b0, b1).
// Fragment layout (PTX ISA, mma.m16n8k8 .tf32): g = lane / 4, t = lane % 4; a = {A[g][t],
// A[g+8][t], A[g][t+4], A[g+8][t+4]}, b = {B[t][g], B[t+4][g]}; c as mma_16816's.
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4],
                                              uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c0 += a * {b[0], b[1]} and c1 += a * {b[2], b[3]}: the two n8 tiles of one x4 B load.
template <typename T>
__device__ __forceinline__ void mma_16816_x2(float (&c0)[4], float (&c1)[4],
                                             const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  mma_16816<T>(c0, a, b[0], b[1]);
  mma_16816<T>(c1, a, b[2], b[3]);
}

// Row addresses for the three ldmatrix patterns of a 16x16 block at (r0, c0) of a tile with
// leading dimension ld (elements):
//  a_rows:   A operand of a row-major [m][k] tile (r0: m, c0: k).
//  b_rows:   B operands of two n8 tiles from a [n][k] tile (r0: n, c0: k); r = {b0, b1} of
//            n-tile 0, then of n-tile 1.
//  b_trans:  same from a [k][n] tile with .trans (r0: k, c0: n).
// a_trans (A from a [k][m] tile with .trans) has b_rows's addresses with the roles swapped.
template <typename T>
__device__ __forceinline__ const T* a_rows(const T* tile, int ld, int r0, int c0, int lane) {
  return tile + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8;
}
template <typename T>
__device__ __forceinline__ const T* b_rows(const T* tile, int ld, int r0, int c0, int lane) {
  return tile + (r0 + (lane & 7) + (lane >> 4) * 8) * ld + c0 + ((lane >> 3) & 1) * 8;
}
template <typename T>
__device__ __forceinline__ const T* b_trans(const T* tile, int ld, int r0, int c0, int lane) {
  return tile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + c0 + (lane >> 4) * 8;
}

// acc (16 x 16 NP, as 2 NP n8 tiles) += A (16 x 16 KS) B (16 KS x 16 NP), both from shared
// memory: A row-major [m][k] at (a_r0, a_c0); B stored [n][k] at (b_r0, b_c0) when
// B_STORED_NK (Q K^T-like products), else [k][n] (P V-like products, ldmatrix .trans).
template <typename T, int KS, int NP, bool B_STORED_NK>
__device__ __forceinline__ void warp_mma_smem(float (&acc)[2 * NP][4], const T* a, int lda,
                                              int a_r0, int a_c0, const T* b, int ldb,
                                              int b_r0, int b_c0, int lane) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t af[4];
    ldsm_x4(af, a_rows(a, lda, a_r0, a_c0 + kk * 16, lane));
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t bf[4];
      if constexpr (B_STORED_NK)
        ldsm_x4(bf, b_rows(b, ldb, b_r0 + np * 16, b_c0 + kk * 16, lane));
      else
        ldsm_x4_trans(bf, b_trans(b, ldb, b_r0 + kk * 16, b_c0 + np * 16, lane));
      mma_16816_x2<T>(acc[2 * np], acc[2 * np + 1], af, bf);
    }
  }
}

// ---- asynchronous copies ------------------------------------------------------------------

// 16 bytes global -> shared through L2 (.cg), completed by cp_async_wait_all.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}
// Waits for all of this thread's committed copy groups but the newest n.
template <int n>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}

}  // namespace seqkern::cuda::detail
