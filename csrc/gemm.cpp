// The GEMM of the time loops: x·weightᵀ (+ addend). On the CPU, float32/bfloat16/half go through
// oneDNN's matmul (torch's own mkldnn::_linear_pointwise, the library torch.nn.LSTM trains with
// on CPU); everything else, CUDA included, through ATen's addmm/mm. Which one is faster at LSTM
// step sizes is measured by `python -m lstm_fused.bench --gemm` (see benchmarks/README.md).
#include <cstdlib>
#include <cstring>

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "ops.h"

namespace lstm_fused {

namespace {

using LinearBinary = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                            c10::string_view);
using LinearUnary = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view,
                           c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);

struct OneDnnLinear {
  std::optional<c10::TypedOperatorHandle<LinearUnary>> unary;
  std::optional<c10::TypedOperatorHandle<LinearBinary>> binary;

  OneDnnLinear() {
    if (!at::hasMKLDNN()) return;
    auto& dispatcher = c10::Dispatcher::singleton();
    auto u = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    auto b = dispatcher.findSchema({"mkldnn::_linear_pointwise", "binary"});
    if (u && b) unary = u->typed<LinearUnary>(), binary = b->typed<LinearBinary>();
  }
};

const OneDnnLinear& onednn() {
  static const OneDnnLinear ops;
  return ops;
}

// LSTM_FUSED_CPU_GEMM=aten|onednn overrides the default, for benchmarks and tests.
bool prefer_onednn() {
  const char* choice = std::getenv("LSTM_FUSED_CPU_GEMM");
  return choice == nullptr || std::strcmp(choice, "aten") != 0;
}

bool use_onednn(const Tensor& x) {
  const auto dtype = x.scalar_type();
  return x.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16) &&
         onednn().unary.has_value() && x.size(0) > 0 && x.size(1) > 0 && prefer_onednn();
}

}  // namespace

Tensor gemm_nt(const Tensor& x, const Tensor& weight, const OptTensor& bias,
              const OptTensor& addend) {
  if (use_onednn(x)) {
    const Tensor w = weight.contiguous();
    if (addend) return onednn().binary->call(x.contiguous(), addend->contiguous(), w, bias, "add");
    return onednn().unary->call(x.contiguous(), w, bias, "none",
                              c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  if (!addend) return bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  // In place: an out-of-place addmm would first copy the addend (one more kernel per step).
  addend->addmm_(x, weight.t());
  return bias ? addend->add_(*bias) : *addend;
}

}  // namespace lstm_fused
