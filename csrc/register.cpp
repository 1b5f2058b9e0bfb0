// The operator library: the schemas of register.h declared as torch.ops.lstm_fused.*, and their
// CPU kernels. CUDA kernels are registered in cuda/register_cuda.cpp, autocast kernels in
// autocast.cpp; fake kernels and autograd in lstm_fused/ops.py.
#include <Python.h>

#include <torch/library.h>

#include "register.h"

// `import lstm_fused._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lstm_fused operator library", -1,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef LSTM_FUSED_WITH_CUDA
  PyModule_AddIntConstant(m, "built_with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "built_with_cuda", 0);
#endif
  return m;
}

namespace lstm_fused {

TORCH_LIBRARY(lstm_fused, m) {
  for (const char* schema : {LSTM_FUSED_SCHEMAS("")}) m.def(schema);
}

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) { LSTM_FUSED_IMPL_ALL(m, DeviceOps<cpu_kernels>); }

}  // namespace lstm_fused
