// The operator schemas, and the device-generic drivers of ops.h bound to a device's kernel table
// with the exact C++ signatures of those schemas.
#pragma once

#include "ops.h"

namespace lstm_fused {

// The operator schemas, written once: register.cpp declares them as torch.ops.lstm_fused.*, the
// test-only host shim (host_shim/register_shim.cpp) with two extra arguments (EXTRA). LAYER_EXTRA:
// layer_forward's need_backward (False: inference, nothing saved for backward; the returned gates
// and cells are empty), which the shim leaves out. cell_step is forward only (no autograd): the
// latency path of LSTMCell under no_grad / inference_mode, both GEMMs and the kernel in one op.
// The state clips (cell_clip, proj_clip: 0 = off) come after EXTRA, as they have defaults
// (the shim's geometry has none); then the layer ops' zoneout keep values (zoneout_h [..., R],
// zoneout_c [..., H]: 0/1 masks in training, the rates in eval; None = off), then layer norm's γ
// (weight_ln [G, H], None = off) and eps. With layer norm the layer's saved `gates` rows are
// [activated gates | x̂ | (mean, rstd) per gate]. The GRU's layer ops (gate blocks r, z, n, as
// nn.GRU) save [r, z, n, W_hn h_{t-1} + b_hn] rows as `gates` ([..., 4H]); gru_cell_step is the
// GRU's forward-only step, as cell_step is the LSTM's. keep_mask draws zoneout's 0/1 keep masks
// (1 with probability p) on seed's device from the 64-bit key in seed (lstm_math.h
// keep_mask_block: Philox4x32-10, the same mask on every device and for any thread count).
#define LSTM_FUSED_SCHEMAS(EXTRA, LAYER_EXTRA)                                                  \
  "cell_forward(Tensor gates, Tensor c_prev, Tensor? weight_ch, str peephole, bool coupled" EXTRA \
  ", float cell_clip=0.0) -> (Tensor h, Tensor c, Tensor gates_out)",                         \
      "cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor gates, Tensor c_prev, Tensor c, "   \
      "Tensor? weight_ch, str peephole, bool coupled" EXTRA ", float cell_clip=0.0"             \
      ") -> (Tensor grad_gates, Tensor grad_c_prev, Tensor grad_weight_ch)",                    \
      "layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "  \
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_ch, Tensor? weight_hr, "                \
      "int[]? batch_sizes, bool reverse, str peephole, bool coupled" LAYER_EXTRA EXTRA          \
      ", float cell_clip=0.0, float proj_clip=0.0, Tensor? zoneout_h=None, "                    \
      "Tensor? zoneout_c=None, Tensor? weight_ln=None, float layer_norm_eps=1e-05"              \
      ") -> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)",               \
      "layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "  \
      "Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "             \
      "Tensor? bias_hh, Tensor? weight_ch, Tensor? weight_hr, Tensor output, Tensor gates, "    \
      "Tensor cells, int[]? batch_sizes, bool reverse, str peephole, bool coupled, "            \
      "bool need_input_grad" EXTRA ", float cell_clip=0.0, float proj_clip=0.0, "               \
      "Tensor? zoneout_h=None, Tensor? zoneout_c=None, Tensor? weight_ln=None"                  \
      ") -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_weight_ih, "        \
      "Tensor grad_weight_hh, Tensor grad_bias, Tensor grad_weight_ch, Tensor grad_weight_hr, " \
      "Tensor grad_weight_ln)",                                                                 \
      "cell_step(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "      \
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_ch, str peephole, bool coupled" EXTRA   \
      ", float cell_clip=0.0) -> (Tensor h, Tensor c)",                                         \
      "gru_layer_forward(Tensor input, Tensor h0, Tensor weight_ih, Tensor weight_hh, "         \
      "Tensor? bias_ih, Tensor? bias_hh, int[]? batch_sizes, bool reverse" LAYER_EXTRA EXTRA    \
      ", Tensor? zoneout_h=None) -> (Tensor output, Tensor h_n, Tensor gates)",                 \
      "gru_layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor h0, "     \
      "Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor output, "   \
      "Tensor gates, int[]? batch_sizes, bool reverse, bool need_input_grad" EXTRA              \
      ", Tensor? zoneout_h=None) -> (Tensor grad_input, Tensor grad_h0, "                       \
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh)", \
      "gru_cell_step(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "             \
      "Tensor? bias_ih, Tensor? bias_hh" EXTRA ") -> Tensor",                                   \
      "keep_mask(Tensor seed, int[] size, float p, ScalarType dtype" EXTRA ") -> Tensor"

using KernelTable = const PointwiseKernels& (*)();

template <KernelTable kKernels>
struct DeviceOps {
  static std::tuple<Tensor, Tensor, Tensor> cell_forward(const Tensor& gates, const Tensor& c_prev,
                                                         const OptTensor& weight_ch,
                                                         c10::string_view peephole, bool coupled,
                                                         double cell_clip) {
    return lstm_fused::cell_forward(gates, c_prev, weight_ch, peephole, coupled, cell_clip,
                                    kKernels());
  }

