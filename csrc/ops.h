// The lstm_fused operators, implemented once for every device: the drivers take the device's
// pointwise kernel table, and everything else they do (GEMMs, allocation) goes through ATen,
// which dispatches to the device of the inputs.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "pointwise.h"

namespace torch {
class Library;
}  // namespace torch

namespace lstm_fused {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> cell_forward(const Tensor& gates, const Tensor& c_prev,
                                                const OptTensor& weight_ch,
                                                c10::string_view peephole, bool coupled,
                                                double cell_clip, const PointwiseKernels& kernels);

// The whole step, forward only (inference; the latency path of LSTMCell): input [B, I], hx, cx
// [B, H] -> (h, c), with both GEMMs and the pointwise kernel in one op, nothing saved.
std::tuple<Tensor, Tensor> cell_step(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                     const Tensor& weight_ih, const Tensor& weight_hh,
                                     const OptTensor& bias_ih, const OptTensor& bias_hh,
                                     const OptTensor& weight_ch, c10::string_view peephole,
                                     bool coupled, double cell_clip,
                                     const PointwiseKernels& kernels);

std::tuple<Tensor, Tensor, Tensor> cell_backward(const OptTensor& grad_h, const OptTensor& grad_c,
                                                 const Tensor& gates, const Tensor& c_prev,
                                                 const Tensor& c, const OptTensor& weight_ch,
                                                 c10::string_view peephole, bool coupled,
                                                 double cell_clip, const PointwiseKernels& kernels);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
    const OptTensor& weight_ch, const OptTensor& weight_hr, at::OptionalIntArrayRef batch_sizes,
    bool reverse, c10::string_view peephole, bool coupled, bool need_backward, double cell_clip,
    double proj_clip, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
    const OptTensor& weight_ln, double layer_norm_eps, const PointwiseKernels& kernels);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
    const OptTensor& weight_ch, const OptTensor& weight_hr, const Tensor& output,
    const Tensor& gates, const Tensor& cells, at::OptionalIntArrayRef batch_sizes, bool reverse,
    c10::string_view peephole, bool coupled, bool need_input_grad, double cell_clip,
    double proj_clip, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
    const OptTensor& weight_ln, const PointwiseKernels& kernels);

// Zoneout's keep mask [size] of `dtype` on seed's device: 1 with probability p, else 0, from the
// 64-bit key in `seed` (an int64 tensor of one element, read by the kernel) (pointwise.h KeepMask).
Tensor keep_mask(const Tensor& seed, at::IntArrayRef size, double p, at::ScalarType dtype,
                 const PointwiseKernels& kernels);

// The GRU layer (gate blocks r, z, n as nn.GRU; lstm_math.h gru_update), the same time loop
// structure: input [T, B, I] | [N, I] with batch_sizes, h0 [B, H] -> (output [..., H], h_n [B, H],
// gates [..., 4H] saved for backward: r, z, n and W_hn h_{t-1} + b_hn; empty without
// need_backward). zoneout_h [..., H]: zoneout's keep values (0/1 masks in training, the rate in
// eval; None = off), h_t = m h_{t-1} + (1 - m) h~_t.
std::tuple<Tensor, Tensor, Tensor> gru_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh,
    const OptTensor& bias_ih, const OptTensor& bias_hh, at::OptionalIntArrayRef batch_sizes,
    bool reverse, bool need_backward, const OptTensor& zoneout_h,
    const PointwiseKernels& kernels);

// -> (grad_input (empty without need_input_grad), grad_h0, grad_weight_ih, grad_weight_hh,
//     grad_bias_ih, grad_bias_hh)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& input,
    const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
    const OptTensor& bias_hh, const Tensor& output, const Tensor& gates,
    at::OptionalIntArrayRef batch_sizes, bool reverse, bool need_input_grad,
    const OptTensor& zoneout_h, const PointwiseKernels& kernels);

// One GRU step, forward only (inference; the latency path of GRUCell): input [B, I], hx [B, H]
// -> h [B, H], both GEMMs and the pointwise kernel in one op, nothing saved.
Tensor gru_cell_step(const Tensor& input, const Tensor& hx, const Tensor& weight_ih,
                     const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                     const PointwiseKernels& kernels);

// --- helpers shared by the cell and layer drivers ---------------------------------------------

Peephole parse_peephole(c10::string_view peephole);

