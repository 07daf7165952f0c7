// Runs csrc/cuda/rnn_layer.cu (rewritten by build.py) on the host: a layer's forward (with
// the training workspace) and backward. Usage: rnn_layer_harness IN OUT (formats: rnn.py's
// run_layer). The emulated device's multiprocessor count, cooperative-launch support and the
// minimum work per block come from the input, to steer the plan between the persistent
// kernel (one cooperative launch, grid barriers) and the per-step fallback, and the opt-in
// shared memory per block too (small: the batch-lane backward stages K in chunks). Prints
// the plans on stderr.
#include "emu_runtime.h"

#include "rnn_layer.cu"
#include "harness_io.h"

using namespace seqkern::cuda::rnn;

namespace {
template <class Cell, class T, int BT, bool Mma = false>
void register_kernels() {
  auto launcher = [](bool backward) {
    return [backward](dim3 g, dim3 b, size_t smem, bool coop, void** args) {
      const Cell c = *static_cast<Cell*>(args[0]);
      const KernelArgs a = *static_cast<KernelArgs*>(args[1]);
      const int begin = *static_cast<int*>(args[2]), end = *static_cast<int*>(args[3]);
      emu_run(g, b, smem, coop, [&] {
        if constexpr (BT <= 32) {  // 64-row tiles: forward only (rnn_layer.cu's kernel_ptr)
          if (backward) return layer_bwd_kernel<Cell, T, BT, Mma>(c, a, begin, end);
        }
        layer_fwd_kernel<Cell, T, BT, Mma>(c, a, begin, end);
      });
    };
  };
  emu_registry()[kernel_ptr<Cell, T>(false, BT, Mma)] = launcher(false);
  if constexpr (BT <= 32) emu_registry()[kernel_ptr<Cell, T>(true, BT, Mma)] = launcher(true);
}
// The backward's wide tensor-core blocks (SEQKERN_CUDA_RNN_WIDE=1): 16-row tiles only.
template <class Cell, class T>
void register_wide_kernel() {
  emu_registry()[kernel_ptr<Cell, T>(true, 16, true, true)] =
      [](dim3 g, dim3 b, size_t smem, bool coop, void** args) {
        const Cell c = *static_cast<Cell*>(args[0]);
        const KernelArgs a = *static_cast<KernelArgs*>(args[1]);
        const int begin = *static_cast<int*>(args[2]), end = *static_cast<int*>(args[3]);
        emu_run(g, b, smem, coop, [&] {
          layer_bwd_kernel<Cell, T, 16, true, kMmaUnitsWide>(c, a, begin, end);
        });
      };
}
template <class Cell>
void register_cell() {
  [&]<class... T>(T...) {
    ((register_kernels<Cell, T, 1>(), register_kernels<Cell, T, 4>(),
      register_kernels<Cell, T, 8>(), register_kernels<Cell, T, 16>(),
      register_kernels<Cell, T, 32>(),
      register_kernels<Cell, T, 64>()), ...);
  }(float{}, __half{}, __nv_bfloat16{});
  // tensor-core blocks (fp32: TF32), 16- and 32-row tiles
  [&]<class... T>(T...) {
    ((register_kernels<Cell, T, 16, true>(), register_kernels<Cell, T, 32, true>(),
      register_wide_kernel<Cell, T>()), ...);
  }(float{}, __half{}, __nv_bfloat16{});
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  register_cell<dev::Lstm>(), register_cell<dev::Gru>(), register_cell<dev::Rnn>();
  g_emu_cc_major = 9;
  Reader in{fopen(argv[1], "rb")};
  int hdr[12];
  in.ints(hdr, 12);
  const int mode = hdr[0], dti = hdr[1], T = hdr[2], B = hdr[3], H = hdr[4], packed = hdr[5],
            reverse = hdr[6], bias = hdr[7], training = hdr[8], strided = hdr[9];
  g_emu_sms = hdr[10], g_emu_coop = hdr[11];
  in.ints(&g_emu_min_work, 1);
  in.ints(&g_emu_smem_optin, 1);
  std::vector<int64_t> batch_sizes(packed ? T : 0);
  in.ints(batch_sizes.data(), batch_sizes.size());
  LayerProblem p;
  p.cell = CellKind(mode), p.dtype = DType(dti), p.steps = T, p.batch = B, p.hidden = H;
  p.batch_sizes = packed ? batch_sizes.data() : nullptr, p.reverse = reverse;
  const int64_t N = rnn_layer_rows(p), GH = gate_count(p.cell) * int64_t(H);
  const bool lstm = p.cell == CellKind::kLSTM, gru = p.cell == CellKind::kGRU;
  auto x_gates = in.floats(N * GH);
  auto bias_x = in.floats(bias ? GH : 0), bias_hn = in.floats(bias && gru ? H : 0);
  auto w = in.floats(GH * H), h0 = in.floats(B * H), c0 = in.floats(lstm ? B * H : 0);
  auto g_out = in.floats(N * H), d_h = in.floats(B * H), d_c = in.floats(lstm ? B * H : 0);
  // W_hh and the initial states transposed in memory when `strided`
  Store w_s(p.dtype, GH * H), h0_s(p.dtype, B * H), c0_s(p.dtype, B * H), go_s(p.dtype, N * H);
  for (int64_t r = 0; r < GH; ++r)
    for (int64_t k = 0; k < H; ++k) w_s.set(strided ? k * GH + r : r * H + k, w[r * H + k]);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < H; ++j) {
      h0_s.set(strided ? j * B + b : b * H + j, h0[b * H + j]);
      if (lstm) c0_s.set(strided ? j * B + b : b * H + j, c0[b * H + j]);
    }
  for (int64_t i = 0; i < N * H; ++i) go_s.set(i, g_out[i]);
  const Strided2 W{w_s.data(), strided ? 1 : H, strided ? GH : 1};
  const Strided2 H0{h0_s.data(), strided ? 1 : H, strided ? B : 1};
  const Strided2 C0{c0_s.data(), strided ? 1 : H, strided ? B : 1};
  Store out(p.dtype, N * H), h_n(p.dtype, B * H), c_n(p.dtype, B * H);
  std::vector<float> ws(training ? rnn_layer_workspace_numel(p) : 0, NAN);
  LayerPlan plan_f{}, plan_b{};
  rnn_layer_plan(p, false, &plan_f), rnn_layer_plan(p, true, &plan_b);
  cudaError_t e = rnn_layer_fwd(p, x_gates.data(), bias ? bias_x.data() : nullptr,
                                bias && gru ? bias_hn.data() : nullptr, W, H0, C0, out.data(),
                                h_n.data(), lstm ? c_n.data() : nullptr,
                                training ? ws.data() : nullptr,
                                emu_device_alloc(rnn_layer_fwd_scratch_bytes(p)), nullptr);
  if (e != cudaSuccess) {
    fprintf(stderr, "rnn_layer_fwd: error %d\n", int(e));
    return 1;
  }
  const int fwd_coop = g_emu_coop_launches;
  std::vector<float> d_gx(N * GH, NAN), d_gh(gru ? N * GH : 0, NAN);
  if (training) {
    e = rnn_layer_bwd(p, W, ws.data(), go_s.data(), d_h.data(), lstm ? d_c.data() : nullptr,
                      d_gx.data(), gru ? d_gh.data() : nullptr,
                      emu_device_alloc(rnn_layer_bwd_scratch_bytes(p)), nullptr);
    if (e != cudaSuccess) {
      fprintf(stderr, "rnn_layer_bwd: error %d\n", int(e));
      return 1;
    }
  }
  fprintf(stderr, "fwd tile=%d k_chunk=%d units=%d mma=%d prefetch=%d groups=%d; bwd tile=%d "
          "k_chunk=%d units=%d mma=%d prefetch=%d groups=%d; fwd persistent=%d blocks=%d "
          "coop_launches=%d; bwd persistent=%d blocks=%d coop_launches=%d\n",
          plan_f.batch_tile, plan_f.k_chunk, plan_f.units, int(plan_f.mma), int(plan_f.prefetch),
          plan_f.batch_groups, plan_b.batch_tile, plan_b.k_chunk, plan_b.units, int(plan_b.mma),
          int(plan_b.prefetch), plan_b.batch_groups,
          int(plan_f.persistent), plan_f.blocks, fwd_coop, int(plan_b.persistent), plan_b.blocks,
          g_emu_coop_launches - fwd_coop);
  FILE* f = fopen(argv[2], "wb");
  write(f, out, N * H), write(f, h_n, B * H);
  if (lstm) write(f, c_n, B * H);
  write(f, ws), write(f, d_gx);
  if (gru) write(f, d_gh);
  write(f, d_h);
  if (lstm) write(f, d_c);
  fclose(f);
  return 0;
}
