// The kernel entry points of seqkern._C, declared once. The public ops (seqkern::*) are
// Python custom ops (seqkern/ops/) so that `import seqkern` works without this extension;
// their `cpu` and `cuda` backends call the entry points below. Each backend file adds its
// implementations with TORCH_LIBRARY_IMPL(seqkern_C, <key>, m).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#ifndef SEQKERN_BUILD_CPU_FLAGS
#define SEQKERN_BUILD_CPU_FLAGS ""
#endif
#ifndef SEQKERN_CUDA_ARCHS
#define SEQKERN_CUDA_ARCHS ""
#endif

namespace seqkern {

// (cpu compile flags, CUDA archs or "" when built without CUDA kernels, compiler)
static std::vector<std::string> build_info() {
  return {SEQKERN_BUILD_CPU_FLAGS, SEQKERN_CUDA_ARCHS, __VERSION__};
}

}  // namespace seqkern

TORCH_LIBRARY(seqkern_C, m) {
  m.def("build_info() -> str[]", &seqkern::build_info);
  // Shapes and semantics: seqkern/ops/attention.py. lse: fp32 (fp64 for fp64 inputs).
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, "
      "Tensor? seed_offset) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, "
      "bool is_causal, float scale, Tensor? seed_offset) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_weights(Tensor query, Tensor key, Tensor lse, Tensor? attn_mask, "
      "Tensor? key_padding_mask, bool is_causal, float scale, float dropout_p, "
      "Tensor? seed_offset, bool average_heads) -> Tensor");
  // One recurrent layer, one direction, whole sequence (csrc/cpu/rnn_layer.cpp). mode: LSTM,
  // GRU, RNN_TANH, RNN_RELU. input [T, B, I], or packed data [N, I] with batch_sizes [T].
  // w_hr [P, H]: LSTM projection (proj_size P < H; then w_hh is [4H, P] and h0 [B, P]).
  // Returns (output [T, B, P] or [N, P], h_n [B, P], c_n [B, H] (LSTM; else empty),
  // workspace for the backward, empty unless need_workspace); P = H without projection.
  m.def(
      "rnn_layer_fwd(str mode, Tensor input, Tensor? batch_sizes, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse, "
      "bool need_workspace, Tensor? w_hr=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_w_hr); empty where not
  // applicable or where needs[k] (8 entries, in that order) is false.
  m.def(
      "rnn_layer_bwd(str mode, Tensor input, Tensor? batch_sizes, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse, Tensor workspace, "
      "Tensor? grad_output, Tensor? grad_hn, Tensor? grad_cn, bool[] needs, Tensor? w_hr=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Shapes and semantics: seqkern/ops/rnn_cells.py. mode: LSTM, GRU, RNN_TANH, RNN_RELU.
  m.def(
      "rnn_cell_fwd(str mode, Tensor input, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rnn_cell_gate_grads(str mode, Tensor grad_h, Tensor? grad_c, Tensor hx, Tensor? cx, "
      "Tensor h, Tensor saved) -> (Tensor, Tensor, Tensor, Tensor)");
  // The gate gradients and the products in one call: (dx, dhx, dcx, dw_ih, dw_hh, db_ih,
  // db_hh), [0] where needs[k] is false or the gradient does not exist.
  m.def(
      "rnn_cell_bwd(str mode, Tensor grad_h, Tensor? grad_c, Tensor input, Tensor hx, "
      "Tensor? cx, Tensor w_ih, Tensor w_hh, bool has_bias, Tensor h, Tensor saved, "
      "bool[] needs) -> Tensor[]");
}

// `import seqkern._C` loads this library, which runs the registrations above; the module
// itself is empty (no pybind11).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
