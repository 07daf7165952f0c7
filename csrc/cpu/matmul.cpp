#include "matmul.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <ATen/Parallel.h>

#include "buffer_cache.h"
#include "round_bf16_kernel.h"
#include "rows_dot_kernel.h"
#include "threads.h"
#include "transpose_kernel.h"
#include <ATen/native/CPUBlas.h>

namespace seqkern::cpu {
namespace {
constexpr int64_t kTileM = 64;
constexpr int64_t kPanel = kPanelWidth;  // output columns per tile
constexpr int64_t kChunkK = 512;

// Runs body(c0, cols) over the source columns [0, C) of a transpose in stripes of 16 (16
// output rows a task), in parallel.
template <typename Body>
void for_column_stripes(int64_t C, const Body& body) {
  constexpr int64_t kStripe = 16;
  parallel_for(0, (C + kStripe - 1) / kStripe, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      body(s * kStripe, std::min(C, (s + 1) * kStripe) - s * kStripe);
  });
}

// Whether a 2-D tensor is a row-major matrix brgemm can read: unit column stride and a row
// stride of at least one row (degenerate strides of size-1 dims excluded).
bool row_major(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) && (t.stride(0) >= t.size(1) || t.size(0) <= 1) &&
         t.stride(0) >= 1;
}
}  // namespace

PackedRight pack_right(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2, "pack_right: b must be 2-D");
  const int64_t K = b.size(0), N = b.size(1);
  if (b.scalar_type() != at::kFloat) return {b, K, N};
  const int64_t n_panels = (N + kPanel - 1) / kPanel;
  // With N a multiple of the panel width the panels are written straight into a cached
  // (already mapped) buffer: a tiled transpose of W's row blocks when b = W^T, else one
  // batched copy of b's column blocks. A weight is repacked on every call, and per-panel
  // copies into fresh zeroed memory cost ~1 ms per 4 MB weight on these machines.
  if (N % kPanel == 0) {
    at::Tensor panels = cached_empty({n_panels, K, kPanel}, b.options());
    if (b.stride(0) == 1) {  // b = W^T, W row-major [N, K]: each panel is a W row block^T
      const float* w = b.data_ptr<float>();
      float* out = panels.data_ptr<float>();
      const int64_t ldw = b.stride(1);
      parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          run_transpose_block(w + p * kPanel * ldw, kPanel, K, ldw, out + p * K * kPanel,
                              kPanel);
      });
    } else if (b.stride(1) == 1) {  // row-major b: each row's 64-column pieces to their panels
      const float* src = b.data_ptr<float>();
      float* out = panels.data_ptr<float>();
      const int64_t ld = b.stride(0);
      parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t p = 0; p < n_panels; ++p)
            std::memcpy(out + (p * K + k) * kPanel, src + k * ld + p * kPanel,
                        kPanel * sizeof(float));
      });
    } else {
      panels.copy_(b.view({K, n_panels, kPanel}).permute({1, 0, 2}));
    }
    return {panels, K, N};
  }
  at::Tensor panels = at::zeros({n_panels, K, kPanel}, b.options());
  for (int64_t p = 0; p < n_panels; ++p) {
    const int64_t cols = std::min(kPanel, N - p * kPanel);
    panels[p].narrow(1, 0, cols).copy_(b.narrow(1, p * kPanel, cols));
  }
  return {panels, K, N};
}

void tiled_matmul_into(at::Tensor& out, const at::Tensor& a_in, const PackedRight& b,
                       bool accumulate) {
  TORCH_CHECK(a_in.dim() == 2 && out.dim() == 2 && a_in.size(1) == b.K &&
                  out.size(0) == a_in.size(0) && out.size(1) == b.N,
              "tiled_matmul_into: shapes do not match");
  const int64_t M = a_in.size(0), N = b.N, K = b.K;
  if (M == 0 || N == 0) return;
  if (out.scalar_type() != at::kFloat || K == 0) {
    const at::Tensor b_mat =
        b.layout == PackedRight::Layout::kWeightRows ? b.panels.t() : b.panels;
    if (accumulate) out.addmm_(a_in, b_mat);
    else if (K == 0) out.zero_();
    else at::mm_out(out, a_in, b_mat);
    return;
  }
  if (!row_major(out)) {
    at::Tensor dense = accumulate ? out.contiguous() : at::empty(out.sizes(), out.options());
    tiled_matmul_into(dense, a_in, b, accumulate);
    out.copy_(dense);
    return;
  }
  const at::Tensor a = row_major(a_in) ? a_in : a_in.contiguous();
  tiled_matmul_raw(M, a.data_ptr<float>(), a.stride(0), b, out.data_ptr<float>(), out.stride(0),
                   accumulate);
}