  static std::tuple<Tensor, Tensor> cell_step(const Tensor& input, const Tensor& hx,
                                              const Tensor& cx, const Tensor& weight_ih,
                                              const Tensor& weight_hh, const OptTensor& bias_ih,
                                              const OptTensor& bias_hh, const OptTensor& weight_ch,
                                              c10::string_view peephole, bool coupled,
                                              double cell_clip) {
    return lstm_fused::cell_step(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                                 weight_ch, peephole, coupled, cell_clip, kKernels());
  }

  static std::tuple<Tensor, Tensor, Tensor> cell_backward(
      const OptTensor& grad_h, const OptTensor& grad_c, const Tensor& gates, const Tensor& c_prev,
      const Tensor& c, const OptTensor& weight_ch, c10::string_view peephole, bool coupled,
      double cell_clip) {
    return lstm_fused::cell_backward(grad_h, grad_c, gates, c_prev, c, weight_ch, peephole,
                                     coupled, cell_clip, kKernels());
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
      const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
      const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
      const OptTensor& weight_ch, const OptTensor& weight_hr,
      at::OptionalIntArrayRef batch_sizes, bool reverse, c10::string_view peephole,
      bool coupled, bool need_backward, double cell_clip, double proj_clip,
      const OptTensor& zoneout_h, const OptTensor& zoneout_c, const OptTensor& weight_ln,
      double layer_norm_eps) {
    return lstm_fused::layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                                     weight_ch, weight_hr, batch_sizes, reverse, peephole,
                                     coupled, need_backward, cell_clip, proj_clip, zoneout_h,
                                     zoneout_c, weight_ln, layer_norm_eps, kKernels());
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
  layer_backward(const OptTensor& grad_output, const OptTensor& grad_h_n,
                 const OptTensor& grad_c_n, const Tensor& input, const Tensor& h0,
                 const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
                 const OptTensor& bias_ih, const OptTensor& bias_hh, const OptTensor& weight_ch,
                 const OptTensor& weight_hr, const Tensor& output, const Tensor& gates,
                 const Tensor& cells, at::OptionalIntArrayRef batch_sizes, bool reverse,
                 c10::string_view peephole, bool coupled, bool need_input_grad,
                 double cell_clip, double proj_clip, const OptTensor& zoneout_h,
                 const OptTensor& zoneout_c, const OptTensor& weight_ln) {
    return lstm_fused::layer_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih,
                                      weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, output,
                                      gates, cells, batch_sizes, reverse, peephole, coupled,
                                      need_input_grad, cell_clip, proj_clip, zoneout_h, zoneout_c,
                                      weight_ln,
                                      kKernels());
  }

  static std::tuple<Tensor, Tensor, Tensor> gru_layer_forward(
      const Tensor& input, const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh,
      const OptTensor& bias_ih, const OptTensor& bias_hh, at::OptionalIntArrayRef batch_sizes,
      bool reverse, bool need_backward, const OptTensor& zoneout_h) {
    return lstm_fused::gru_layer_forward(input, h0, weight_ih, weight_hh, bias_ih, bias_hh,
                                         batch_sizes, reverse, need_backward, zoneout_h,
                                         kKernels());
  }

  static Tensor gru_cell_step(const Tensor& input, const Tensor& hx, const Tensor& weight_ih,
                              const Tensor& weight_hh, const OptTensor& bias_ih,
                              const OptTensor& bias_hh) {
    return lstm_fused::gru_cell_step(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                     kKernels());
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward(
      const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& input,
      const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh,
      const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& output,
      const Tensor& gates, at::OptionalIntArrayRef batch_sizes, bool reverse,
      bool need_input_grad, const OptTensor& zoneout_h) {
    return lstm_fused::gru_layer_backward(grad_output, grad_h_n, input, h0, weight_ih, weight_hh,
                                          bias_ih, bias_hh, output, gates, batch_sizes, reverse,
                                          need_input_grad, zoneout_h, kKernels());
  }

  static Tensor keep_mask(const Tensor& seed, at::IntArrayRef size, double p,
                          at::ScalarType dtype) {
    return lstm_fused::keep_mask(seed, size, p, dtype, kKernels());
  }
};

#define LSTM_FUSED_IMPL_ALL(m, Ops)                         \
  do {                                                      \
    m.impl("cell_forward", &Ops::cell_forward);             \
    m.impl("cell_backward", &Ops::cell_backward);           \
    m.impl("layer_forward", &Ops::layer_forward);           \
    m.impl("layer_backward", &Ops::layer_backward);         \
    m.impl("cell_step", &Ops::cell_step);                   \
    m.impl("gru_layer_forward", &Ops::gru_layer_forward);   \
    m.impl("gru_layer_backward", &Ops::gru_layer_backward); \
    m.impl("gru_cell_step", &Ops::gru_cell_step);           \
    m.impl("keep_mask", &Ops::keep_mask);                   \
  } while (0)

}  // namespace lstm_fused
