// The GEMMs of the time loops: x·weightᵀ (+ bias) (+ addend). On the CPU, large enough float32 and
// bfloat16 GEMMs go through oneDNN's matmul (torch's own mkldnn::_linear_pointwise; oneDNN is the
// library torch.nn.LSTM trains with on CPU); everything else, CUDA included, through ATen's
// addmm/mm. Which is faster where was measured with `python benchmarks/bench.py --candidates
// nn,fused,fused-aten` (the fused-aten candidate forces ATen).
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

// Where oneDNN's matmul beat ATen's (MKL) in `python benchmarks/bench.py --candidates
// nn,fused,fused-aten` on our 2-thread AMD EPYC: with at least 1024 output features and 256 inputs
// (H = 256: the forward 0.92x ATen's time, H = 1024: 0.74x forward, 0.84x forward+backward);
// below that ATen was faster (H = 64: 1.7x, H = 128, B = 16: 1.35x, and the H = 256 backward GEMMs,
// [B, 4H] x [4H, H], 1.07x). `env`: LSTM_FUSED_CPU_GEMM=aten|onednn overrides the choice.
// (oneDNN only for a dtype it supports on this CPU, see onednn_supports).
constexpr int64_t kOneDnnMinOutputs = 1024, kOneDnnMinInputs = 256;

enum class Choice { Auto, Aten, OneDnn };

Choice forced_choice() {
  const char* choice = std::getenv("LSTM_FUSED_CPU_GEMM");
  if (choice == nullptr) return Choice::Auto;
  if (std::strcmp(choice, "aten") == 0) return Choice::Aten;
  if (std::strcmp(choice, "onednn") == 0) return Choice::OneDnn;
  return Choice::Auto;
}

// Whether oneDNN can compute in `dtype` on this CPU, as capped by ONEDNN_MAX_CPU_ISA: without
// AVX-512 (or AVX2-VNNI-2) it has no bfloat16/float16 inner product and fails to create one. Asked
// once per dtype through torch's own queries (mkldnn::_is_mkldnn_bf16_supported / _fp16_), which
// ask oneDNN itself and so see the cap.
bool onednn_supports(at::ScalarType dtype) {
  auto query = [](const char* name) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    return at::hasMKLDNN() && op.has_value() && op->typed<bool()>().call();
  };
  switch (dtype) {
    case at::kFloat:
      return at::hasMKLDNN();
    case at::kBFloat16: {
      static const bool bf16 = query("mkldnn::_is_mkldnn_bf16_supported");
      return bf16;
    }
    case at::kHalf: {
      static const bool fp16 = query("mkldnn::_is_mkldnn_fp16_supported");
      return fp16;
    }
    default:
      return false;
  }
}

bool use_onednn(const Tensor& x, const Tensor& weight) {
  const auto dtype = x.scalar_type();
  if (!x.device().is_cpu() || (dtype != at::kFloat && dtype != at::kBFloat16) ||
      !onednn_supports(dtype) || !onednn().unary.has_value() || x.size(0) == 0 ||
      x.size(1) == 0) {
    return false;
  }
  switch (forced_choice()) {
    case Choice::Aten:
      return false;
    case Choice::OneDnn:
      return true;
    case Choice::Auto:
      break;
  }
  return weight.size(0) >= kOneDnnMinOutputs && weight.size(1) >= kOneDnnMinInputs;
}

}  // namespace

Tensor gemm_nt(const Tensor& x, const Tensor& weight, const OptTensor& bias,
              const OptTensor& addend) {
  if (use_onednn(x, weight)) {
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
