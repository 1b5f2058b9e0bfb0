// The operator schemas (declared once, here) and their CPU kernels. CUDA kernels are registered
// in cuda/register_cuda.cpp; fake kernels and autograd in lstm_fused/ops.py.
#include <Python.h>

#include <torch/library.h>

#include "host_shim/host_shim.h"
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

#define LSTM_FUSED_SCHEMAS(EXTRA)                                                               \
  "cell_forward(Tensor gates, Tensor c_prev, Tensor? weight_ch, str peephole, bool coupled" EXTRA \
  ") -> (Tensor h, Tensor c, Tensor gates_out)",                                                \
      "cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor gates, Tensor c_prev, Tensor c, "   \
      "Tensor? weight_ch, str peephole, bool coupled" EXTRA                                     \
      ") -> (Tensor grad_gates, Tensor grad_c_prev, Tensor grad_weight_ch)",                    \
      "layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "  \
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_ch, Tensor? weight_hr, "                \
      "int[]? batch_sizes, bool reverse, str peephole, bool coupled" EXTRA                      \
      ") -> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)",               \
      "layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "  \
      "Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "             \
      "Tensor? bias_hh, Tensor? weight_ch, Tensor? weight_hr, Tensor output, Tensor gates, "    \
      "Tensor cells, int[]? batch_sizes, bool reverse, str peephole, bool coupled, "            \
      "bool need_input_grad" EXTRA                                                              \
      ") -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_weight_ih, "        \
      "Tensor grad_weight_hh, Tensor grad_bias, Tensor grad_weight_ch, Tensor grad_weight_hr)"

TORCH_LIBRARY(lstm_fused, m) {
  for (const char* schema : {LSTM_FUSED_SCHEMAS("")}) m.def(schema);
}

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) { LSTM_FUSED_IMPL_ALL(m, DeviceOps<cpu_kernels>); }

// Before the kernel of any device: the arguments' devices and layouts (ops.h).
TORCH_LIBRARY_IMPL(lstm_fused, BackendSelect, m) { register_argument_checks(m); }

// The same operators running the CUDA kernels on the CPU (tests only), with the launch grid as
// two extra arguments (0, 0 = the grid the CUDA launcher would choose).
template <auto kOp>
struct WithShimGeometry;

template <typename R, typename... Args, R (*kOp)(Args...)>
struct WithShimGeometry<kOp> {
  static R call(Args... args, int64_t blocks, int64_t threads) {
    const ScopedHostShimGeometry geometry(blocks, threads);
    return kOp(args...);
  }
};

using Shim = DeviceOps<host_shim_kernels>;

TORCH_LIBRARY(lstm_fused_host_shim, m) {
  for (const char* schema : {LSTM_FUSED_SCHEMAS(", int blocks, int threads")}) m.def(schema);
}

TORCH_LIBRARY_IMPL(lstm_fused_host_shim, CPU, m) {
  m.impl("cell_forward", &WithShimGeometry<&Shim::cell_forward>::call);
  m.impl("cell_backward", &WithShimGeometry<&Shim::cell_backward>::call);
  m.impl("layer_forward", &WithShimGeometry<&Shim::layer_forward>::call);
  m.impl("layer_backward", &WithShimGeometry<&Shim::layer_backward>::call);
}

}  // namespace lstm_fused