// cell_clip / proj_clip (TensorFlow's state clipping; 0 = off): a finite number >= 0, or a
// ValueError naming the argument.
void check_clip(double value, const char* name);

// --- argument checks: every tensor argument of every op, before any kernel runs --------------
// Errors name the argument and say where its expected dtype, device and shape come from, with
// nn.LSTM's exception types: TypeError for dtypes and layouts, ValueError for shapes and values,
// RuntimeError for devices.

// A tensor argument and its name in the op schema.
struct Named {
  const Tensor& tensor;
  const char* name;
};

// The kernels compute in float64, float32, float16 and bfloat16 only: anything else is rejected
// up front, by name.
void check_floating(const Named& arg);

// `arg` on the device of `like` (the reference argument of the op).
void check_device(const Named& arg, const Named& like);

// A tensor argument: the dtype and device of `like` (the op's reference argument, input or
// c_prev), and the expected sizes; `shape` says where they come from, for the error message
// (e.g. "[B, H] like c_prev"). Devices are checked before dispatch too (register_argument_checks);
// the drivers check them again, by the reference's name, as they need them to be right.
void check_arg(const Named& arg, const Named& like, at::IntArrayRef sizes, const char* shape);

// The shape weight_ch must have for a variant, or an error when it is missing or unexpected;
// `hidden_from` names the argument H comes from.
void check_weight_ch(const OptTensor& weight_ch, Peephole peephole, bool coupled, int64_t hidden,
                     const Named& like, const char* hidden_from);

// Registers, for every op of `m`'s library (lstm_fused or the host shim's), a check that runs
// before the device kernels: every tensor argument strided and on the device of the first one.
// The dispatcher picks the kernel from the devices of all arguments, so a mixed call would
// otherwise reach the CUDA kernels with a CPU pointer, or the fake (meta) kernel unchecked.
void register_argument_checks(torch::Library& m);

// The tensor itself when its last dimension is contiguous (the kernels' only layout need).
Tensor rows_contiguous(const Tensor& t);

// --- the GEMMs of the time loops (gemm.cpp) --------------------------------------------------

// How a CPU GEMM runs: chosen by measurement (Auto) or forced (LSTM_FUSED_CPU_GEMM, or
// lstm_fused.cpu_gemm.set_mode()).
enum class CpuGemmPath : int { Auto = 0, Aten = 1, OneDnn = 2, Packed = 3, Simd = 4 };

// What a measured choice is cached by: one-off or repeated GEMM, its rows (the batch), N (output
// features), K, dtype, threads, whether it accumulates into an addend, the row stride of its
// output (N, or more for a column block of a wider tensor, which costs some paths a copy),
// whether its operands come transposed (the weight gradients, gemm_tn: x = aᵀ, weight = bᵀ),
// whether the weight of a gemm_nt is a transposed view (the input gradient's W_ihᵀ), the
// column groups of a repeated GEMM's weight (one per gate where the fused step splits units), and
// whether a repeated GEMM's simd path reads the weight as stored (few rows in all: the dot form).
struct GemmKey {
  bool repeated;
  int64_t rows, n, k;
  at::ScalarType dtype;
  int threads;
  bool accumulate;
  int64_t out_stride;
  bool transposed = false;
  bool weight_transposed = false;
  int64_t column_groups = 1;
  bool weight_as_stored = false;
  auto tie() const {
    return std::tie(repeated, rows, n, k, dtype, threads, accumulate, out_stride, transposed,
                    weight_transposed, column_groups, weight_as_stored);
  }
  bool operator<(const GemmKey& other) const { return tie() < other.tie(); }
};

// How a measured repeated-GEMM choice holds up after its trials: the chosen path's trial median,
// and the streak of sampled later GEMMs that ran far slower than it (gemm.cpp samples every few
// steps). A long enough streak marks the choice stale: the next layer call of that shape measures
// again. Shared by the cache entry and the RepeatedGemms made from it.
struct ChoiceHealth {
  double trial_seconds = 0;
  std::atomic<int64_t> calls{0};
  std::atomic<int> slow_streak{0};
  std::atomic<bool> stale{false};
  void sample(double seconds);  // one sampled GEMM's seconds
};

struct CpuGemmChoice {
  CpuGemmPath path = CpuGemmPath::Aten;
  std::vector<std::pair<CpuGemmPath, double>> seconds;  // median seconds per GEMM of each path
  int measurements = 1;  // 1, plus one per re-check after a slow streak
  std::shared_ptr<ChoiceHealth> health;  // repeated GEMMs only
};

