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
}

// `import seqkern._C` loads this library, which runs the registrations above; the module
// itself is empty (no pybind11).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
