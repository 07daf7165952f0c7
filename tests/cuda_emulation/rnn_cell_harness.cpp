// Runs csrc/cuda/rnn_cell.cu (rewritten by build.py) on the host: one cell forward and its
// gate gradients. Usage: rnn_cell_harness IN OUT (formats: rnn.py's run_cell). Strided
// operands on purpose: b_ih with element stride 2; hx, cx and the incoming gradients
// transposed ([H][B] storage).
#include "emu_runtime.h"

#include "rnn_cell.cu"
#include "harness_io.h"

using namespace seqkern::cuda::rnn;

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  Reader in{fopen(argv[1], "rb")};
  int hdr[5];
  in.ints(hdr, 5);
  const CellKind cell = CellKind(hdr[0]);
  const DType dt = DType(hdr[1]);
  const int B = hdr[2], H = hdr[3], bias = hdr[4];
  const int G = gate_count(cell), W = saved_width(cell);
  const bool lstm = cell == CellKind::kLSTM, gru = cell == CellKind::kGRU;
  auto gx = in.floats(B * G * H), gh = in.floats(B * G * H);
  auto bi = in.floats(bias ? G * H : 0), bh = in.floats(bias ? G * H : 0);
  auto hx = in.floats(B * H), cx = in.floats(B * H), gH = in.floats(B * H),
       gC = in.floats(B * H);
  Store bis(dt, 2 * G * H), bhs(dt, G * H), hxs(dt, B * H), cxs(dt, B * H), gHs(dt, B * H),
      gCs(dt, B * H);
  for (int i = 0; bias && i < G * H; ++i) bis.set(2 * i, bi[i]), bhs.set(i, bh[i]);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < H; ++j) {
      const int t = j * B + b, r = b * H + j;
      hxs.set(t, hx[r]), cxs.set(t, cx[r]), gHs.set(t, gH[r]), gCs.set(t, gC[r]);
    }
  auto transposed = [&](Store& s) { return Strided2{s.data(), 1, B}; };
  const Strided2 b_ih = bias ? Strided2{bis.data(), 2, 0} : Strided2{};
  const Strided2 b_hh = bias ? Strided2{bhs.data(), 1, 0} : Strided2{};
  const Strided2 c_in = lstm ? transposed(cxs) : Strided2{};
  Store h(dt, B * H), c(dt, B * H);
  std::vector<float> saved(B * H * (W + lstm), NAN);
  cudaError_t e = rnn_cell_fwd(cell, dt, B, H, gx.data(), gh.data(), b_ih, b_hh,
                               transposed(hxs), c_in, h.data(), lstm ? c.data() : nullptr,
                               saved.data(), nullptr);
  if (e != cudaSuccess) {
    fprintf(stderr, "rnn_cell_fwd: error %d\n", int(e));
    return 1;
  }
  Store d_ih(dt, B * G * H), d_hh(dt, B * G * H), d_hx(dt, B * H), d_cx(dt, B * H);
  e = rnn_cell_gate_grads(cell, dt, B, H, transposed(gHs), lstm ? transposed(gCs) : Strided2{},
                          transposed(hxs), c_in, saved.data(), d_ih.data(),
                          gru ? d_hh.data() : nullptr, gru ? d_hx.data() : nullptr,
                          lstm ? d_cx.data() : nullptr, nullptr);
  if (e != cudaSuccess) {
    fprintf(stderr, "rnn_cell_gate_grads: error %d\n", int(e));
    return 1;
  }
  FILE* out = fopen(argv[2], "wb");
  write(out, h, B * H);
  if (lstm) write(out, c, B * H);
  write(out, d_ih, B * G * H);
  if (gru) write(out, d_hh, B * G * H), write(out, d_hx, B * H);
  if (lstm) write(out, d_cx, B * H);
  fclose(out);
  return 0;
}