std::string cpu_gemm_path_name(CpuGemmPath path);
std::string cpu_gemm_mode();  // "auto" or the forced path
void set_cpu_gemm_mode(c10::string_view mode);
std::vector<std::string> cpu_gemm_paths(at::ScalarType dtype);  // the paths that run `dtype`
std::vector<std::pair<GemmKey, CpuGemmChoice>> cpu_gemm_choices();
void clear_cpu_gemm_choices();
// Test only: deterministic timings in place of the clock. `trials[path][round % size]` is the
// seconds a trial of `path` reports (paths absent: measured), `run_seconds` (>= 0) what every
// sampled GEMM after the choice reports; empty and negative: the clock again.
void set_cpu_gemm_test_times(std::map<CpuGemmPath, std::vector<double>> trials,
                             double run_seconds);

// On the CPU, a time loop that only reads its input projection (inference, the GRU) computes it
// a chunk of steps at a time, so that each chunk's rows are still in the cache when its steps
// read them: the rows of a chunk, for rows of `row_bytes` bytes (half of what the threads' L2
// caches hold, unless forced).
int64_t projection_chunk_rows(int64_t row_bytes);
int64_t forced_projection_chunk_rows();  // 0: from the cache size
void set_projection_chunk_rows(int64_t rows);

// x [M, K] · weight [N, K]ᵀ (+ bias [N]) (+ addend [M, N]) as an [M, N] tensor, for GEMMs run
// once per call (input projections, input gradients): ATen's addmm, in place into `addend` when
// given (so the result may alias, and overwrite, it), or on the CPU oneDNN's matmul into a new
// tensor where it measured faster.
Tensor gemm_nt(const Tensor& x, const Tensor& weight, const OptTensor& bias = std::nullopt,
              const OptTensor& addend = std::nullopt);
// The path gemm_nt takes for that GEMM (measured on first use, or forced); Aten off the CPU.
CpuGemmPath one_off_gemm_path(const Tensor& x, const Tensor& weight, bool accumulate);

// a [K, M]ᵀ · b [K, N] as a new [M, N] tensor: the weight gradients (dzᵀ x, dzᵀ h_{t-1}), summed
// over the K = T*B rows. On the CPU, ATen's mm or (float32) our simd kernel, which reads both
// operands as stored, whichever measured faster for the shape (or the forced path; oneDNN and
// MKL's packed GEMM take ATen's place); ATen elsewhere.
Tensor gemm_tn(const Tensor& a, const Tensor& b);
// The path gemm_tn takes for those operands.
CpuGemmPath transposed_gemm_path(const Tensor& a, const Tensor& b);

// out [m, N] = (or +=, with `accumulate`) x [m, K] · weight [N, K]ᵀ (+ bias [N], if given, not
// with `accumulate`) for every m <= max_rows, many times with the same weight: the per-step GEMMs
// of the time loops, and the chunks of an input projection. The CPU path is chosen
// (measured once per shape, dtype and thread count, or forced) and the weight prepared for it
// once, at construction: packed for MKL's packed GEMM, reordered for oneDNN. On other devices,
// ATen. `x` and `out` need a unit column stride (`out` may be a column slice of a wider tensor).
class RepeatedGemm {
 public:
  // uses: how many times the call will run it (a loop's steps), which with max_rows decides
  // whether the simd path packs the weight (kSimdDotMaxRows). out_stride: the row stride of the
  // outputs `run` will get (0: N, contiguous rows); the measured trials write the same layout.
  // column_groups: the weight's rows are that many equal groups (a recurrent weight's gates,
  // which run_recurrent_step computes one gate at a time).
  RepeatedGemm(const Tensor& weight, int64_t max_rows, int64_t uses, bool accumulate,
               int64_t out_stride = 0, int64_t column_groups = 1, const Tensor& bias = Tensor());
  // The result: `out` itself, written in place, or (oneDNN) a new [m, N] tensor.
  Tensor run(const Tensor& x, const Tensor& out) const;
  // The result in `out`, always.
  void run_into(const Tensor& x, const Tensor& out) const;
  // The simd path's fused step (run_recurrent_step below) with this GEMM's weight, sampled for
  // the re-check like run().
  void run_recurrent_step(const float* h_prev, int64_t h_prev_stride,
                          const ForwardStep& step) const;
  CpuGemmPath path() const { return path_; }
  const Tensor& weight() const { return weight_; }  // contiguous