namespace {
// Output tile (panel np, rows [m0, m0 + kTileM) of M) of C (+)= A @ b, its reduction in chunks
// of kChunkK so that the tile's slices of A and of the panel stay in cache while the C tile
// stays in L1; `backwards` takes the chunks in the opposite order. A is float (b fp32
// panels) or bf16 (b from pack_right_bf16: a k pair per 32-bit unit, 64 units a panel row).
template <typename TA>
void tile_product(const TA* A, int64_t lda, const PackedRight& b, float* C, int64_t ldc,
                  bool accumulate, bool backwards, int64_t np, int64_t m0, int64_t M) {
  constexpr bool kBf16 = std::is_same_v<TA, at::BFloat16>;
  const int64_t K = b.K, n0 = np * kPanel;
  const int64_t rows = std::min(kTileM, M - m0), cols = std::min(kPanel, b.N - n0);
  const int64_t k_chunks = (K + kChunkK - 1) / kChunkK;
  const float* P = b.panels.data_ptr<float>();
  // kRowMajor: b itself, its row stride instead of the panel width
  const bool row_major_b = b.layout == PackedRight::Layout::kRowMajor;
  const int64_t ldb = row_major_b ? b.panels.stride(0) : kPanel;
  for (int64_t j = 0; j < k_chunks; ++j) {
    const int64_t k0 = (backwards ? k_chunks - 1 - j : j) * kChunkK;
    const bool add = accumulate || j > 0;
    if constexpr (kBf16) {  // panel np starts at unit np * (K / 2) * 64; k0 is even
      const auto* panel = reinterpret_cast<const at::BFloat16*>(P + (np * K + k0) / 2 * kPanel);
      at::native::cpublas::brgemm(rows, cols, std::min(kChunkK, K - k0), lda, kPanel, ldc, add,
                                  A + m0 * lda + k0, panel, C + m0 * ldc + n0, /*is_vnni=*/true);
    } else {
      at::native::cpublas::brgemm(rows, cols, std::min(kChunkK, K - k0), lda, ldb, ldc, add,
                                  A + m0 * lda + k0,
                                  row_major_b ? P + k0 * ldb + n0 : P + (np * K + k0) * kPanel,
                                  C + m0 * ldc + n0, /*is_vnni=*/false);
    }
  }
}

// keep_weight's operand: W's rows [n0, n1) on this thread (fp32 A with an fp32, fp16 or bf16
// W; bf16 A with bf16 W).
template <typename TA>
void weight_rows_product(int64_t M, const TA* A, int64_t lda, const PackedRight& b,
                         int64_t n0, int64_t n1, float* C, int64_t ldc, bool accumulate) {
  const auto run = [&](const auto* W) {
    run_rows_dot(M, b.K, A, lda, W, b.panels.stride(0), n0, n1, C, ldc, accumulate);
  };
  if constexpr (std::is_same_v<TA, float>) {
    switch (b.panels.scalar_type()) {
      case at::kHalf: return run(b.panels.data_ptr<at::Half>());
      case at::kBFloat16: return run(b.panels.data_ptr<at::BFloat16>());
      default: return run(b.panels.data_ptr<float>());
    }
  } else {
    run(b.panels.data_ptr<TA>());
  }
}

template <typename TA>
void tiled_product(int64_t M, const TA* A, int64_t lda, const PackedRight& b, float* C,
                   int64_t ldc, bool accumulate, bool backwards) {
  const int64_t N = b.N, K = b.K;
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.f);
    return;
  }
  if (b.layout == PackedRight::Layout::kWeightRows) {
    // W's rows in groups of at least 4 over the threads, each worth a task (2^16 FMAs)
    const int64_t grain = std::max<int64_t>(4, ((int64_t(1) << 16) / (M * K) + 3) / 4 * 4);
    parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      weight_rows_product(M, A, lda, b, n0, n1, C, ldc, accumulate);
    });
    return;
  }
  const int64_t m_tiles = (M + kTileM - 1) / kTileM, n_tiles = (N + kPanel - 1) / kPanel;
  parallel_for(0, m_tiles * n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t tile = backwards ? begin + end - 1 - i : i;
      tile_product(A, lda, b, C, ldc, accumulate, backwards, tile / m_tiles,
                   (tile % m_tiles) * kTileM, M);
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/std::is_same_v<TA, at::BFloat16>);
  });
}

