// Device pieces shared by the sm_80 attention forward and backward (attention_fwd.cu,
// attention_bwd.cu): element conversions, tensor-core MMA and ldmatrix wrappers, cp.async
// tile staging, the score masking rules and the dropout hash.
//
// Tiles live in shared memory as [rows][HD + kSmemPad] elements (HD: the head dim padded to
// a multiple of 32). The 16-byte pad shifts consecutive rows by one 16-byte bank group, so
// the eight row addresses of an ldmatrix hit eight different bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../dropout_hash.h"
#include "attention.h"

namespace seqkern::cuda::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kSmemPad = 8;  // elements (16 bytes) added to every shared-memory row
constexpr int kMaxHeadDim = 256;

// The head dim a kernel is instantiated for: D rounded up to a multiple of 32.
inline int padded_head_dim(int d) { return (d + 31) / 32 * 32; }

// Calls f(std::integral_constant<int, HD>{}) for the padded head dim of d (1..256).
template <typename F>
cudaError_t dispatch_head_dim(int d, F&& f) {
  switch (padded_head_dim(d)) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 160: return f(std::integral_constant<int, 160>{});
    case 192: return f(std::integral_constant<int, 192>{});
    case 224: return f(std::integral_constant<int, 224>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return cudaErrorNotSupported;
  }
}

// Calls f(T{}) with T = __half or __nv_bfloat16.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  if (dtype == DType::kHalf) return f(__half{});
  if (dtype == DType::kBFloat16) return f(__nv_bfloat16{});
  return cudaErrorNotSupported;
}

// The compute capability and the opt-in shared memory per block of the current device.
inline bool current_device(int* major, int* smem_optin) {
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device) ==
             cudaSuccess &&
         cudaDeviceGetAttribute(smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
             cudaSuccess;
}

// What the sm_80 kernels handle: fp16/bf16, head dims 1..256, any strides and alignment
// (unaligned rows are staged element by element), on a device of compute capability 8.0 or
// newer that gives a block smem_bytes(padded head dim of max(D, Dv)) of shared memory.
template <typename SmemBytes>
bool sm80_supported(const AttentionParams& p, SmemBytes smem_bytes) {
  if (!((p.dtype == DType::kHalf || p.dtype == DType::kBFloat16) && p.D >= 1 &&
        p.D <= kMaxHeadDim && p.Dv >= 1 && p.Dv <= kMaxHeadDim && p.Hkv >= 1 &&
        p.Hq % p.Hkv == 0 && p.dropout_p >= 0.f && p.dropout_p < 1.f))
    return false;
  int major = 0, smem_optin = 0;
  return current_device(&major, &smem_optin) && major >= 8 &&
         smem_bytes(padded_head_dim(p.D > p.Dv ? p.D : p.Dv)) <= static_cast<size_t>(smem_optin);
}

// Whether rows of a [.., rows, cols] view can be copied in 16-byte pieces: base pointer
// 16-byte aligned and every outer stride a multiple of 8 elements.
inline bool rows_16b_aligned(const Strided4& t) {
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.stride[0] % 8 == 0 &&
         t.stride[1] % 8 == 0 && t.stride[2] % 8 == 0;
}

// keep iff (hash >> 8) >= threshold, the integer form of `(hash >> 8) / 2^24 >= p` that the
// reference evaluates in float32: scaling by 2^24 is exact, and the left side is an integer.
inline uint32_t dropout_threshold(float p) {
  return static_cast<uint32_t>(std::ceil(static_cast<double>(p) * 16777216.0));
}

// What the forward and backward kernels both derive from p on the host.
struct KernelConsts {
  float scale_log2;         // scale * log2(e): scores in log2 units, softmax by exp2
  uint32_t drop_threshold;  // dropout_threshold(p.dropout_p)
  float keep_scale;         // 1 / (1 - p.dropout_p)
  bool dropout;
  bool q_aligned, k_aligned, v_aligned;  // rows_16b_aligned
};

inline KernelConsts make_kernel_consts(const AttentionParams& p) {
  KernelConsts c;
  c.scale_log2 = p.scale * kLog2e;
  c.dropout = p.dropout_p > 0.f;
  c.drop_threshold = dropout_threshold(p.dropout_p);
  c.keep_scale = c.dropout ? static_cast<float>(1.0 / (1.0 - p.dropout_p)) : 1.f;
  c.q_aligned = rows_16b_aligned(p.q);
  c.k_aligned = rows_16b_aligned(p.k);
  c.v_aligned = rows_16b_aligned(p.v);
  return c;
}

// Calls f(T{}, std::integral_constant<int, HD>{}) for p's dtype and the padded head dim of
// max(D, Dv): Q, K and V share one padded size, so one instantiation serves D != Dv.
template <typename F>
cudaError_t dispatch_kernel(const AttentionParams& p, F&& f) {
  return dispatch_dtype(p.dtype, [&](auto t) {
    return dispatch_head_dim(p.D > p.Dv ? p.D : p.Dv, [&](auto hd) { return f(t, hd); });
  });
}

