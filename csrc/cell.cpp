// One LSTM time step: the fused pointwise kernel on gate pre-activations that the caller's GEMMs
// produced (as torch.nn.LSTMCell does with _thnn_fused_lstm_cell). Full peepholes add their
// GEMMs here: W_c(i,f) c_prev before the kernel, W_co c_t between its two parts.
#include "ops.h"

namespace lstm_fused {

namespace {

struct CellShape {
  int64_t batch, hidden;
};

// B and H come from c_prev, the reference for every other tensor argument.
CellShape check_cell(const Tensor& gates, const Tensor& c_prev, const OptTensor& weight_ch,
                     Peephole peephole, bool coupled) {
  const Named like{c_prev, "c_prev"};
  TORCH_CHECK_VALUE(c_prev.dim() == 2, "lstm_fused: expected c_prev of shape [B, H], got ",
                    c_prev.sizes());
  check_floating(like);
  const int64_t B = c_prev.size(0), H = c_prev.size(1);
  check_arg({gates, "gates"}, like, {B, num_gates(coupled) * H},
            "[B, G*H], with B and H from c_prev and G = 3 gates if coupled, else 4");
  check_weight_ch(weight_ch, peephole, coupled, H, like, "c_prev");
  return {B, H};
}

// cell_backward's other tensors: the forward's new cell state and the incoming gradients
// (either may be absent: autograd passes None for an output that got no gradient).
void check_cell_backward(const OptTensor& grad_h, const OptTensor& grad_c, const Tensor& c_prev,
                         const Tensor& c, CellShape shape) {
  const Named like{c_prev, "c_prev"};
  const char* state = "[B, H] like c_prev";
  check_arg({c, "c"}, like, {shape.batch, shape.hidden}, state);
  if (grad_h) check_arg({*grad_h, "grad_h"}, like, {shape.batch, shape.hidden}, state);
  if (grad_c) check_arg({*grad_c, "grad_c"}, like, {shape.batch, shape.hidden}, state);
}

// Full peepholes: the input/forget blocks (rows of weight_ch and columns of z) and the output one.
Tensor input_peephole_columns(const Tensor& t, int64_t H, bool coupled) {
  return t.narrow(1, 0, peephole_input_blocks(coupled) * H);
}
Tensor input_peephole_weight(const Tensor& w, int64_t H, bool coupled) {
  return w.narrow(0, 0, peephole_input_blocks(coupled) * H);
}
Tensor output_peephole_weight(const Tensor& w, int64_t H, bool coupled) {
  return w.narrow(0, peephole_input_blocks(coupled) * H, H);
}

// The recurrent part of a cell step that the simd path computes inside the step's kernel:
// z += h W_hhᵀ (float32 CPU, peephole none or diagonal).
struct Recurrent {
  const Tensor& h;  // rows with unit column stride
  const Tensor& weight_hh;  // contiguous
};

// The pointwise step (with full peepholes' GEMMs) on pre-activations z: writes the activated
// gates to gates_out (which may be z itself; undefined: not written) and returns (h, c). Full
// peepholes add to z; with `recurrent`, the kernel first adds h W_hhᵀ to z.
std::pair<Tensor, Tensor> pointwise_step(const Tensor& z, const Tensor& gates_out, const Tensor& cp,
                                         const Tensor& w, Peephole kind, bool coupled,
                                         double cell_clip, const PointwiseKernels& kernels,
                                         const std::optional<Recurrent>& recurrent = std::nullopt) {
  const int64_t B = cp.size(0), H = cp.size(1);
  const bool full = kind == Peephole::Full;
  Tensor c = at::empty({B, H}, z.options()), h = at::empty({B, H}, z.options());
  if (B == 0) return {h, c};

  ForwardStep p{};
  p.z = z.data_ptr(), p.z_stride = z.stride(0);
  p.gates_out = gates_out.defined() ? gates_out.data_ptr() : nullptr;
  p.gates_stride = gates_out.defined() ? gates_out.stride(0) : 0;
  p.c_prev = cp.data_ptr(), p.c_prev_stride = cp.stride(0);
  p.weight_ch = w.defined() && !full ? w.data_ptr() : nullptr;
  p.c_out = c.data_ptr(), p.c_out_stride = H;
  p.h_out = h.data_ptr(), p.h_out_stride = H;
  p.rows = B, p.hidden = H, p.coupled = coupled, p.peephole = kind, p.dtype = z.scalar_type();
  p.cell_clip = cell_clip;
  if (full) {
    input_peephole_columns(z, H, coupled).addmm_(cp, input_peephole_weight(w, H, coupled).t());
    p.part = Part::Update;
    run_forward(kernels, p);
    z.narrow(1, output_gate(coupled) * H, H).addmm_(c, output_peephole_weight(w, H, coupled).t());
    p.part = Part::Output;
  }
  if (recurrent) {
    run_recurrent_step(recurrent->h.const_data_ptr<float>(), recurrent->h.stride(0),
                       recurrent->weight_hh, p);
  } else {
    run_forward(kernels, p);
  }
  return {h, c};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cell_forward(const Tensor& gates, const Tensor& c_prev,
                                                const OptTensor& weight_ch,
                                                c10::string_view peephole, bool coupled,
                                                double cell_clip, const PointwiseKernels& kernels) {
  const Peephole kind = parse_peephole(peephole);
  const auto [B, H] = check_cell(gates, c_prev, weight_ch, kind, coupled);
  check_clip(cell_clip, "cell_clip");
  const c10::OptionalDeviceGuard guard(c_prev.device());
  const bool full = kind == Peephole::Full;
  const Tensor cp = rows_contiguous(c_prev);
  const Tensor w = weight_ch ? weight_ch->contiguous() : Tensor();
  // Full peepholes change the pre-activations, so they work on a copy (which becomes gates_out).
  const Tensor z = full ? gates.clone(at::MemoryFormat::Contiguous) : rows_contiguous(gates);
  Tensor gates_out = full ? z : at::empty({B, z.size(1)}, z.options());
  auto [h, c] = pointwise_step(z, gates_out, cp, w, kind, coupled, cell_clip, kernels);
  return {h, c, gates_out};
}

std::tuple<Tensor, Tensor> cell_step(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                     const Tensor& weight_ih, const Tensor& weight_hh,
                                     const OptTensor& bias_ih, const OptTensor& bias_hh,
                                     const OptTensor& weight_ch, c10::string_view peephole,
                                     bool coupled, double cell_clip,
                                     const PointwiseKernels& kernels) {
  const Peephole kind = parse_peephole(peephole);
  check_clip(cell_clip, "cell_clip");
  TORCH_CHECK_VALUE(input.dim() == 2, "lstm_fused: expected input of shape [B, input_size], got ",
                    input.sizes());
  TORCH_CHECK_VALUE(cx.dim() == 2, "lstm_fused: expected cx of shape [B, H], got ", cx.sizes());
  const Named like{input, "input"};
  check_floating(like);
  const int64_t B = input.size(0), H = cx.size(1), GH = num_gates(coupled) * H;
  const char* state = "[B, H], with B from input and H from cx";
  check_arg({cx, "cx"}, like, {B, H}, state);
  check_arg({hx, "hx"}, like, {B, H}, state);
  check_arg({weight_ih, "weight_ih"}, like, {GH, input.size(1)},
            "[G*H, input_size], with G = 3 gates if coupled, else 4");
  check_arg({weight_hh, "weight_hh"}, like, {GH, H}, "[G*H, H]");
  if (bias_ih) check_arg({*bias_ih, "bias_ih"}, like, {GH}, "[G*H]");
  if (bias_hh) check_arg({*bias_hh, "bias_hh"}, like, {GH}, "[G*H]");
  check_weight_ch(weight_ch, kind, coupled, H, like, "cx");
  const c10::OptionalDeviceGuard guard(input.device());
  // z = x W_ih^T + b_ih + h W_hh^T + b_hh, in one buffer; the kernel activates it in place. The
  // GEMMs are ATen's on any device (on the CPU the measured or forced path); the CPU-only branch:
  // on the simd path the CPU kernel itself adds h W_hh^T, block by block, before it activates the
  // block. Other kernel tables (CUDA, the host shim's) always take the GEMMs + kernel route.
  const bool in_kernel = kernels.cpu_simd_step && kind != Peephole::Full && B > 0 &&
                         B <= kSimdDotMaxRows &&
                         one_off_gemm_path(hx, weight_hh, true) == CpuGemmPath::Simd;
  Tensor z = gemm_nt(input, weight_ih, bias_ih);
  if (bias_hh && in_kernel) {
    // float32 rows from the simd GEMM: a plain loop, where add_'s TensorIterator took about 1 us
    // of a 14 us step at H = 64.
    TORCH_INTERNAL_ASSERT(z.scalar_type() == at::kFloat && z.stride(1) == 1);
    const Tensor b = bias_hh->contiguous();
    const float* bias = b.const_data_ptr<float>();
    for (int64_t r = 0; r < B; ++r) {
      float* row = z.data_ptr<float>() + r * z.stride(0);
      for (int64_t j = 0; j < GH; ++j) row[j] += bias[j];
    }
  } else if (bias_hh) {
    z.add_(*bias_hh);
  }
  const Tensor w = weight_ch ? weight_ch->contiguous() : Tensor();
  if (in_kernel) {
    const Tensor h_prev = rows_contiguous(hx), w_hh = weight_hh.contiguous();
    auto [h, c] = pointwise_step(z, Tensor(), rows_contiguous(cx), w, kind, coupled, cell_clip,
                                 kernels, Recurrent{h_prev, w_hh});
    return {h, c};
  }
  z = gemm_nt(hx, weight_hh, std::nullopt, z);
  auto [h, c] =
      pointwise_step(z, Tensor(), rows_contiguous(cx), w, kind, coupled, cell_clip, kernels);
  return {h, c};
}

Tensor gru_cell_step(const Tensor& input, const Tensor& hx, const Tensor& weight_ih,
                     const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                     const PointwiseKernels& kernels) {
  TORCH_CHECK_VALUE(input.dim() == 2, "lstm_fused: expected input of shape [B, input_size], got ",
                    input.sizes());
  TORCH_CHECK_VALUE(hx.dim() == 2, "lstm_fused: expected hx of shape [B, H], got ", hx.sizes());
  const Named like{input, "input"};
  check_floating(like);
  const int64_t B = input.size(0), H = hx.size(1), G = GruLayout::kGates * H;
  check_arg({hx, "hx"}, like, {B, H}, "[B, H], with B from input");
  check_arg({weight_ih, "weight_ih"}, like, {G, input.size(1)},
            "[3*H, input_size], with H from hx");
  check_arg({weight_hh, "weight_hh"}, like, {G, H}, "[3*H, H], with H from hx");
  if (bias_ih) check_arg({*bias_ih, "bias_ih"}, like, {G}, "[3*H], with H from hx");
  if (bias_hh) check_arg({*bias_hh, "bias_hh"}, like, {G}, "[3*H], with H from hx");
  const c10::OptionalDeviceGuard guard(input.device());
  // a = x W_ih^T + b_ih and b = h W_hh^T (the reset gate multiplies b_n, so the two stay apart);
  // the kernel adds b_hh. The GEMMs are ATen's on any device, on the CPU the measured or forced
  // path (the simd one takes dot products over the weight as stored: nothing packed per call).
  const Tensor a = gemm_nt(input, weight_ih, bias_ih);
  const Tensor h_prev = rows_contiguous(hx);
  const Tensor b = gemm_nt(h_prev, weight_hh);
  const Tensor b_hh = bias_hh ? bias_hh->contiguous() : Tensor();
  Tensor h = at::empty({B, H}, input.options());
  GruForwardStep p{};
  p.input_gates = a.data_ptr(), p.input_gates_stride = a.stride(0);
  p.hidden_gates = b.data_ptr(), p.hidden_gates_stride = b.stride(0);
  p.bias_hh = b_hh.defined() ? b_hh.data_ptr() : nullptr;
  p.h_prev = h_prev.data_ptr(), p.h_prev_stride = h_prev.stride(0);
  p.h_out = h.data_ptr(), p.h_out_stride = H;
  p.rows = B, p.hidden = H, p.dtype = input.scalar_type();
  run_gru_forward(kernels, p);
  return h;
}

std::tuple<Tensor, Tensor, Tensor> cell_backward(const OptTensor& grad_h, const OptTensor& grad_c,
                                                 const Tensor& gates, const Tensor& c_prev,
                                                 const Tensor& c, const OptTensor& weight_ch,
                                                 c10::string_view peephole, bool coupled,
                                                 double cell_clip,
                                                 const PointwiseKernels& kernels) {
  const Peephole kind = parse_peephole(peephole);
  const CellShape shape = check_cell(gates, c_prev, weight_ch, kind, coupled);
  check_clip(cell_clip, "cell_clip");
  check_cell_backward(grad_h, grad_c, c_prev, c, shape);
  const auto [B, H] = shape;
  const c10::OptionalDeviceGuard guard(c_prev.device());
  const bool full = kind == Peephole::Full;
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
    p.weight_ch = w.defined() && !full ? w.data_ptr() : nullptr;
    p.grad_z = grad_z.data_ptr(), p.grad_z_stride = grad_z.stride(0);
    p.rows = B, p.hidden = H, p.coupled = coupled, p.peephole = kind, p.dtype = g.scalar_type();
    p.cell_clip = cell_clip;
    if (full) {
      p.part = Part::Output;  // dz_o, and dc without the W_co path
      run_backward(kernels, p);
      grad_c_prev.addmm_(grad_z.narrow(1, output_gate(coupled) * H, H),
                         output_peephole_weight(w, H, coupled));
      p.part = Part::Update;  // from the total dc in grad_c_prev
      p.dc_in = grad_c_prev.data_ptr(), p.dc_in_stride = H;
    }
    run_backward(kernels, p);
    if (full) {
      grad_c_prev.addmm_(input_peephole_columns(grad_z, H, coupled),
                         input_peephole_weight(w, H, coupled));
    }
  }
  return {grad_z, grad_c_prev, peephole_grad(kind, grad_z, cp, cc, coupled)};
}

}  // namespace lstm_fused