template <typename TA>
void panel_product(int64_t M, const TA* A, int64_t lda, const PackedRight& b, int64_t panel0,
                   int64_t panels, float* C, int64_t ldc, bool accumulate, bool backwards) {
  if (M == 0 || panels == 0) return;
  if (b.layout == PackedRight::Layout::kWeightRows && b.K > 0) {
    const int64_t n0 = panel0 * kPanel, n1 = std::min(b.N, (panel0 + panels) * kPanel);
    return weight_rows_product(M, A, lda, b, n0, n1, C, ldc, accumulate);
  }
  if (b.K == 0) {
    const int64_t n0 = panel0 * kPanel, n1 = std::min(b.N, (panel0 + panels) * kPanel);
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc + n0, C + m * ldc + n1, 0.f);
    return;
  }
  const int64_t m_tiles = (M + kTileM - 1) / kTileM;
  for (int64_t i = 0; i < panels * m_tiles; ++i) {
    const int64_t tile = backwards ? panels * m_tiles - 1 - i : i;
    tile_product(A, lda, b, C, ldc, accumulate, backwards, panel0 + tile / m_tiles,
                 (tile % m_tiles) * kTileM, M);
  }
  at::native::cpublas::brgemm_release(/*is_vnni=*/std::is_same_v<TA, at::BFloat16>);
}
}  // namespace

// Parallel over output tiles, one task each; `backwards` walks a thread's tiles (and each
// tile's chunks) in the opposite order: what the previous call read last is still in this
// core's L2 and is read first.
void tiled_matmul_raw(int64_t M, const float* A, int64_t lda, const PackedRight& b, float* C,
                      int64_t ldc, bool accumulate, bool backwards) {
  TORCH_CHECK(!b.bf16, "tiled_matmul_raw: bf16 panels need a bf16 left operand");
  tiled_product(M, A, lda, b, C, ldc, accumulate, backwards);
}

void tiled_matmul_raw(int64_t M, const at::BFloat16* A, int64_t lda, const PackedRight& b,
                      float* C, int64_t ldc, bool accumulate, bool backwards) {
  TORCH_CHECK(b.bf16, "tiled_matmul_raw: a bf16 left operand needs pack_right_bf16's panels");
  tiled_product(M, A, lda, b, C, ldc, accumulate, backwards);
}

void panel_matmul_raw(int64_t M, const float* A, int64_t lda, const PackedRight& b,
                      int64_t panel0, int64_t panels, float* C, int64_t ldc, bool accumulate,
                      bool backwards) {
  TORCH_CHECK(!b.bf16, "panel_matmul_raw: bf16 panels need a bf16 left operand");
  panel_product(M, A, lda, b, panel0, panels, C, ldc, accumulate, backwards);
}

void panel_matmul_raw(int64_t M, const at::BFloat16* A, int64_t lda, const PackedRight& b,
                      int64_t panel0, int64_t panels, float* C, int64_t ldc, bool accumulate,
                      bool backwards) {
  TORCH_CHECK(b.bf16, "panel_matmul_raw: a bf16 left operand needs pack_right_bf16's panels");
  panel_product(M, A, lda, b, panel0, panels, C, ldc, accumulate, backwards);
}

bool keeps_weight(const at::Tensor& w, bool bf16_products) {
  const at::ScalarType t = w.scalar_type();
  return w.dim() == 2 && row_major(w) &&
         (bf16_products ? t == at::kBFloat16
                        : t == at::kFloat || t == at::kHalf || t == at::kBFloat16);
}