 private:
  RepeatedGemm(const Tensor& weight, bool accumulate, int64_t column_groups,
               const Tensor& bias);  // for trials
  void prepare(CpuGemmPath path, int64_t max_rows, bool weight_as_stored);
  Tensor compute(const Tensor& x, const Tensor& out) const;
  // Runs `gemm` (of `rows` rows), timing it when it is a sample for the re-check.
  template <typename F>
  auto sampled(int64_t rows, const F& gemm) const;

  Tensor weight_, weight_t_, prepared_, bias_;
  bool accumulate_;
  bool dot_ = false;  // the simd path with the weight as stored (kSimdDotMaxRows)
  int64_t column_groups_;
  CpuGemmPath path_ = CpuGemmPath::Aten;
  std::shared_ptr<ChoiceHealth> health_;  // measured choices only
  int64_t max_rows_ = 0;
  mutable int64_t steps_ = 0;
};

// Every kernel launch, on every device, shows in profiles as its own labelled range.
inline void run_forward(const PointwiseKernels& kernels, const ForwardStep& step) {
  RECORD_FUNCTION("lstm_fused::pointwise_forward", {});
  kernels.forward(step);
}
inline void run_backward(const PointwiseKernels& kernels, const BackwardStep& step) {
  RECORD_FUNCTION("lstm_fused::pointwise_backward", {});
  kernels.backward(step);
}
inline void run_gru_forward(const PointwiseKernels& kernels, const GruForwardStep& step) {
  RECORD_FUNCTION("lstm_fused::gru_pointwise_forward", {});
  kernels.gru_forward(step);
}
inline void run_gru_backward(const PointwiseKernels& kernels, const GruBackwardStep& step) {
  RECORD_FUNCTION("lstm_fused::gru_pointwise_backward", {});
  kernels.gru_backward(step);
}

// One-off simd GEMMs (the LSTMCell step's) of up to this many rows read the weight as it is
// stored (the dot form: packing it would cost more than it saves); more rows pack it (gemm.cpp).
// So do repeated ones of up to kSimdDotRepeatedMaxRows rows and as many rows in all (max_rows *
// uses: a short sequence at a small batch, streaming inference), whose packing is paid once per
// call. On a Zen 4 (H = 256) the dot form's step took 0.7 us more than the panel tile's at
// batch 1, 1.6 us at batch 2, about 10% more at batch 4 and 23% at 16; packing the 1 MiB weight
// about 50 us: packing paid from about 60-70 rows in all at batches 1 and 2. From 8 rows a step
// the dot form is slow enough that the measured choice may take another path, whose preparation
// (oneDNN's reorder) it does not count either.
constexpr int64_t kSimdDotMaxRows = 32;
constexpr int64_t kSimdDotRepeatedMaxRows = 4;

// The float32 CPU forward step of the simd path (peephole none or diagonal): h_{t-1} W_hhᵀ added
// to z and the pointwise forward, in one kernel (cpu/small_gemm_kernels.h), with the weight as it
// is stored (the LSTMCell step; a layer's loop runs RepeatedGemm::run_recurrent_step).
void run_recurrent_step(const float* h_prev, int64_t h_prev_stride, const Tensor& weight_hh,
                        const ForwardStep& step);

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

// CPU: for pairs (a, b) of [N, W] tensors (unit column stride), the column sums over rows of
// a ⊙ b, each pair's W sums after the previous pair's, in one pass without temporaries, in (and
// returned in) the op-math type, the same for any thread count.
Tensor column_product_sums_cpu(const std::vector<std::pair<Tensor, Tensor>>& pairs);
// The same on raw operands (the time loops' per-step sums: no tensor op, no view per step): pairs
// of [rows, width] operands of `dtype` with unit column stride, their sums added to (accumulate)
// or written over `sums`, contiguous op-math values, pair after pair.
struct ProductColumns {
  const void* a;
  int64_t a_stride;
  const void* b;
  int64_t b_stride;
  int64_t width;
};
void column_product_sums_into(const std::vector<ProductColumns>& pairs, int64_t rows,
                              at::ScalarType dtype, void* sums, bool accumulate);

}  // namespace lstm_fused
