#include <sstream>

#include <ATen/OpMathType.h>

#include "ops.h"

namespace lstm_fused {

Peephole parse_peephole(c10::string_view peephole) {
  if (peephole == "none") return Peephole::None;
  if (peephole == "diagonal") return Peephole::Diagonal;
  if (peephole == "full") return Peephole::Full;
  TORCH_CHECK_VALUE(false, "lstm_fused: peephole must be 'none', 'diagonal' or 'full', got '",
                    std::string(peephole), "'");
}

void check_floating(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "lstm_fused: expected ", name,
                   " to be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
                   t.scalar_type());
}

void check_arg(const Tensor& t, const char* name, const Tensor& like, at::IntArrayRef sizes) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "lstm_fused: expected ", name,
                   " to have dtype ", like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "lstm_fused: expected ", name, " on device ",
              like.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == sizes, "lstm_fused: expected ", name, " of shape ", sizes,
                    ", got ", t.sizes());
}

void check_weight_ch(const OptTensor& weight_ch, Peephole peephole, bool coupled, int64_t hidden,
                     const Tensor& like) {
  const int64_t P = num_peepholes(coupled);
  switch (peephole) {
    case Peephole::None:
      TORCH_CHECK_VALUE(!weight_ch.has_value(),
                        "lstm_fused: weight_ch was given but peephole is 'none'");
      return;
    case Peephole::Diagonal:
      TORCH_CHECK_VALUE(weight_ch.has_value(), "lstm_fused: peephole='diagonal' needs weight_ch");
      check_arg(*weight_ch, "weight_ch", like, {P, hidden});
      return;
    case Peephole::Full:
      TORCH_CHECK_VALUE(weight_ch.has_value(), "lstm_fused: peephole='full' needs weight_ch");
      check_arg(*weight_ch, "weight_ch", like, {P * hidden, hidden});
      return;
  }
}

Tensor rows_contiguous(const Tensor& t) {
  // Rows may be strided, even broadcast (stride 0): the kernels only read such inputs.
  return (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1)) ? t : t.contiguous();
}

Tensor peephole_grad(Peephole peephole, const Tensor& grad_z, const Tensor& c_prev,
                     const Tensor& c, bool coupled) {
  const int64_t H = c.size(-1);
  const int64_t k = peephole_input_blocks(coupled) * H;
  const Tensor dz_in = grad_z.narrow(1, 0, k);  // i, f (or f): they see c_prev
  const Tensor dz_o = grad_z.narrow(1, output_gate(coupled) * H, H);  // o sees c
  switch (peephole) {
    case Peephole::Diagonal: {
      // Sums over all T*B rows: products and sums in the op-math type (float for half and
      // bfloat16 storage, so no product is rounded to 8 bits before it is added), cast back once.
      const auto math = at::toOpMathType(grad_z.scalar_type());
      const Tensor in = (dz_in.to(math).reshape({-1, k / H, H}) * c_prev.to(math).unsqueeze(1));
      const Tensor out = dz_o.to(math) * c.to(math);
      return at::cat({in.sum(0), out.sum(0, /*keepdim=*/true)}).to(grad_z.scalar_type());
    }
    case Peephole::Full:  // GEMMs: cuBLAS and the CPU BLAS accumulate half/bfloat16 in float
      return at::cat({dz_in.t().mm(c_prev), dz_o.t().mm(c)});
    case Peephole::None:
      break;
  }
  return at::empty({0}, grad_z.options());
}

}  // namespace lstm_fused