PackedRight keep_weight(const at::Tensor& w, bool bf16_products) {
  TORCH_CHECK(keeps_weight(w, bf16_products),
              "keep_weight: w must be a row-major fp32, fp16 or bf16 matrix (bf16 for bf16 "
              "products)");
  PackedRight kept{w, w.size(1), w.size(0)};
  kept.layout = PackedRight::Layout::kWeightRows;
  kept.bf16 = bf16_products;
  return kept;
}

PackedRight keep_rows(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kFloat && row_major(b),
              "keep_rows: b must be a row-major fp32 matrix");
  PackedRight kept{b, b.size(0), b.size(1)};
  kept.layout = PackedRight::Layout::kRowMajor;
  return kept;
}

PackedRight pack_right_bf16(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 && b.size(0) % 2 == 0,
              "pack_right_bf16: b must be 2-D with an even number of rows");
  const int64_t K = b.size(0), N = b.size(1);
  // W = b^T rounded to bf16, row-major [N, K]: its k pairs are 32-bit units [N, K / 2], and a
  // VNNI panel is a 64-row block of those units transposed, which is what pack_right does to
  // 32-bit elements (moved as float bit patterns, never computed with).
  const at::Tensor w = b.t().to(at::kBFloat16).contiguous();
  const at::Tensor units = at::from_blob(w.data_ptr(), {N, K / 2}, w.options().dtype(at::kFloat));
  PackedRight packed = pack_right(units.t());
  return {packed.panels, K, N, /*bf16=*/true};
}

PackedRight pack_rows_bf16(const at::Tensor& b_in) {
  TORCH_CHECK(b_in.dim() == 2 && b_in.scalar_type() == at::kBFloat16,
              "pack_rows_bf16: b must be a 2-D bf16 matrix");
  const at::Tensor b = b_in.stride(1) == 1 || b_in.size(1) <= 1 ? b_in : b_in.contiguous();
  const int64_t K = b.size(0), N = b.size(1), pairs = (K + 1) / 2;
  const int64_t n_panels = (N + kPanel - 1) / kPanel, ld = b.stride(0);
  at::Tensor panels = cached_empty({n_panels, pairs, kPanel}, b.options().dtype(at::kFloat));
  if (K == 0 || N == 0) return {panels, 2 * pairs, N, /*bf16=*/true};
  // bf16 moved as its bits: unit (q, j) of panel p = b[2q, 64p + j] | b[2q + 1, 64p + j] << 16.
  const auto* src = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
  auto* out = reinterpret_cast<uint32_t*>(panels.data_ptr<float>());
  parallel_for(0, pairs, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const uint16_t* lo = src + 2 * q * ld;
      const uint16_t* hi = 2 * q + 1 < K ? lo + ld : nullptr;
      for (int64_t p = 0; p < n_panels; ++p) {
        uint32_t* dst = out + (p * pairs + q) * kPanel;
        const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
        if (hi) {
          for (int64_t j = 0; j < cols; ++j)
            dst[j] = uint32_t(lo[n0 + j]) | uint32_t(hi[n0 + j]) << 16;
        } else {
          for (int64_t j = 0; j < cols; ++j) dst[j] = uint32_t(lo[n0 + j]);
        }
        std::fill(dst + cols, dst + kPanel, 0u);
      }
    }
  });
  return {panels, 2 * pairs, N, /*bf16=*/true};
}

at::Tensor transposed_bf16(const at::Tensor& m) {
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kFloat && m.stride(1) == 1,
              "transposed_bf16: m must be a row-major fp32 matrix");
  const int64_t R = m.size(0), C = m.size(1), Rp = R + R % 2;
  at::Tensor out = cached_empty({C, Rp}, m.options().dtype(at::kBFloat16));
  const float* src = m.data_ptr<float>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  const int64_t ld = m.stride(0);
  for_column_stripes(C, [&](int64_t c0, int64_t cols) {
    run_transpose_round_bf16(src + c0, R, cols, ld, dst + c0 * Rp, Rp);
    if (Rp > R)
      for (int64_t c = c0; c < c0 + cols; ++c) dst[c * Rp + R] = at::BFloat16(0.f);
  });
  return out;
}

