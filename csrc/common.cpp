#include <cmath>
#include <sstream>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

namespace lstm_fused {

Peephole parse_peephole(c10::string_view peephole) {
  if (peephole == "none") return Peephole::None;
  if (peephole == "diagonal") return Peephole::Diagonal;
  if (peephole == "full") return Peephole::Full;
  TORCH_CHECK_VALUE(false, "lstm_fused: peephole must be 'none', 'diagonal' or 'full', got '",
                    std::string(peephole), "'");
}

void check_clip(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, "lstm_fused: ", name,
                    " must be a finite number >= 0 (0 = no clipping), got ", value);
}

void check_floating(const Named& arg) {
  const auto dtype = arg.tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "lstm_fused: expected ", arg.name,
                   " to be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
                   dtype);
}

void check_device(const Named& arg, const Named& like) {
  TORCH_CHECK(arg.tensor.device() == like.tensor.device(), "lstm_fused: expected ", arg.name,
              " on device ", like.tensor.device(), ", got ", arg.tensor.device(),
              "; every tensor argument must be on the device of ", like.name);
}

void check_arg(const Named& arg, const Named& like, at::IntArrayRef sizes, const char* shape) {
  const Tensor& t = arg.tensor;
  TORCH_CHECK_TYPE(t.scalar_type() == like.tensor.scalar_type(), "lstm_fused: expected ",
                   arg.name, " to have dtype ", like.tensor.scalar_type(), ", got ",
                   t.scalar_type(), "; every tensor argument must have the dtype of ", like.name);
  check_device(arg, like);
  TORCH_CHECK_VALUE(t.sizes() == sizes, "lstm_fused: expected ", arg.name, " of shape ", sizes,
                    ", got ", t.sizes(), "; ", arg.name, " is ", shape);
}

void check_weight_ch(const OptTensor& weight_ch, Peephole peephole, bool coupled, int64_t hidden,
                     const Named& like, const char* hidden_from) {
  if (peephole == Peephole::None) {
    TORCH_CHECK_VALUE(!weight_ch.has_value(),
                      "lstm_fused: weight_ch was given but peephole is 'none'");
    return;
  }
  const int64_t P = num_peepholes(coupled);
  const char* variant = peephole == Peephole::Diagonal ? "diagonal" : "full";
  TORCH_CHECK_VALUE(weight_ch.has_value(), "lstm_fused: peephole='", variant,
                    "' needs weight_ch");
  const std::string shape = c10::str(
      peephole == Peephole::Diagonal ? "[P, H]" : "[P*H, H]", " for peephole='", variant,
      "', with P = 2 peepholes if coupled, else 3, and H from ", hidden_from);
  const int64_t rows = peephole == Peephole::Diagonal ? P : P * hidden;
  check_arg({*weight_ch, "weight_ch"}, like, {rows, hidden}, shape.c_str());
}

namespace {

// The boxed kernel of register_argument_checks(): checks the tensors on the stack by their schema
// names, then passes the call on to the kernel of their device.
void check_tensor_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                            torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const auto values = torch::jit::last(*stack, arguments.size());
  std::optional<Named> first;
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (!values[i].isTensor()) continue;  // also an absent optional tensor (None)
    const Named arg{values[i].toTensor(), arguments[i].name().c_str()};
    TORCH_CHECK_TYPE(arg.tensor.layout() == at::kStrided, "lstm_fused: expected ", arg.name,
                     " to be a dense (strided) tensor, got layout ", arg.tensor.layout());
    if (first) {
      check_device(arg, *first);
    } else {
      first.emplace(arg);
    }
  }
  op.redispatchBoxed(
      keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect),
      stack);
}

}  // namespace

void register_argument_checks(torch::Library& m) {
  // BackendSelect: after autograd and autocast (which may cast the arguments), before the kernel
  // of any device, Meta included.
  for (const char* op : {"cell_forward", "cell_backward", "layer_forward", "layer_backward",
                         "cell_step", "gru_layer_forward", "gru_layer_backward",
                         "gru_cell_step", "keep_mask"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&check_tensor_arguments>());
  }
}

Tensor rows_contiguous(const Tensor& t) {
  // Rows may be strided, even broadcast (stride 0): the kernels only read such inputs.
  return (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1)) ? t : t.contiguous();
}

