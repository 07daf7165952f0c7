// Device pieces shared by the sm_80 attention forward and backward (attention_fwd.cu,
// attention_bwd.cu): element conversions, cp.async tile staging, the score masking rules and
// the dropout hash; the tensor-core MMA and ldmatrix wrappers are in mma.cuh.
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
#include "mma.cuh"

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

// ---- staging --------------------------------------------------------------------------------

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