bool bf16_products_available() {
  static const bool native = [] {
#if defined(__x86_64__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1, avx512f = (ebx >> 16) & 1;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    const bool avx512_bf16 = (eax >> 5) & 1;
    if (!avx512f || !avx512_bf16 || amx_bf16 || !at::globalContext().userEnabledMkldnn())
      return false;
    // oneDNN may still refuse (ONEDNN_MAX_CPU_ISA below AVX-512): one small product, checked.
    try {
      at::BFloat16 a[2] = {at::BFloat16(1.f), at::BFloat16(2.f)};
      at::BFloat16 panel[kPanel * 2];
      for (int64_t n = 0; n < kPanel; ++n)
        panel[2 * n] = at::BFloat16(float(n + 1)), panel[2 * n + 1] = at::BFloat16(1.f);
      float c[kPanel];
      at::native::cpublas::brgemm(1, kPanel, 2, 2, kPanel, kPanel, false, a, panel, c,
                                  /*is_vnni=*/true);
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);
      for (int64_t n = 0; n < kPanel; ++n)
        if (c[n] != float(n + 3)) return false;
      return true;
    } catch (const std::exception&) {
      return false;
    }
#else
    return false;
#endif
  }();
  const char* env = std::getenv("SEQKERN_CPU_BF16_PRODUCTS");
  return native && !(env && env[0] == '0');
}

void matmul_once_into(at::Tensor& out, const at::Tensor& a_in, const at::Tensor& b_in,
                      bool accumulate) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(0) &&
                  out.dim() == 2 && out.size(0) == a_in.size(0) && out.size(1) == b_in.size(1),
              "matmul_once_into: shapes do not match");
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(1);
  if (M == 0 || N == 0) return;
  const bool fp32 = a_in.scalar_type() == at::kFloat && b_in.scalar_type() == at::kFloat &&
                    out.scalar_type() == at::kFloat;
  if (!fp32 || K == 0 || !row_major(out)) {
    if (accumulate) out.addmm_(a_in, b_in);
    else if (K == 0) out.zero_();
    else at::mm_out(out, a_in, b_in);
    return;
  }
  const at::Tensor a = row_major(a_in) ? a_in : a_in.contiguous();
  const at::Tensor b = row_major(b_in) ? b_in : b_in.contiguous();
  const float* A = a.data_ptr<float>();
  const float* Bp = b.data_ptr<float>();
  float* C = out.data_ptr<float>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = out.stride(0);
  const int64_t m_tiles = (M + kTileM - 1) / kTileM, n_tiles = (N + kPanel - 1) / kPanel;
  parallel_for(0, m_tiles * n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = (tile / m_tiles) * kPanel, m0 = (tile % m_tiles) * kTileM;
      const int64_t rows = std::min(kTileM, M - m0), cols = std::min(kPanel, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kChunkK)
        at::native::cpublas::brgemm(rows, cols, std::min(kChunkK, K - k0), lda, ldb, ldc,
                                    /*add_C=*/accumulate || k0 > 0, A + m0 * lda + k0,
                                    Bp + k0 * ldb + n0, C + m0 * ldc + n0, /*is_vnni=*/false);
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

at::Tensor transposed(const at::Tensor& m) {
  TORCH_CHECK(m.dim() == 2, "transposed: m must be 2-D");
  const int64_t R = m.size(0), C = m.size(1);
  if (m.scalar_type() != at::kFloat || m.stride(1) != 1) return m.t().contiguous();
  at::Tensor out = cached_empty({C, R}, m.options());
  const float* src = m.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t ld = m.stride(0);
  for_column_stripes(C, [&](int64_t c0, int64_t cols) {
    run_transpose_block(src + c0, R, cols, ld, dst + c0 * R, R);
  });
  return out;
}

at::Tensor matmul_once(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "matmul_once: operands must be 2-D");
  // Cached memory for large results (a cell's weight gradients, 4 MB each for an H = 512
  // LSTM): fresh ones were faulted in page by page on every step.
  at::Tensor out = cached_empty({a.size(0), b.size(1)}, a.options());
  matmul_once_into(out, a, b, false);
  return out;
}

}  // namespace seqkern::cpu
