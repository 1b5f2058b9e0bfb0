// Autocast kernels of every lstm_fused operator, for CPU and CUDA autocast.
//
// Forward ops (cell_forward, cell_step, layer_forward, gru_layer_forward, gru_cell_step) follow torch's own LSTM ops (lstm, lstm_cell,
// _thnn_fused_lstm_cell are "lower_precision_fp" in ATen's autocast lists): under
// torch.autocast every floating-point input is cast to the autocast dtype (float16 or bfloat16,
// whatever torch.autocast was given; float64 inputs are left alone, as ATen does), with ATen's
// cast cache for weights, and the op runs in that dtype: fp32 math inside the kernels, fp16/bf16
// storage.
//
// Backward ops (cell_backward, layer_backward, gru_layer_backward) run in the precision of the forward whose
// saved tensors they receive (the dtype of `gates`): autocast must not lower the precision of
// a gradient computation for a forward that ran outside autocast, and a gradient arriving in
// another dtype is cast to the forward's dtype, as autograd itself does for built-in ops.
#include <tuple>

#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "register.h"

namespace lstm_fused {

namespace {

template <typename T>
T cast_floating(at::ScalarType /*dtype*/, T arg) {
  return arg;  // non-tensor arguments
}
Tensor cast_floating(at::ScalarType dtype, const Tensor& t) {
  return t.defined() && t.is_floating_point() && t.scalar_type() != dtype ? t.to(dtype) : t;
}
OptTensor cast_floating(at::ScalarType dtype, const OptTensor& t) {
  return t ? OptTensor(cast_floating(dtype, *t)) : t;
}

template <const char* kName, typename Signature>
struct Autocast;

template <const char* kName, typename R, typename... Args>
struct Autocast<kName, R(Args...)> {
  // Calls the operator again; the caller has excluded the autocast key, so this reaches the
  // autograd and device kernels.
  static R call_op(Args... args) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").template typed<R(Args...)>();
    return op.call(args...);
  }

  template <c10::DeviceType kDevice>
  static R autocast_dtype(Args... args) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
    const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
    return call_op(at::autocast::cached_cast(dtype, args, kDevice)...);
  }

  template <c10::DeviceType kDevice, size_t kSavedGates>
  static R forward_dtype(Args... args) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
    const Tensor& saved_gates = std::get<kSavedGates>(std::tie(args...));
    return call_op(cast_floating(saved_gates.scalar_type(), args)...);
  }
};

using Ops = DeviceOps<cpu_kernels>;  // only for the C++ signatures of the schemas
constexpr char kCellForward[] = "lstm_fused::cell_forward";
constexpr char kCellBackward[] = "lstm_fused::cell_backward";
constexpr char kLayerForward[] = "lstm_fused::layer_forward";
constexpr char kLayerBackward[] = "lstm_fused::layer_backward";
constexpr char kCellStep[] = "lstm_fused::cell_step";
using CellForward = Autocast<kCellForward, decltype(Ops::cell_forward)>;
using CellBackward = Autocast<kCellBackward, decltype(Ops::cell_backward)>;
using LayerForward = Autocast<kLayerForward, decltype(Ops::layer_forward)>;
using LayerBackward = Autocast<kLayerBackward, decltype(Ops::layer_backward)>;
using CellStep = Autocast<kCellStep, decltype(Ops::cell_step)>;
constexpr char kGruLayerForward[] = "lstm_fused::gru_layer_forward";
constexpr char kGruLayerBackward[] = "lstm_fused::gru_layer_backward";
using GruLayerForward = Autocast<kGruLayerForward, decltype(Ops::gru_layer_forward)>;
using GruLayerBackward = Autocast<kGruLayerBackward, decltype(Ops::gru_layer_backward)>;
constexpr char kGruCellStep[] = "lstm_fused::gru_cell_step";
using GruCellStep = Autocast<kGruCellStep, decltype(Ops::gru_cell_step)>;
// Position of `gates` (the forward's saved activations) in the backward schemas.
constexpr size_t kCellBackwardGates = 2;
constexpr size_t kLayerBackwardGates = 13;
constexpr size_t kGruLayerBackwardGates = 9;

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  m.impl("cell_forward", &CellForward::autocast_dtype<kDevice>);
  m.impl("layer_forward", &LayerForward::autocast_dtype<kDevice>);
  m.impl("cell_step", &CellStep::autocast_dtype<kDevice>);
  m.impl("cell_backward", &CellBackward::forward_dtype<kDevice, kCellBackwardGates>);
  m.impl("layer_backward", &LayerBackward::forward_dtype<kDevice, kLayerBackwardGates>);
  m.impl("gru_layer_forward", &GruLayerForward::autocast_dtype<kDevice>);
  m.impl("gru_cell_step", &GruCellStep::autocast_dtype<kDevice>);
  m.impl("gru_layer_backward", &GruLayerBackward::forward_dtype<kDevice, kGruLayerBackwardGates>);
  // keep_mask takes no floating-point tensor and makes its output in the dtype it is given.
  m.impl("keep_mask", torch::CppFunction::makeFallthrough());
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(lstm_fused, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace lstm_fused
