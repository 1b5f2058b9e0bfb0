#include <cmath>
#include <sstream>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"
#include "thread_team.h"

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

// Column sums of products on the CPU: for each pair (a, b) of [N, W] operands (rows strided, unit
// column stride), out[j] (+)= sum over rows of a[r, j] * b[r, j], the pairs' W columns side by
// side; in one pass over the operands with no temporaries (the tensor-op form writes the [N, W]
// products and reads them back). Threads split the columns, each sums its columns over the rows
// in order, in the op-math type: the result does not depend on the thread count. About 32k
// products per task, so a time step's few rows stay on the calling thread.
void column_product_sums_into(const std::vector<ProductColumns>& pairs, int64_t rows,
                              at::ScalarType dtype, void* sums, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "lstm_fused_column_product_sums", [&] {
    using math_t = at::opmath_type<scalar_t>;
    math_t* out = static_cast<math_t*>(sums);
    constexpr int64_t kColumns = 64;
    // Tiles of at most kColumns columns, none across two pairs: (pair, its first column, the
    // pair's first column in the result).
    struct Tile {
      size_t pair;
      int64_t column, out_column;
    };
    std::vector<Tile> tiles;
    int64_t out_column = 0;
    for (size_t k = 0; k < pairs.size(); ++k) {
      for (int64_t j = 0; j < pairs[k].width; j += kColumns) tiles.push_back({k, j, out_column});
      out_column += pairs[k].width;
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows * kColumns));
    parallel_range(0, static_cast<int64_t>(tiles.size()), grain, [&](int64_t begin, int64_t end) {
      math_t acc[kColumns];
      for (int64_t t = begin; t < end; ++t) {
        const Tile& tile = tiles[t];
        const ProductColumns& pair = pairs[tile.pair];
        const int64_t width = std::min(kColumns, pair.width - tile.column);
        const scalar_t* a_data = static_cast<const scalar_t*>(pair.a) + tile.column;
        const scalar_t* b_data = static_cast<const scalar_t*>(pair.b) + tile.column;
        std::fill(acc, acc + kColumns, math_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* a_row = a_data + r * pair.a_stride;
          const scalar_t* b_row = b_data + r * pair.b_stride;
          for (int64_t j = 0; j < width; ++j) {
            acc[j] += static_cast<math_t>(a_row[j]) * static_cast<math_t>(b_row[j]);
          }
        }
        math_t* sum = out + tile.out_column + tile.column;
        for (int64_t j = 0; j < width; ++j) sum[j] = accumulate ? sum[j] + acc[j] : acc[j];
      }
    });
  });
}

Tensor column_product_sums_cpu(const std::vector<std::pair<Tensor, Tensor>>& pairs) {
  std::vector<Tensor> operands;  // keeps any contiguous copies alive
  operands.reserve(2 * pairs.size());  // no reallocation: the references below stay valid
  std::vector<ProductColumns> columns;
  for (const auto& [a, b] : pairs) {
    const Tensor& ra = operands.emplace_back(rows_contiguous(a));
    const Tensor& rb = operands.emplace_back(rows_contiguous(b));
    columns.push_back({ra.const_data_ptr(), ra.stride(0), rb.const_data_ptr(), rb.stride(0),
                       ra.size(1)});
  }
  int64_t W = 0;
  for (const ProductColumns& c : columns) W += c.width;
  const auto dtype = pairs.front().first.scalar_type();
  Tensor sums = at::empty({W}, pairs.front().first.options().dtype(at::toOpMathType(dtype)));
  column_product_sums_into(columns, pairs.front().first.size(0), dtype, sums.data_ptr(), false);
  return sums;
}

Tensor peephole_grad(Peephole peephole, const Tensor& grad_z, const Tensor& c_prev,
                     const Tensor& c, bool coupled) {
  const int64_t H = c.size(-1);
  const int64_t k = peephole_input_blocks(coupled) * H;
  const Tensor dz_in = grad_z.narrow(1, 0, k);  // i, f (or f): they see c_prev
  const Tensor dz_o = grad_z.narrow(1, output_gate(coupled) * H, H);  // o sees c
  switch (peephole) {
    case Peephole::Diagonal: {
      if (grad_z.device().is_cpu()) {
        // peephole blocks i, f (f when coupled) with c_prev, then o with c
        std::vector<std::pair<Tensor, Tensor>> pairs;
        for (int64_t b = 0; b < k / H; ++b) pairs.emplace_back(dz_in.narrow(1, b * H, H), c_prev);
        pairs.emplace_back(dz_o, c);
        return column_product_sums_cpu(pairs)
            .view({num_peepholes(coupled), H})
            .to(grad_z.scalar_type());
      }
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
