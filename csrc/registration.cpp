// The one place heteromem's operator schemas are declared. Each device registers its
// kernels with TORCH_LIBRARY_IMPL in its own file; Python adds fakes (heteromem/ops/).
// `heteromem._C` is an otherwise empty Python module whose import runs these registrations.
#include <Python.h>
#include <torch/library.h>

#include "build_info.h"

TORCH_LIBRARY(heteromem, m) {
  // In-place Adam/AdamW over flat contiguous buffers; see heteromem/ops/adam.py.
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, *, "
      "int step, float lr, float beta1, float beta2, float eps, float weight_decay, bool adamw, "
      "float grad_scale, Tensor(d!)? param_lowp) -> ()");
  // In-place AGD (NeurIPS 2023) over flat contiguous buffers; see heteromem/ops/agd.py.
  m.def(
      "agd_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, *, "
      "int step, float lr, float beta1, float beta2, float delta, float weight_decay, "
      "float grad_scale, Tensor(d!)? param_lowp) -> ()");
  // In-place Adam/AdamW whose moments are 8-bit codes with one float32 scale per block of 256
  // elements; see heteromem/ops/adam8bit.py and csrc/common/quant8_math.h.
  m.def(
      "adam8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_scale, Tensor(d!) exp_avg_sq, Tensor(e!) exp_avg_sq_scale, *, "
      "int step, float lr, float beta1, float beta2, float eps, float weight_decay, bool adamw, "
      "float grad_scale, Tensor(f!)? param_lowp) -> ()");
  // Fused attention over (batch, heads, seq, head_dim); k/v heads divide q heads (GQA); causal
  // is aligned bottom-right. Returns the output and the row log-sum-exp (float32, (batch, heads,
  // seq_q)) that attention_bwd needs. See heteromem/ops/attention.py.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // How this binary was built and which CPU path it uses: "key=value" lines.
  m.def("build_info() -> str", &heteromem::build_info_text);
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
