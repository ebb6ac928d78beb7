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
  // How this binary was built and which CPU path it uses: "key=value" lines.
  m.def("build_info() -> str", &heteromem::build_info_text);
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
