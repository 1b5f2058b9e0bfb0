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

// Checks a tensor argument: dtype and device equal to `like`, and the expected sizes.
void check_arg(const Tensor& t, const char* name, const Tensor& like, at::IntArrayRef sizes);

// The shape weight_ch must have for a variant, or an error when it is missing or unexpected.
void check_weight_ch(const OptTensor& weight_ch, Peephole peephole, bool coupled, int64_t hidden,
                     const Tensor& like);

// The tensor itself when its last dimension is contiguous (the kernels' only layout need).
Tensor rows_contiguous(const Tensor& t);

inline void* row_ptr(const Tensor& t, int64_t row) {
  return static_cast<char*>(t.data_ptr()) + row * t.stride(0) * t.element_size();
}

// d loss / d weight_ch for diagonal peepholes, rows (i, f, o) or (f, o):
// sums over rows of dz_gate * (c_prev for i and f, c for o).
Tensor diagonal_peephole_grad(const Tensor& grad_z, const Tensor& c_prev, const Tensor& c,
                              bool coupled);

}  // namespace lstm_fused