namespace {

// The diagonal peephole gradient on the CPU: for every unit j and peephole block p,
// sum over rows of dz_p[r, j] * state[r, j] (c_prev for i and f, c for o), in one pass over the
// operands with no temporaries (the tensor-op form writes [N, 3H] products and reads them back).
// Threads split the columns, each sums its columns over the rows in order, in the op-math type:
// the result does not depend on the thread count.
Tensor diagonal_peephole_grad_cpu(const Tensor& grad_z, const Tensor& c_prev, const Tensor& c,
                                  bool coupled) {
  const int64_t N = grad_z.size(0), H = c.size(-1);
  const int blocks = num_peepholes(coupled), o_block = output_gate(coupled);
  const Tensor dz = rows_contiguous(grad_z), cp = rows_contiguous(c_prev), cc = rows_contiguous(c);
  Tensor grad = at::empty({blocks, H}, grad_z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_z.scalar_type(),
                                  "lstm_fused_peephole_grad", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const scalar_t* dz_data = dz.const_data_ptr<scalar_t>();
    const scalar_t* cp_data = cp.const_data_ptr<scalar_t>();
    const scalar_t* c_data = cc.const_data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    constexpr int64_t kColumns = 64;
    at::parallel_for(0, (H + kColumns - 1) / kColumns, 1, [&](int64_t begin, int64_t end) {
      const int64_t j0 = begin * kColumns, j1 = std::min(H, end * kColumns), width = j1 - j0;
      std::vector<math_t> acc(blocks * width, math_t(0));
      for (int64_t r = 0; r < N; ++r) {
        const scalar_t* dz_row = dz_data + r * dz.stride(0);
        const scalar_t* cp_row = cp_data + r * cp.stride(0) + j0;
        const scalar_t* c_row = c_data + r * cc.stride(0) + j0;
        for (int b = 0; b < blocks; ++b) {
          // peephole block b: gate block b (i, f; f when coupled) with c_prev, or o with c
          const bool is_o = b == blocks - 1;
          const scalar_t* d = dz_row + (is_o ? o_block : b) * H + j0;
          const scalar_t* state = is_o ? c_row : cp_row;
          math_t* a = acc.data() + b * width;
          for (int64_t j = 0; j < width; ++j) {
            a[j] += static_cast<math_t>(d[j]) * static_cast<math_t>(state[j]);
          }
        }
      }
      for (int b = 0; b < blocks; ++b) {
        for (int64_t j = 0; j < width; ++j) out[b * H + j0 + j] = acc[b * width + j];
      }
    });
  });
  return grad;
}

}  // namespace

Tensor peephole_grad(Peephole peephole, const Tensor& grad_z, const Tensor& c_prev,
                     const Tensor& c, bool coupled) {
  const int64_t H = c.size(-1);
  const int64_t k = peephole_input_blocks(coupled) * H;
  const Tensor dz_in = grad_z.narrow(1, 0, k);  // i, f (or f): they see c_prev
  const Tensor dz_o = grad_z.narrow(1, output_gate(coupled) * H, H);  // o sees c
  switch (peephole) {
    case Peephole::Diagonal: {
      if (grad_z.device().is_cpu()) return diagonal_peephole_grad_cpu(grad_z, c_prev, c, coupled);
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

Tensor keep_mask(const Tensor& seed, at::IntArrayRef size, double p, at::ScalarType dtype,
                 const PointwiseKernels& kernels) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                   "lstm_fused: keep_mask expected seed to be an int64 tensor of one element (the "
                   "generator's key), got a ", seed.scalar_type(), " tensor of shape ",
                   seed.sizes());
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0 && p <= 1,
                    "lstm_fused: keep_mask expected p, the probability of keeping a unit, in "
                    "[0, 1], got ", p);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype),
                   "lstm_fused: keep_mask expected a floating-point dtype, got ", dtype);
  for (const int64_t extent : size) {
    TORCH_CHECK_VALUE(extent >= 0, "lstm_fused: keep_mask expected a size of non-negative "
                      "extents, got ", size);
  }
  const c10::OptionalDeviceGuard device_guard(seed.device());
  Tensor out = at::empty(size, seed.options().dtype(dtype));
  const Tensor key = seed.contiguous();
  KeepMask mask{out.data_ptr(), out.numel(), key.const_data_ptr<int64_t>(), keep_threshold(p),
                dtype};
  RECORD_FUNCTION("lstm_fused::keep_mask", {});
  kernels.keep_mask(mask);
  return out;
}

}  // namespace lstm_fused