// Raises the kernel's dynamic shared memory limit to `bytes` (over 48 KiB needs the opt-in).
template <typename Kernel>
cudaError_t prepare_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// ---- elements ------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// Row i of slice (b, h) of a strided 4-D tensor.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* data, const int64_t (&stride)[4], int b,
                                            int h, int i) {
  return static_cast<const T*>(data) + b * stride[0] + h * stride[1] + i * stride[2];
}

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

// ---- staging --------------------------------------------------------------------------------

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

// Stages rows [0, ROWS) x columns [0, HD) of a row-major global tile (row stride
// row_stride elements, last stride 1) into shared memory [ROWS][HD + kSmemPad], with zeros
// past `rows` and `cols` so that padded rows and head-dim tails add nothing to any product.
// Whole 16-byte pieces go by cp.async when `aligned` (rows_16b_aligned); the rest element by
// element. Every thread of the block calls it; the caller commits, waits and syncs.
template <int ROWS, int HD, int NTHREADS, typename T>
__device__ __forceinline__ void stage_tile(T* smem, const T* gmem, int64_t row_stride, int rows,
                                           int cols, bool aligned) {
  constexpr int kPieces = HD / 8, kLd = HD + kSmemPad;
  for (int idx = threadIdx.x; idx < ROWS * kPieces; idx += NTHREADS) {
    const int r = idx / kPieces, c = (idx % kPieces) * 8;
    T* dst = smem + r * kLd + c;
    uint4 piece = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows && c < cols) {
      const T* src = gmem + r * row_stride + c;
      if (aligned && c + 8 <= cols) {
        cp_async16(dst, src);
        continue;
      }
      const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int e = 0; e < 8; ++e)  // unrolled: constant indices keep w in registers
        if (c + e < cols) w[e / 2] |= static_cast<uint32_t>(s16[e]) << (16 * (e & 1));
      piece = make_uint4(w[0], w[1], w[2], w[3]);
    }
    *reinterpret_cast<uint4*>(dst) = piece;
  }
}

// ---- masking and dropout ------------------------------------------------------------------

// The score of query i and key j in log2 units (s = scale * log2(e) * q.k), with the float
// mask added and -inf for hidden keys: past the ends (i >= L, j >= S), causal j > i, key
// padding, bool mask false. Reads no memory for positions outside [0, L) x [0, S).
template <typename T>
__device__ __forceinline__ float masked_score(const AttentionParams& p, int b, int h, int i,
                                              int j, float s) {
  if (i >= p.L || j >= p.S || (p.causal && j > i)) return -INFINITY;
  if (p.key_padding != nullptr && p.key_padding[b * p.kp_stride_b + j * p.kp_stride_s])
    return -INFINITY;
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t off = b * p.mask.stride[0] + h * p.mask.stride[1] + i * p.mask.stride[2] +
                        j * p.mask.stride[3];
    if (p.mask_kind == MaskKind::kBool) {
      if (static_cast<const uint8_t*>(p.mask.data)[off] == 0) return -INFINITY;
    } else {
      s += to_float(static_cast<const T*>(p.mask.data)[off]) * kLog2e;
    }
  }
  return s;
}

// Whether a tile of query rows i0.. and keys j0..j0+bn-1 needs masked_score per element:
// any mask, keys past S, or causal keys beyond the tile's first row. Rows past L need none:
// their zero queries make finite scores that are never stored (forward) or that meet an
// lse of +inf (backward).
__device__ __forceinline__ bool tile_needs_mask(const AttentionParams& p, int i0, int j0,
                                                int bn) {
  return p.mask_kind != MaskKind::kNone || p.key_padding != nullptr || j0 + bn > p.S ||
         (p.causal && j0 + bn - 1 > i0);
}

// Dropout keeps element (b, h, i, j) iff this is true; c = ((b*Hq + h)*L + i)*S + j + offset
// in wrapping uint64 arithmetic, as seqkern.reference.dropout_keep_mask (int64 there: same
// bits) and the CPU kernel.
__host__ __device__ __forceinline__ bool dropout_keep(const AttentionParams& p, uint32_t threshold, int b,
                                             int h, int i, int j) {
  const uint64_t c = ((static_cast<uint64_t>(b) * p.Hq + h) * p.L + i) * p.S + j + p.offset;
  uint32_t bits = fmix32(static_cast<uint32_t>(c) ^ static_cast<uint32_t>(p.seed));
  bits = fmix32(bits ^ static_cast<uint32_t>(c >> 32) ^ static_cast<uint32_t>(p.seed >> 32));
  return (bits >> 8) >= threshold;
}

}  // namespace seqkern::cuda::detail
