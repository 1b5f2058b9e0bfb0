// One LSTM time step: the fused pointwise kernel on gate pre-activations that the caller's GEMMs
// produced (as torch.nn.LSTMCell does with _thnn_fused_lstm_cell).
#include "ops.h"

namespace lstm_fused {

namespace {

struct CellShape {
  int64_t batch, hidden;
};

CellShape check_cell(const Tensor& gates, const Tensor& c_prev, const OptTensor& weight_ch,
                     Peephole peephole, bool coupled) {
  TORCH_CHECK_VALUE(c_prev.dim() == 2, "lstm_fused: expected c_prev of shape [B, H], got ",
                    c_prev.sizes());
  const int64_t B = c_prev.size(0), H = c_prev.size(1);
  check_arg(gates, "gates", c_prev, {B, num_gates(coupled) * H});
  check_weight_ch(weight_ch, peephole, coupled, H, c_prev);
  return {B, H};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cell_forward(const Tensor& gates, const Tensor& c_prev,
                                                const OptTensor& weight_ch,
                                                c10::string_view peephole, bool coupled,
                                                const PointwiseKernels& kernels) {
  const Peephole kind = parse_peephole(peephole);
  const auto [B, H] = check_cell(gates, c_prev, weight_ch, kind, coupled);
  const c10::OptionalDeviceGuard guard(c_prev.device());
  const Tensor z = rows_contiguous(gates), cp = rows_contiguous(c_prev);
  const Tensor w = weight_ch ? weight_ch->contiguous() : Tensor();
  Tensor gates_out = at::empty({B, z.size(1)}, z.options());
  Tensor c = at::empty({B, H}, z.options()), h = at::empty({B, H}, z.options());
  if (B > 0) {
    ForwardStep p{};
    p.z = z.data_ptr(), p.z_stride = z.stride(0);
    p.gates_out = gates_out.data_ptr(), p.gates_stride = gates_out.stride(0);
    p.c_prev = cp.data_ptr(), p.c_prev_stride = cp.stride(0);
    p.weight_ch = w.defined() ? w.data_ptr() : nullptr;
    p.c_out = c.data_ptr(), p.c_out_stride = H;
    p.h_out = h.data_ptr(), p.h_out_stride = H;
    p.rows = B, p.hidden = H, p.coupled = coupled, p.peephole = kind, p.dtype = z.scalar_type();
    RECORD_FUNCTION("lstm_fused::pointwise_forward", {});
    kernels.forward(p);
  }
  return {h, c, gates_out};
}

std::tuple<Tensor, Tensor, Tensor> cell_backward(const OptTensor& grad_h, const OptTensor& grad_c,
                                                 const Tensor& gates, const Tensor& c_prev,
                                                 const Tensor& c, const OptTensor& weight_ch,
                                                 c10::string_view peephole, bool coupled,
                                                 const PointwiseKernels& kernels) {
  const Peephole kind = parse_peephole(peephole);
  const auto [B, H] = check_cell(gates, c_prev, weight_ch, kind, coupled);
  check_arg(c, "c", c_prev, {B, H});
  if (grad_h) check_arg(*grad_h, "grad_h", c_prev, {B, H});
  if (grad_c) check_arg(*grad_c, "grad_c", c_prev, {B, H});
  const c10::OptionalDeviceGuard guard(c_prev.device());
  const Tensor g = rows_contiguous(gates), cp = rows_contiguous(c_prev), cc = rows_contiguous(c);
  const Tensor dh = grad_h ? rows_contiguous(*grad_h) : Tensor();
  const Tensor dc = grad_c ? rows_contiguous(*grad_c) : Tensor();
  const Tensor w = weight_ch ? weight_ch->contiguous() : Tensor();
  Tensor grad_z = at::empty({B, g.size(1)}, g.options());
  Tensor grad_c_prev = at::empty({B, H}, g.options());
  if (B > 0) {
    BackwardStep p{};
    p.grad_h = dh.defined() ? dh.data_ptr() : nullptr;
    p.grad_h_stride = dh.defined() ? dh.stride(0) : 0;
    p.dc_in = dc.defined() ? dc.data_ptr() : nullptr;
    p.dc_in_stride = dc.defined() ? dc.stride(0) : 0;
    p.dc_prev_out = grad_c_prev.data_ptr(), p.dc_prev_stride = H;
    p.gates = g.data_ptr(), p.gates_stride = g.stride(0);
    p.c_prev = cp.data_ptr(), p.c_prev_stride = cp.stride(0), p.c_prev_rows = B;
    p.c = cc.data_ptr(), p.c_stride = cc.stride(0);
    p.weight_ch = w.defined() ? w.data_ptr() : nullptr;
    p.grad_z = grad_z.data_ptr(), p.grad_z_stride = grad_z.stride(0);
    p.rows = B, p.hidden = H, p.coupled = coupled, p.peephole = kind, p.dtype = g.scalar_type();
    RECORD_FUNCTION("lstm_fused::pointwise_backward", {});
    kernels.backward(p);
  }
  Tensor grad_weight_ch = kind == Peephole::Diagonal
                              ? diagonal_peephole_grad(grad_z, cp, cc, coupled)
                              : at::empty({0}, g.options());
  return {grad_z, grad_c_prev, grad_weight_ch};
}

}  // namespace lstm_fused
