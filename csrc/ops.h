// The lstm_fused operators, implemented once for every device: the drivers take the device's
// pointwise kernel table, and everything else they do (GEMMs, allocation) goes through ATen,
// which dispatches to the device of the inputs.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "pointwise.h"

namespace lstm_fused {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> cell_forward(const Tensor& gates, const Tensor& c_prev,
                                                const OptTensor& weight_ch,
                                                c10::string_view peephole, bool coupled,
                                                const PointwiseKernels& kernels);

std::tuple<Tensor, Tensor, Tensor> cell_backward(const OptTensor& grad_h, const OptTensor& grad_c,
                                                 const Tensor& gates, const Tensor& c_prev,
                                                 const Tensor& c, const OptTensor& weight_ch,
                                                 c10::string_view peephole, bool coupled,
                                                 const PointwiseKernels& kernels);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
    const OptTensor& weight_ch, const OptTensor& weight_hr, at::OptionalIntArrayRef batch_sizes,
    bool reverse, c10::string_view peephole, bool coupled, const PointwiseKernels& kernels);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
    const OptTensor& weight_ch, const OptTensor& weight_hr, const Tensor& output,
    const Tensor& gates, const Tensor& cells, at::OptionalIntArrayRef batch_sizes, bool reverse,
    c10::string_view peephole, bool coupled, bool need_input_grad,
    const PointwiseKernels& kernels);

// --- helpers shared by the cell and layer drivers ---------------------------------------------

Peephole parse_peephole(c10::string_view peephole);

// The kernels compute in floating point only: anything else is rejected up front, by name.
void check_floating(const Tensor& t, const char* name);

// Checks a tensor argument: dtype and device equal to `like`, and the expected sizes.
void check_arg(const Tensor& t, const char* name, const Tensor& like, at::IntArrayRef sizes);

// The shape weight_ch must have for a variant, or an error when it is missing or unexpected.
void check_weight_ch(const OptTensor& weight_ch, Peephole peephole, bool coupled, int64_t hidden,
                     const Tensor& like);

// The tensor itself when its last dimension is contiguous (the kernels' only layout need).
Tensor rows_contiguous(const Tensor& t);

// x [M, K] · weight [N, K]ᵀ (+ bias [N]) (+ addend [M, N]) as an [M, N] tensor: the GEMMs of the
// time loops. oneDNN's matmul for large enough float32/bfloat16 GEMMs on the CPU, into a new
// tensor; ATen's addmm otherwise, in place into `addend` when given (so the result may alias, and
// overwrite, it).
Tensor gemm_nt(const Tensor& x, const Tensor& weight, const OptTensor& bias = std::nullopt,
              const OptTensor& addend = std::nullopt);

// Every kernel launch, on every device, shows in profiles as its own labelled range.
inline void run_forward(const PointwiseKernels& kernels, const ForwardStep& step) {
  RECORD_FUNCTION("lstm_fused::pointwise_forward", {});
  kernels.forward(step);
}
inline void run_backward(const PointwiseKernels& kernels, const BackwardStep& step) {
  RECORD_FUNCTION("lstm_fused::pointwise_backward", {});
  kernels.backward(step);
}

inline void* row_ptr(const Tensor& t, int64_t row) {
  return static_cast<char*>(t.data_ptr()) + row * t.stride(0) * t.element_size();
}

// Peephole blocks that see c_prev: (i, f), or f when coupled. They are the first blocks of both
// weight_ch and z, so one column slice of z and one row slice of weight_ch cover them.
inline int peephole_input_blocks(bool coupled) { return num_peepholes(coupled) - 1; }
inline int output_gate(bool coupled) {
  return coupled ? GateLayout<true>::o : GateLayout<false>::o;
}

// d loss / d weight_ch over all rows: blocks (i, f, o) or (f, o) pair dz of the gate with c_prev
// (i, f) or c (o); summed elementwise (diagonal) or as a GEMM (full). Empty for no peephole.
Tensor peephole_grad(Peephole peephole, const Tensor& grad_z, const Tensor& c_prev,
                     const Tensor& c, bool coupled);

}  // namespace lstm_fused
