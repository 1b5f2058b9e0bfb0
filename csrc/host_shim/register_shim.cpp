// torch.ops.lstm_fused_host_shim.*: the lstm_fused operators running the CUDA kernels on the CPU,
// for tests only. This file, host_shim.cpp and the device-generic drivers (cell.cpp, layer.cpp,
// ...) form a library of their own that tests/conftest.py builds and loads; the installed
// lstm_fused._C never contains it. Each op takes the launch grid as two extra arguments (0, 0 =
// the grid the CUDA launcher would choose), and `launches` reports what the kernels ran.
#include <tuple>
#include <utility>

#include <torch/library.h>

#include "../register.h"
#include "host_shim.h"

namespace lstm_fused {

namespace {

// The schemas put the geometry (blocks, threads) before the op's last kTail arguments, the ones
// with defaults (the state clips); Split cuts the op's argument list there.
template <size_t kTail, typename... Args>
struct Split {
  using All = std::tuple<Args...>;
  static constexpr size_t kHead = sizeof...(Args) - kTail;
  template <size_t kOffset, size_t... kIndex>
  static std::tuple<std::tuple_element_t<kOffset + kIndex, All>...> pick(
      std::index_sequence<kIndex...>);
  using Head = decltype(pick<0>(std::make_index_sequence<kHead>{}));
  using Tail = decltype(pick<kHead>(std::make_index_sequence<kTail>{}));
};

template <auto kOp, typename Head, typename Tail>
struct ShimCall;

template <auto kOp, typename... Head, typename... Tail>
struct ShimCall<kOp, std::tuple<Head...>, std::tuple<Tail...>> {
  static auto call(Head... head, int64_t blocks, int64_t threads, Tail... tail) {
    const ScopedHostShimGeometry geometry(blocks, threads);
    return kOp(head..., tail...);
  }
};

template <auto kOp, size_t kTail>
struct WithShimGeometry;

template <typename R, typename... Args, R (*kOp)(Args...), size_t kTail>
struct WithShimGeometry<kOp, kTail> {
  using Parts = Split<kTail, Args...>;
  static constexpr auto call = &ShimCall<kOp, typename Parts::Head, typename Parts::Tail>::call;
};

using Shim = DeviceOps<host_shim_kernels>;

// The shim's layer_forward always saves for backward (its tests compare every output).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> shim_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
    const OptTensor& weight_ch, const OptTensor& weight_hr, at::OptionalIntArrayRef batch_sizes,
    bool reverse, c10::string_view peephole, bool coupled, double cell_clip, double proj_clip,
    const OptTensor& zoneout_h, const OptTensor& zoneout_c, const OptTensor& weight_ln,
    double layer_norm_eps) {
  return Shim::layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                             weight_hr, batch_sizes, reverse, peephole, coupled, true, cell_clip,
                             proj_clip, zoneout_h, zoneout_c, weight_ln, layer_norm_eps);
}

std::tuple<Tensor, Tensor, Tensor> shim_gru_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh,
    const OptTensor& bias_ih, const OptTensor& bias_hh, at::OptionalIntArrayRef batch_sizes,
    bool reverse, const OptTensor& zoneout_h) {
  return Shim::gru_layer_forward(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes,
                                 reverse, true, zoneout_h);
}

}  // namespace

TORCH_LIBRARY(lstm_fused_host_shim, m) {
  for (const char* schema : {LSTM_FUSED_SCHEMAS(", int blocks, int threads", "")}) m.def(schema);
  // (blocks, threads, thread runs) of every kernel launch since the last call, flattened.
  m.def("launches() -> int[]", &host_shim_take_launches);
}

TORCH_LIBRARY_IMPL(lstm_fused_host_shim, CPU, m) {
  m.impl("cell_forward", WithShimGeometry<&Shim::cell_forward, 1>::call);
  m.impl("cell_backward", WithShimGeometry<&Shim::cell_backward, 1>::call);
  m.impl("layer_forward", WithShimGeometry<&shim_layer_forward, 6>::call);
  m.impl("layer_backward", WithShimGeometry<&Shim::layer_backward, 5>::call);
  m.impl("cell_step", WithShimGeometry<&Shim::cell_step, 1>::call);
  m.impl("gru_layer_forward", WithShimGeometry<&shim_gru_layer_forward, 1>::call);
  m.impl("gru_layer_backward", WithShimGeometry<&Shim::gru_layer_backward, 1>::call);
  m.impl("gru_cell_step", WithShimGeometry<&Shim::gru_cell_step, 0>::call);
  m.impl("keep_mask", WithShimGeometry<&Shim::keep_mask, 0>::call);
}

}  // namespace lstm_fused
