// One LSTM layer in one direction over a whole sequence, padded [T, B, I] or packed [N, I] with
// per-step batch sizes. The time loop is here, in C++, and is the same for every device:
//   forward,  once:      gates = x W_ih^T + b_ih + b_hh           (one GEMM over all steps; on
//                                                                  the CPU a chunk of steps at
//                                                                  a time: StepPreactivations)
//             per step:  z_t = gates_t + h_{t-1} W_hh^T           (one GEMM)
//                        pointwise forward                        (one kernel; in training
//                                                                  writes the activated gates:
//                                                                  on the CPU to rows of their
//                                                                  own, elsewhere over gates_t)
//   backward, per step:  pointwise backward -> dz_t, dc_{t-1}      (one kernel)
//                        dh_{t-1} = dz_t W_hh                     (one GEMM)
//             once:      dW_ih, dW_hh, dx, bias and peephole gradients over all T*B rows.
// The per-step GEMMs are RepeatedGemm (gemm.cpp): their weight is prepared (packed for MKL's
// packed GEMM, reordered for oneDNN) once per call, and the path is the one that measured fastest
// for the shape on this CPU; with our own few-row "simd" path the forward's GEMM and pointwise
// step are one kernel. Full peepholes split the step's GEMM by gate blocks (see
// input_peephole_weight) and add c_t W_coᵀ between the two parts of the kernel. Without need_backward (inference) nothing the backward needs is
// written: no cell states of every step, and the kernel does not store the activated gates.
// With a projection (proj_size > 0) each step has one more GEMM (h = r W_hr^T) and the
// backward one more add and GEMM.
#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <numeric>

#include "ops.h"
#include "thread_team.h"

namespace lstm_fused {

namespace {

// Which rows are active at each time step. Padded input: every step has all B rows. Packed
// input: the first batch_sizes[t] rows (sequences sorted by decreasing length).
struct Schedule {
  std::vector<int64_t> sizes;    // rows active at time t
  std::vector<int64_t> offsets;  // first row of time t in the [N, ...] layouts
  int64_t batch = 0;             // B, the rows of the states
  int64_t rows = 0;              // N = sum(sizes)
  bool ragged = false;           // some step has fewer than B rows
  bool reverse = false;

  int64_t steps() const { return static_cast<int64_t>(sizes.size()); }
  // Time index of the s-th processed step.
  int64_t time(int64_t s) const { return reverse ? steps() - 1 - s : s; }
};

Schedule make_schedule(const Tensor& input, at::OptionalIntArrayRef batch_sizes, bool reverse) {
  Schedule s;
  s.reverse = reverse;
  if (batch_sizes.has_value()) {
    TORCH_CHECK_VALUE(input.dim() == 2,
                      "lstm_fused: packed input (with batch_sizes) must be 2-D [N, input_size], "
                      "got ", input.sizes());
    int64_t previous = std::numeric_limits<int64_t>::max();
    for (const int64_t size : *batch_sizes) {
      TORCH_CHECK_VALUE(size > 0 && size <= previous,
                        "lstm_fused: batch_sizes must be positive and non-increasing, got ",
                        *batch_sizes);
      previous = size;
      s.offsets.push_back(s.rows);
      s.sizes.push_back(size);
      s.rows += size;
    }
    TORCH_CHECK_VALUE(s.rows == input.size(0), "lstm_fused: batch_sizes sum to ", s.rows,
                      " but the packed input has ", input.size(0), " rows");
    s.batch = s.sizes.empty() ? 0 : s.sizes.front();
  } else {
    TORCH_CHECK_VALUE(input.dim() == 3, "lstm_fused: expected input of shape [T, B, input_size], "
                      "got ", input.sizes());
    const int64_t T = input.size(0);
    s.batch = input.size(1);
    for (int64_t t = 0; t < T; ++t) {
      s.offsets.push_back(t * s.batch);
      s.sizes.push_back(s.batch);
    }
    s.rows = T * s.batch;
  }
  s.ragged = std::any_of(s.sizes.begin(), s.sizes.end(),
                         [&](int64_t size) { return size != s.batch; });
  return s;
}

struct LayerShape {
  Peephole peephole;
  int64_t gates, hidden, proj, input;
};

// Where the expected shapes come from (error messages): B (and the leading dimensions) from
// input, I from input, G*H from weight_ih, R from weight_hr (or R = H without a projection).
constexpr char kHiddenFrom[] = "weight_ih (H = its rows / G, G = 3 gates if coupled, else 4)";
constexpr char kStateH[] =
    "[B, R], with B from input (packed: batch_sizes[0]) and R from weight_hr, or H without it";
constexpr char kStateC[] =
    "[B, H], with B from input (packed: batch_sizes[0]) and H = weight_ih rows / G, G = 3 gates "
    "if coupled, else 4";

LayerShape check_layer(const Tensor& input, const Tensor& h0, const Tensor& c0,
                       const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
                       const OptTensor& bias_hh, const OptTensor& weight_ch,
                       const OptTensor& weight_hr, const Schedule& schedule,
                       c10::string_view peephole, bool coupled) {
  LayerShape shape{parse_peephole(peephole), num_gates(coupled), 0, 0, input.size(-1)};
  const Named like{input, "input"};
  check_floating(like);
  TORCH_CHECK_VALUE(weight_ih.dim() == 2 && weight_ih.size(0) % shape.gates == 0,
                    "lstm_fused: expected weight_ih of shape [G*H, I], with G = ", shape.gates,
                    " gates (coupled=", coupled ? "True" : "False", "), got ", weight_ih.sizes());
  shape.hidden = weight_ih.size(0) / shape.gates;
  const int64_t GH = shape.gates * shape.hidden;
  check_arg({weight_ih, "weight_ih"}, like, {GH, shape.input}, "[G*H, I], with I from input");
  // c0 first: a wrong `coupled` shows as a wrong H, and its message says where H comes from.
  check_arg({c0, "c0"}, like, {schedule.batch, shape.hidden}, kStateC);
  TORCH_CHECK_VALUE(!weight_hr || weight_hr->dim() == 2,
                    "lstm_fused: expected weight_hr of shape [R, H], got ", weight_hr->sizes());
  shape.proj = weight_hr ? weight_hr->size(0) : shape.hidden;
  if (weight_hr) {
    check_arg({*weight_hr, "weight_hr"}, like, {shape.proj, shape.hidden},
              "[R, H], with H = weight_ih rows / G, G = 3 gates if coupled, else 4");
  }
  check_arg({weight_hh, "weight_hh"}, like, {GH, shape.proj},
            "[G*H, R], with G*H from weight_ih and R from weight_hr, or H without it");
  check_arg({h0, "h0"}, like, {schedule.batch, shape.proj}, kStateH);
  const char* bias = "[G*H], with G*H from weight_ih";
  if (bias_ih) check_arg({*bias_ih, "bias_ih"}, like, {GH}, bias);
  if (bias_hh) check_arg({*bias_hh, "bias_hh"}, like, {GH}, bias);
  check_weight_ch(weight_ch, shape.peephole, coupled, shape.hidden, like, kHiddenFrom);
  return shape;
}

// The sizes of a per-row tensor of the layer: the leading dimensions of input, then `last`.
std::vector<int64_t> per_row_sizes(const Tensor& input, int64_t last) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end() - 1);
  sizes.push_back(last);
  return sizes;
}

// layer_backward's other tensors: the forward's outputs and the incoming gradients (any of which
// may be absent: autograd passes None for an output that got no gradient).
void check_layer_backward(const OptTensor& grad_output, const OptTensor& grad_h_n,
                          const OptTensor& grad_c_n, const Tensor& input, const Tensor& output,
                          const Tensor& gates, const Tensor& cells, const LayerShape& shape,
                          const Schedule& schedule, int64_t gates_width,
                          int64_t cells_width) {
  const Named like{input, "input"};
  const int64_t B = schedule.batch, H = shape.hidden, R = shape.proj;
  const char* per_step_h =
      "[..., R], with the leading dimensions of input and R from weight_hr, or H without it";
  check_arg({output, "output"}, like, per_row_sizes(input, R), per_step_h);
  check_arg({gates, "gates"}, like, per_row_sizes(input, gates_width),
            gates_width == shape.gates * H
                ? "[..., G*H], with the leading dimensions of input and G*H from weight_ih"
                : "[..., 2*G*H + 2*G] (layer norm: the gates, x̂ and the statistics), with the "
                  "leading dimensions of input and G*H from weight_ih");
  check_arg({cells, "cells"}, like, per_row_sizes(input, cells_width),
            "[..., H] (with zoneout_c [..., 2H]), with the leading dimensions of input and H = "
            "weight_ih rows / G, G = 3 gates if coupled, else 4");
  if (grad_output) {
    check_arg({*grad_output, "grad_output"}, like, per_row_sizes(input, R), per_step_h);
  }
  if (grad_h_n) check_arg({*grad_h_n, "grad_h_n"}, like, {B, R}, kStateH);
  if (grad_c_n) check_arg({*grad_c_n, "grad_c_n"}, like, {B, H}, kStateC);
}

// The time step that runs just before time t (t + 1 in reverse; out of range for the first).
int64_t previous_time(const Schedule& s, int64_t t) { return s.reverse ? t + 1 : t - 1; }

// How many rows of time t start from the previous step's state (rows that also ran then: the
// first ones, packed sequences being sorted by length); the others start from the initial state.
int64_t carried_rows(const Schedule& s, int64_t t) {
  const int64_t prev = previous_time(s, t);
  return prev >= 0 && prev < s.steps() ? std::min(s.sizes[t], s.sizes[prev]) : 0;
}

// [N, D]: for every row, the state it started its step from. `states` holds the state after each
// row's step ([N, D], same layout), `initial` the initial states [B, D]. One concatenation of row
// ranges of the two, so nothing is built on the host: a host-to-device index copy can
// synchronise with the GPU and cannot be captured in a CUDA graph.
Tensor previous_states(const Tensor& states, const Tensor& initial, const Schedule& s) {
  std::vector<Tensor> pieces;
  const Tensor* last_source = nullptr;
  int64_t last_start = 0, last_length = 0;
  auto flush = [&] {
    if (last_length > 0) pieces.push_back(last_source->narrow(0, last_start, last_length));
  };
  // Appends rows [start, start + length) of source, merged with the previous range if adjacent.
  auto add = [&](const Tensor& source, int64_t start, int64_t length) {
    if (length == 0) return;
    if (&source == last_source && last_start + last_length == start) {
      last_length += length;
      return;
    }
    flush();
    last_source = &source, last_start = start, last_length = length;
  };
  for (int64_t t = 0; t < s.steps(); ++t) {
    const int64_t carried = carried_rows(s, t);
    if (carried > 0) add(states, s.offsets[previous_time(s, t)], carried);
    add(initial, carried, s.sizes[t] - carried);
  }
  flush();
  return pieces.empty() ? states : at::cat(pieces);
}

Tensor input_bias(const OptTensor& bias_ih, const OptTensor& bias_hh) {
  if (bias_ih && bias_hh) return *bias_ih + *bias_hh;
  if (bias_ih) return *bias_ih;
  if (bias_hh) return *bias_hh;
  return Tensor();
}

// Full peepholes: the recurrent GEMM is split by gate blocks. The blocks that see c_{t-1} (i, f;
// f when coupled: the first `input_peephole_columns` columns of z) take ONE GEMM of
// [h_{t-1} | c_{t-1}] (side by side in the running state) by [W_hh | W_c] rows of those blocks;
// the other blocks (g, o) h_{t-1} W_hhᵀ alone. No block of zeros is multiplied.
int64_t input_peephole_columns(bool coupled, int64_t hidden) {
  return peephole_input_blocks(coupled) * hidden;
}
Tensor input_peephole_weight(const Tensor& weight_hh, const Tensor& weight_ch, bool coupled) {
  const int64_t k = input_peephole_columns(coupled, weight_ch.size(1));
  return at::cat({weight_hh.narrow(0, 0, k), weight_ch.narrow(0, 0, k)}, 1);
}

// The state clips of a layer (0 = off); proj_clip clips the projected h, so it needs weight_hr.
void check_clips(double cell_clip, double proj_clip, const OptTensor& weight_hr) {
  check_clip(cell_clip, "cell_clip");
  check_clip(proj_clip, "proj_clip");
  TORCH_CHECK_VALUE(proj_clip == 0 || weight_hr.has_value(),
                    "lstm_fused: proj_clip clips the projected h and needs weight_hr (proj_size > "
                    "0), got proj_clip=", proj_clip, " without weight_hr");
}

// Zoneout (lstm_math.h zoneout): the keep values of h ([..., R]) and of c ([..., H]), one row
// per row of input, in input's dtype and on its device; 0/1 masks in training, the rates in eval
// (rows may be 0 apart: one expanded row of rates).
void check_zoneout(const OptTensor& keep_h, const OptTensor& keep_c, const Tensor& input,
                   const LayerShape& shape) {
  const Named like{input, "input"};
  if (keep_h) {
    check_arg({*keep_h, "zoneout_h"}, like, per_row_sizes(input, shape.proj),
              "[..., R]: one keep value per h unit of every row of input, R from weight_hr or H "
              "without it");
  }
  if (keep_c) {
    check_arg({*keep_c, "zoneout_c"}, like, per_row_sizes(input, shape.hidden),
              "[..., H]: one keep value per c unit of every row of input, H = weight_ih rows / G");
  }
}

// A keep tensor as [N, D] rows with a unit column stride (a view where it can be), or undefined.
Tensor keep_rows(const OptTensor& keep, int64_t rows, int64_t width) {
  if (!keep) return Tensor();
  Tensor k = keep->reshape({rows, width});
  return k.stride(1) == 1 || width == 1 ? k : k.contiguous();
}

// The saved cell states: [N, H] c_t, or with zoneout of c [N, 2H]: the computed c~_t (what tanh,
// the output gate and the clip saw) in the first H columns, the zoned c_t (the state the next step
// started from) in the last H.
int64_t saved_cells_width(int64_t hidden, const OptTensor& keep_c) {
  return keep_c ? 2 * hidden : hidden;
}

// Layer norm's γ: [G, H] like input, and its eps a finite number > 0.
void check_layer_norm(const OptTensor& weight_ln, double eps, const LayerShape& shape,
                      const Named& like) {
  if (!weight_ln) return;
  check_arg({*weight_ln, "weight_ln"}, like, {shape.gates, shape.hidden},
            "[G, H], with G = 3 gates if coupled, else 4, and H = weight_ih rows / G");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0,
                    "lstm_fused: layer_norm_eps must be a finite number > 0, got ", eps);
}

// The width of a saved row of `gates`: the activated gates, with layer norm also x̂ and the
// statistics of every gate (layer_norm_saved_width).
int64_t saved_width(const LayerShape& shape, bool coupled, bool layer_norm) {
  return layer_norm ? layer_norm_saved_width(coupled, shape.hidden) : shape.gates * shape.hidden;
}

// Layer norm's pre-activations of every step in training off the CPU, x W_ih^T without bias, in
// the first G*H columns of [N, W] rows, W = layer_norm_saved_width: the kernel saves x̂ and the
// statistics beside the activated gates. (Where the kernel saves them apart, the CPU and
// inference, the G*H columns alone: StepPreactivations.)
Tensor layer_norm_preactivations(const Tensor& x, const Tensor& weight_ih, bool coupled,
                                 int64_t hidden) {
  Tensor gates = at::empty({x.size(0), layer_norm_saved_width(coupled, hidden)}, x.options());
  Tensor preactivations = gates.narrow(1, 0, weight_ih.size(0));
  at::mm_out(preactivations, x, weight_ih.t());
  return gates;
}

void set_layer_norm(ForwardStep& p, const Tensor& weight_ln, const Tensor& bias_ln, double eps) {
  p.layer_norm = weight_ln.defined();
  p.weight_ln = p.layer_norm ? weight_ln.data_ptr() : nullptr;
  p.bias_ln = bias_ln.defined() ? bias_ln.data_ptr() : nullptr;
  p.layer_norm_eps = eps;
}

// dγ [G, H] = sum over rows of dẑ ⊙ x̂, accumulated in the op-math type. (The CPU accumulates it
// step by step in the time loop instead, while the step's rows are in cache.)
Tensor layer_norm_weight_grad(const Tensor& grad_zhat, const Tensor& normed, int64_t gates) {
  const auto opmath = at::toOpMathType(grad_zhat.scalar_type());
  return (grad_zhat.to(opmath) * normed.to(opmath))
      .sum(0)
      .view({gates, -1})
      .to(grad_zhat.scalar_type());
}

// The running states of a layer: h_{t-1} (for packed input or full peepholes; padded input reads
// it from the output) and c_{t-1}, as views into one buffer for full peepholes.
struct RunningState {
  Tensor hc, h, c;

  RunningState(const Tensor& h_init, const Tensor& c_init, bool full, bool need_h) {
    if (full) {
      hc = at::cat({h_init, c_init}, 1);
      h = hc.narrow(1, 0, h_init.size(1));
      c = hc.narrow(1, h_init.size(1), c_init.size(1));
    } else {
      c = c_init.clone(at::MemoryFormat::Contiguous);
      if (need_h) h = h_init.clone(at::MemoryFormat::Contiguous);
    }
  }
  // Final values as tensors of their own (the views of `hc` would alias each other).
  Tensor final_h() const { return hc.defined() ? h.clone(at::MemoryFormat::Contiguous) : h; }
  Tensor final_c() const { return hc.defined() ? c.clone(at::MemoryFormat::Contiguous) : c; }
};

// An uninitialised [rows, width] tensor whose rows are one cache line longer than `width`. Per-step
// rows of G*H values are exactly 4 KiB apart at H=256: the 8 rows a GEMM tile reads or writes
// then share one L1 set, and a load can wait on a store to another row 4 KiB away (4K
// aliasing), worst when two such tensors sit at the same offsets in their pages, as large
// (page-aligned) allocations do. Measured: the chunked inference forward ran at 1.2-1.4x
// nn.LSTM's time in 2 of 9 processes without it and in none of 9 with it; the training step's
// dz rows, 3% faster at B=64.
Tensor padded_rows(int64_t rows, int64_t width, const at::TensorOptions& options) {
  const int64_t pad = 64 / static_cast<int64_t>(options.dtype().itemsize());
  return at::empty({rows, width + pad}, options).narrow(1, 0, width);
}

// Whether a time loop may keep its threads for all its steps (thread_team.h): every GEMM in it
// runs our simd kernels, whose work the team splits (ATen's, MKL's or oneDNN's GEMM would run on
// one thread inside the team's region). A GEMM the loop does not have is null.
bool gemms_are_ours(std::initializer_list<const RepeatedGemm*> gemms) {
  return std::all_of(gemms.begin(), gemms.end(), [](const RepeatedGemm* gemm) {
    return gemm == nullptr || gemm->path() == CpuGemmPath::Simd;
  });
}

template <typename T>
const T* get_if(const std::optional<T>& value) {
  return value ? &*value : nullptr;
}

// The input projections x_t W_ih^T (+ b) of a layer's steps, for its time loop. Off the CPU, in
// the LSTM's training, all rows at once in the tensor the caller made (the kernel writes the
// saved values over them). For a loop that only reads them (inference, the GRU, and on the CPU
// the LSTM's training, whose kernel writes the saved values apart), on the CPU, a chunk of whole
// steps at a time in processing order (cpu_gemm.projection_chunk_rows: half of what the L2 caches
// hold), into one buffer the chunks reuse, by a GEMM whose weight is prepared once: each chunk's
// rows are still in the cache when its steps read them, where all T*B rows at once (MBs, tens of
// them at large batches) go to fresh pages, are written back to memory and read again. A
// projection that fits in one chunk is computed at once.
class StepPreactivations {
 public:
  StepPreactivations(const Schedule& s, Tensor all) : s_(s), rows_(std::move(all)) {}
  // x [N, K] times weight [G*H, K]ᵀ, plus bias [G*H] if defined, for a loop that only reads them
  // (G = gates: the simd GEMM splits each gate's columns between the threads as the fused step
  // splits the units).
  StepPreactivations(const Schedule& s, const Tensor& x, const Tensor& weight, const Tensor& bias,
                     int64_t gates)
      : s_(s), x_(x) {
    const int64_t rows = projection_chunk_rows(weight.size(0) * weight.element_size());
    chunk_steps_ = std::max<int64_t>(1, rows / std::max<int64_t>(1, s.batch));
    if (rows >= s.rows || chunk_steps_ >= s.steps() || !x.is_cpu()) {
      rows_ = gemm_nt(x, weight, bias.defined() ? OptTensor(bias) : std::nullopt);
      return;
    }
    const int64_t GH = weight.size(0);
    buffer_ = padded_rows(chunk_steps_ * s.batch, GH, x.options());
    gemm_.emplace(weight, chunk_steps_ * s.batch, (s.steps() + chunk_steps_ - 1) / chunk_steps_,
                  false, buffer_.stride(0), gates, bias);
  }
  // All rows (the caller's tensor, or one chunk that holds them all).
  const Tensor& all() const { return rows_; }
  // The GEMM that loads a chunk, or null (all rows at once).
  const RepeatedGemm* chunk_gemm() const { return get_if(gemm_); }
  // The row stride of every step's rows.
  int64_t stride() const { return gemm_ ? buffer_.stride(0) : rows_.stride(0); }
  // The tensor holding step `step`'s rows (steps in processing order), and the first row in it.
  std::pair<Tensor, int64_t> rows_of(int64_t step) {
    if (gemm_ && step >= chunk_end_) load(step);
    return {rows_, s_.offsets[s_.time(step)] - row_begin_};
  }

 private:
  // The chunk of steps [step, step + chunk_steps_): contiguous rows of x, the lowest of them at
  // the first step or (reverse) the last.
  void load(int64_t step) {
    chunk_end_ = std::min(s_.steps(), step + chunk_steps_);
    const int64_t t0 = std::min(s_.time(step), s_.time(chunk_end_ - 1));
    const int64_t t1 = std::max(s_.time(step), s_.time(chunk_end_ - 1));
    row_begin_ = s_.offsets[t0];
    const int64_t n = s_.offsets[t1] + s_.sizes[t1] - row_begin_;
    rows_ = buffer_.narrow(0, 0, n);
    gemm_->run_into(x_.narrow(0, row_begin_, n), rows_);
  }
  const Schedule& s_;
  Tensor x_;
  int64_t chunk_steps_ = 0, chunk_end_ = 0, row_begin_ = 0;
  std::optional<RepeatedGemm> gemm_;  // chunked inference
  Tensor buffer_, rows_;
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
    const OptTensor& weight_ch, const OptTensor& weight_hr, at::OptionalIntArrayRef batch_sizes,
    bool reverse, c10::string_view peephole, bool coupled, bool need_backward, double cell_clip,
    double proj_clip, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
    const OptTensor& weight_ln, double layer_norm_eps,
    const PointwiseKernels& kernels) {
  const Schedule s = make_schedule(input, batch_sizes, reverse);
  const LayerShape shape = check_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                                       weight_ch, weight_hr, s, peephole, coupled);
  check_clips(cell_clip, proj_clip, weight_hr);
  check_zoneout(zoneout_h, zoneout_c, input, shape);
  check_layer_norm(weight_ln, layer_norm_eps, shape, {input, "input"});
  const bool layer_norm = weight_ln.has_value();
  const c10::OptionalDeviceGuard guard(input.device());
  const int64_t B = s.batch, H = shape.hidden, R = shape.proj, N = s.rows;
  const bool projected = weight_hr.has_value();
  const bool full = shape.peephole == Peephole::Full;
  const auto options = input.options();

  const Tensor x = input.reshape({N, shape.input});
  const Tensor bias = input_bias(bias_ih, bias_hh);
  // Layer norm: the biases come after the norm (the kernel adds them), so the pre-activations
  // are x W_ih^T alone. In training the kernel writes what the backward needs (the activated
  // gates; with layer norm also x̂ and the statistics, saved_width) to `saved`. On the CPU, as in
  // inference and the GRU, the projection comes a chunk of steps at a time into a buffer the
  // chunks reuse, and `saved` is a tensor of its own, written past the caches (stream_saved):
  // the B = 16 training forward took 0.94x the time it took with the projection of all rows
  // written to memory, read back and overwritten, forward+backward 0.98x at B = 16, 0.97x at
  // B = 64, 0.95x at B = 16 capped at AVX2 (AMD EPYC Zen 4, T = 100, I = H = 256, in-process
  // A/B; docs/batch-sweep.md). Elsewhere the projection of all rows at once, in rows as wide as
  // `saved`, which the kernel overwrites: one tensor, not two.
  const bool saved_apart = need_backward && input.device().is_cpu();
  StepPreactivations preactivations =
      !need_backward || saved_apart
          ? StepPreactivations(s, x, weight_ih, layer_norm ? Tensor() : bias, shape.gates)
      : layer_norm ? StepPreactivations(s, layer_norm_preactivations(x, weight_ih, coupled, H))
                   : StepPreactivations(s, gemm_nt(x, weight_ih, bias.defined() ? OptTensor(bias)
                                                                             : std::nullopt));
  const Tensor saved =
      saved_apart     ? at::empty({N, saved_width(shape, coupled, layer_norm)}, options)
      : need_backward ? preactivations.all()
                      : Tensor();
  // Inference: the activated gates are not stored and the cell state goes only to the running
  // state.
  const bool zone_h = zoneout_h.has_value(), zone_c = zoneout_c.has_value();
  const Tensor keep_h = keep_rows(zoneout_h, N, R), keep_c = keep_rows(zoneout_c, N, H);
  Tensor cells =
      need_backward ? at::empty({N, saved_cells_width(H, zoneout_c)}, options) : Tensor();
  // Zoneout of c: the computed c~_t (cells' first H columns) is not the state; in inference it
  // goes to a step buffer of its own.
  const Tensor zoned_cells = need_backward && zone_c ? cells.narrow(1, H, H) : Tensor();
  const Tensor computed_c = !need_backward && zone_c ? at::empty({B, H}, options) : Tensor();
  // Zoneout of h reads h_{t-1} in the kernel: rows with a unit column stride.
  const Tensor h_initial = zone_h ? rows_contiguous(h0) : h0;
  Tensor output = at::empty({N, R}, options);
  RunningState state(h0, c0, full, s.ragged);
  Tensor unprojected = projected ? at::empty({B, H}, options) : Tensor();
  const Tensor w_ch = weight_ch ? weight_ch->contiguous() : Tensor();
  const int64_t GH = shape.gates * H, peep_columns = full ? input_peephole_columns(coupled, H) : 0;
  // Every per-step GEMM writes rows of the pre-activations, full peepholes column blocks of them.
  // One column group per gate: the simd path's fused step computes a block of units of each.
  const int64_t T = s.steps();  // the uses of every per-step GEMM
  const RepeatedGemm recurrent(weight_hh.narrow(0, peep_columns, GH - peep_columns), B, T, true,
                               preactivations.stride(), full ? 1 : shape.gates);
  const std::optional<RepeatedGemm> input_peephole =
      full ? std::optional<RepeatedGemm>(std::in_place,
                                         input_peephole_weight(weight_hh, w_ch, coupled), B, T,
                                         true, preactivations.stride())
           : std::nullopt;
  const std::optional<RepeatedGemm> output_peephole =
      full ? std::optional<RepeatedGemm>(std::in_place,
                                         w_ch.narrow(0, peephole_input_blocks(coupled) * H, H), B,
                                         T, true, preactivations.stride())
           : std::nullopt;
  const std::optional<RepeatedGemm> projection =
      projected ? std::optional<RepeatedGemm>(std::in_place, *weight_hr, B, T, false)
                : std::nullopt;
  const int64_t o_column = output_gate(coupled) * H;

  ForwardStep p{};
  p.weight_ch = shape.peephole == Peephole::Diagonal ? w_ch.data_ptr() : nullptr;
  p.hidden = H, p.coupled = coupled, p.peephole = shape.peephole, p.dtype = input.scalar_type();
  p.cell_clip = cell_clip;
  const Tensor w_ln = layer_norm ? weight_ln->contiguous() : Tensor();
  const Tensor bias_ln = layer_norm && bias.defined() ? bias.contiguous() : Tensor();
  set_layer_norm(p, w_ln, bias_ln, layer_norm_eps);
  p.gates_stride = saved.defined() ? saved.stride(0) : 0;
  p.stream_saved = saved_apart;
  p.c_prev = state.c.data_ptr();
  p.c_prev_stride = state.c.stride(0);
  // The running state is c_out itself in inference (c_prev may alias it: loads come first).
  p.c_state = need_backward || zone_c ? state.c.data_ptr() : nullptr;
  p.c_state_stride = state.c.stride(0);
  p.c_out_stride = need_backward ? cells.stride(0) : zone_c ? H : state.c.stride(0);
  p.keep_c_stride = zone_c ? keep_c.stride(0) : 0;
  p.c_zoned_stride = zoned_cells.defined() ? zoned_cells.stride(0) : 0;
  // The kernel zones an unprojected h; a projected one is zoned below, after W_hr and proj_clip.
  p.keep_h_stride = zone_h ? keep_h.stride(0) : 0;
  p.h_out_stride = projected ? H : R;
  p.h_state = state.h.defined() && !projected ? state.h.data_ptr() : nullptr;
  p.h_state_stride = state.h.defined() ? state.h.stride(0) : 0;
  // The simd path (float32, few rows) runs the GEMM and the pointwise step as one kernel, on raw
  // pointers: no tensor views per step.
  // Only the CPU kernel table has that kernel (the host shim must run the CUDA kernels).
  const bool one_kernel = kernels.cpu_simd_step && !full && !layer_norm &&
                          recurrent.path() == CpuGemmPath::Simd;
  const Tensor h_first = one_kernel ? h0.contiguous() : h0;
  // Every thread's GEMM reads all of h_{t-1} while other threads already write their units' h_t:
  // the kernel must not write the running h it reads (packed input), which is updated after it.
  if (one_kernel) p.h_state = nullptr;
  // A projection's clip and zoneout are ATen operations: not in a team.
  const bool team = !projected && gemms_are_ours({&recurrent, get_if(input_peephole),
                                                  get_if(output_peephole),
                                                  preactivations.chunk_gemm()});
  run_with_thread_team(team, [&] {
    for (int64_t step = 0; step < s.steps(); ++step) {
      const int64_t t = s.time(step), n = s.sizes[t], row = s.offsets[t];
      const auto [z_rows, z_row] = preactivations.rows_of(step);
      p.gates_out = saved.defined() ? row_ptr(saved, row) : nullptr;
      p.c_out = need_backward ? row_ptr(cells, row)
                : zone_c      ? computed_c.data_ptr()
                              : state.c.data_ptr();
      p.h_out = projected ? unprojected.data_ptr() : row_ptr(output, row);
      p.rows = n;
      p.keep_c = zone_c ? row_ptr(keep_c, row) : nullptr;
      p.c_zoned = zoned_cells.defined() ? row_ptr(zoned_cells, row) : nullptr;
      // h_{t-1} of rows :n (what the recurrent GEMM reads): the running state (packed input, full
      // peepholes), else h0 or the previous step's output rows. The one-kernel path without
      // zoneout of h reads raw pointers instead, so it makes no view.
      const Tensor previous_h = one_kernel && !zone_h ? Tensor()
                                : full || s.ragged     ? state.h.narrow(0, 0, n)
                                : step == 0            ? h_initial
                                             : output.narrow(0, s.offsets[s.time(step - 1)], n);
      if (zone_h && !projected) {
        p.keep_h = row_ptr(keep_h, row);
        p.h_prev = previous_h.data_ptr(), p.h_prev_stride = previous_h.stride(0);
      }
      if (one_kernel) {
        const float* h_prev = s.ragged    ? state.h.const_data_ptr<float>()
                              : step == 0 ? h_first.const_data_ptr<float>()
                                          : static_cast<const float*>(
                                                row_ptr(output, s.offsets[s.time(step - 1)]));
        p.z = row_ptr(z_rows, z_row), p.z_stride = z_rows.stride(0);
        recurrent.run_recurrent_step(h_prev, s.ragged ? state.h.stride(0) : R, p);
        if (s.ragged && !projected) {  // both [n, R] with contiguous rows
          std::memcpy(state.h.data_ptr(), row_ptr(output, row), n * R * sizeof(float));
        }
      } else {
        const Tensor& recurrent_input = previous_h;
        // z_t = x_t W_ih^T + b (computed for all steps above) + h_{t-1} W_hh^T: in place in the
        // gates rows (ATen, MKL packed) or a step-sized temporary (oneDNN); in training the kernel
        // writes the activated gates there. Full peepholes: two GEMMs into the rows' column blocks.
        Tensor z = z_rows.narrow(0, z_row, n).narrow(1, 0, GH);
        if (full) {
          recurrent.run_into(recurrent_input, z.narrow(1, peep_columns, GH - peep_columns));
          input_peephole->run_into(state.hc.narrow(0, 0, n), z.narrow(1, 0, peep_columns));
        } else {
          z = recurrent.run(recurrent_input, z);
        }
        p.z = z.data_ptr(), p.z_stride = z.stride(0);
        if (full) {
          p.part = Part::Update;
          run_forward(kernels, p);
          // The output gate sees the computed c~_t (with zoneout of c not the state).
          const Tensor c_t = need_backward ? cells.narrow(0, row, n).narrow(1, 0, H)
                             : zone_c      ? computed_c.narrow(0, 0, n)
                                           : state.c.narrow(0, 0, n);
          output_peephole->run_into(c_t, z.narrow(1, o_column, H));
          p.part = Part::Output;
        }
        run_forward(kernels, p);
      }
      if (projected) {
        const Tensor h = output.narrow(0, row, n);
        projection->run_into(unprojected.narrow(0, 0, n), h);
        if (proj_clip > 0) h.clamp_(-proj_clip, proj_clip);
        // Zoneout of the projected h: m h_{t-1} + (1 - m) h~_t; lerp gives either value exactly
        // for m = 0 or 1.
        if (zone_h) h.lerp_(previous_h, keep_h.narrow(0, row, n));
        if (state.h.defined()) state.h.narrow(0, 0, n).copy_(h);
      }
    }
  });

  Tensor h_n = state.h.defined()  ? state.final_h()
               : s.steps() == 0 ? h0.clone(at::MemoryFormat::Contiguous)
                                 : output.narrow(0, s.offsets[s.time(s.steps() - 1)], B).clone();
  if (!need_backward) return {output.view(per_row_sizes(input, R)), h_n, state.final_c(),
                             at::empty({0}, options), at::empty({0}, options)};
  return {output.view(per_row_sizes(input, R)), h_n, state.final_c(),
          saved.view(per_row_sizes(input, saved.size(1))),
          cells.view(per_row_sizes(input, cells.size(1)))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
    const OptTensor& weight_ch, const OptTensor& weight_hr, const Tensor& output,
    const Tensor& gates, const Tensor& cells, at::OptionalIntArrayRef batch_sizes, bool reverse,
    c10::string_view peephole, bool coupled, bool need_input_grad, double cell_clip,
    double proj_clip, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
    const OptTensor& weight_ln, const PointwiseKernels& kernels) {
  const Schedule s = make_schedule(input, batch_sizes, reverse);
  const LayerShape shape = check_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                                       weight_ch, weight_hr, s, peephole, coupled);
  check_clips(cell_clip, proj_clip, weight_hr);
  check_zoneout(zoneout_h, zoneout_c, input, shape);
  const bool layer_norm = weight_ln.has_value();
  check_layer_norm(weight_ln, 1.0, shape, {input, "input"});
  check_layer_backward(grad_output, grad_h_n, grad_c_n, input, output, gates, cells, shape, s,
                       saved_width(shape, coupled, layer_norm),
                       saved_cells_width(shape.hidden, zoneout_c));
  const c10::OptionalDeviceGuard guard(input.device());
  const int64_t B = s.batch, H = shape.hidden, R = shape.proj, N = s.rows;
  const int64_t GH = shape.gates * H, peep_columns = input_peephole_columns(coupled, H);
  const bool projected = weight_hr.has_value();
  const bool full = shape.peephole == Peephole::Full;
  const auto options = input.options();

  const Tensor x = input.reshape({N, shape.input});
  const Tensor out = output.reshape({N, R});
  const Tensor saved_gates = gates.reshape({N, gates.size(-1)}).contiguous();
  const bool zone_h = zoneout_h.has_value(), zone_c = zoneout_c.has_value();
  const Tensor keep_h = keep_rows(zoneout_h, N, R), keep_c = keep_rows(zoneout_c, N, H);
  const Tensor c_all = cells.reshape({N, cells.size(-1)}).contiguous();
  // The computed c~_t of every step and the states each step started from (with zoneout of c
  // different tensors, saved_cells_width).
  const Tensor c_computed = zone_c ? c_all.narrow(1, 0, H) : c_all;
  const Tensor c_states = zone_c ? c_all.narrow(1, H, H) : c_all;
  const Tensor c_init = c0.contiguous();
  const int64_t element = input.element_size();  // bytes, for the per-step sums' raw operands
  const Tensor grad_out = grad_output ? grad_output->reshape({N, R}).contiguous() : Tensor();

  Tensor grad_z = padded_rows(N, GH, options);
  // Layer norm: dẑ, the gradient of the normalised pre-activations, for dγ and the bias.
  Tensor grad_zhat = layer_norm ? at::empty({N, GH}, options) : Tensor();
  // dγ on the CPU, summed step by step in the op-math type (layer_norm_weight_grad elsewhere).
  Tensor weight_ln_sums =
      layer_norm && input.device().is_cpu()
          ? at::zeros({GH}, options.dtype(at::toOpMathType(input.scalar_type())))
          : Tensor();
  const Tensor w_ln = layer_norm ? weight_ln->contiguous() : Tensor();
  // Diagonal peepholes on the CPU: dw_c summed step by step in the op-math type, while the step's
  // dz and c rows are in the cache (peephole_grad, one pass over all rows, elsewhere).
  const auto sum_options = options.dtype(at::toOpMathType(input.scalar_type()));
  Tensor peephole_sums = shape.peephole == Peephole::Diagonal && input.device().is_cpu()
                             ? at::zeros({num_peepholes(coupled) * H}, sum_options)
                             : Tensor();
  // The CPU's kernel of a whole step (no full peepholes, no layer norm) sums the bias gradient
  // and dw_c itself (BackwardStep::bias_sums); otherwise dz's column sums after the loop and
  // column_product_sums_into per step.
  const bool sums_in_kernel = kernels.column_sums && !layer_norm && !full;
  Tensor bias_sums = sums_in_kernel ? at::zeros({GH}, sum_options) : Tensor();
  // The gradients flowing back through the running states, dh_{t} and dc_{t}.
  const RunningState grad_state(grad_h_n ? *grad_h_n : at::zeros({B, R}, options),
                                grad_c_n ? *grad_c_n : at::zeros({B, H}, options), full, true);
  // With a projection: the total gradient of every h_t (for dW_hr) and of the unprojected r_t.
  Tensor grad_h_all = projected ? at::empty({N, R}, options) : Tensor();
  Tensor grad_unprojected = projected ? at::empty({B, H}, options) : Tensor();
  const Tensor w_ch = weight_ch ? weight_ch->contiguous() : Tensor();
  // dh_{t-1} = dz_t W_hh, accumulated into the running state for full peepholes, which also add
  // dz_(i,f) W_c(i,f) and dz_o W_co to dc_{t-1}; dr = dh W_hr.
  // Full peepholes write dh and dc into the running state [B, R + H] (rows R + H apart).
  const int64_t state_stride = full ? R + H : 0;
  // Zoneout of h: the kernel (or, projected, the loop) leaves m dh_t in the running dh_{t-1},
  // so the GEMM adds to it.
  const int64_t T = s.steps();  // the uses of every per-step GEMM
  const RepeatedGemm recurrent(weight_hh.t(), B, T, full || zone_h, state_stride);
  const std::optional<RepeatedGemm> input_peephole =
      full ? std::optional<RepeatedGemm>(std::in_place, w_ch.narrow(0, 0, peep_columns).t(), B,
                                         T, true, state_stride)
           : std::nullopt;
  const std::optional<RepeatedGemm> output_peephole =
      full ? std::optional<RepeatedGemm>(
                 std::in_place, w_ch.narrow(0, peephole_input_blocks(coupled) * H, H).t(), B,
                 T, true, state_stride)
           : std::nullopt;
  const std::optional<RepeatedGemm> projection =
      projected ? std::optional<RepeatedGemm>(std::in_place, weight_hr->t(), B, T, false)
                : std::nullopt;
  const int64_t o_column = output_gate(coupled) * H;

  BackwardStep p{};
  p.weight_ch = shape.peephole == Peephole::Diagonal ? w_ch.data_ptr() : nullptr;
  p.hidden = H, p.coupled = coupled, p.peephole = shape.peephole, p.dtype = input.scalar_type();
  p.cell_clip = cell_clip;
  p.dc_in = p.dc_prev_out = grad_state.c.data_ptr();
  p.dc_in_stride = p.dc_prev_stride = grad_state.c.stride(0);
  p.gates_stride = saved_gates.stride(0);
  p.grad_z_stride = grad_z.stride(0);
  p.layer_norm = layer_norm;
  p.weight_ln = layer_norm ? w_ln.data_ptr() : nullptr;
  p.grad_zhat_stride = GH;
  p.c_stride = c_all.stride(0);
  p.c_prev_tail = c_init.data_ptr(), p.c_prev_tail_stride = H;
  p.bias_sums = bias_sums.defined() ? bias_sums.data_ptr() : nullptr;
  p.peephole_sums = sums_in_kernel && peephole_sums.defined() ? peephole_sums.data_ptr() : nullptr;
  // Full peepholes add dh_{t-1} and part of dc_{t-1} with one accumulating GEMM, so the kernel
  // replaces dh after reading it by what passes straight to dh_{t-1} (zoneout's m dh, else 0).
  p.consume_grad_h2 = full || zone_h;
  p.keep_c_stride = zone_c ? keep_c.stride(0) : 0;
  p.keep_h_stride = zone_h && !projected ? keep_h.stride(0) : 0;
  // Zoneout of c: m dc_t from the Output part to the Update part (full peepholes) or from the
  // first to the last loop of layer norm's rows.
  const Tensor dc_keep = (full || layer_norm) && zone_c ? at::empty({B, H}, options) : Tensor();
  p.dc_keep = dc_keep.defined() ? dc_keep.data_ptr() : nullptr, p.dc_keep_stride = H;
  // proj_clip's gradient mask needs the clipped projection h~_t, which zoneout of h replaced in
  // the output by the zoned h_t: recomputed, one GEMM over all rows.
  const Tensor proj_clip_source =
      projected && proj_clip > 0 && zone_h
          ? (saved_gates.narrow(1, output_gate(coupled) * H, H) * c_computed.tanh())
                .mm(weight_hr->t())
          : out;
  // dh_t arriving through the recurrence. Padded input takes each step's GEMM result as it is;
  // packed input and full peepholes accumulate in the running state (packed: its rows of
  // sequences that end at an earlier step still hold their grad_h_n).
  Tensor dh_carry = grad_state.h;
  const bool carry_in_state = full || s.ragged || zone_h;
  const bool team = !projected && gemms_are_ours({&recurrent, get_if(input_peephole),
                                                  get_if(output_peephole)});
  run_with_thread_team(team, [&] {
    for (int64_t step = s.steps() - 1; step >= 0; --step) {
      const int64_t t = s.time(step), n = s.sizes[t], row = s.offsets[t];
      Tensor dh_running = dh_carry.narrow(0, 0, n);
      if (projected) {
        Tensor dh = grad_h_all.narrow(0, row, n);
        if (grad_out.defined()) {
          at::add_out(dh, dh_running, grad_out.narrow(0, row, n));
        } else {
          dh.copy_(dh_running);
        }
        if (zone_h) {  // m dh stays in the running dh_{t-1}, (1 - m) dh reaches h~_t
          at::mul_out(dh_running, dh, keep_h.narrow(0, row, n));
          dh.sub_(dh_running);
        }
        // proj_clip: the gradient of the unclipped projection (for dW_hr and dr as well).
        if (proj_clip > 0) dh.masked_fill_(proj_clip_source.narrow(0, row, n).abs() >= proj_clip, 0);
        if (full && !zone_h) dh_running.zero_();
        projection->run_into(dh, grad_unprojected.narrow(0, 0, n));
        p.grad_h = grad_unprojected.data_ptr(), p.grad_h_stride = H;
        p.grad_h2 = nullptr;
      } else {
        p.grad_h = grad_out.defined() ? row_ptr(grad_out, row) : nullptr;
        p.grad_h_stride = R;
        p.grad_h2 = dh_running.data_ptr(), p.grad_h2_stride = dh_running.stride(0);
        p.keep_h = zone_h ? row_ptr(keep_h, row) : nullptr;
      }
      p.keep_c = zone_c ? row_ptr(keep_c, row) : nullptr;
      if (step == 0) {
        p.c_prev = c_init.data_ptr(), p.c_prev_stride = H, p.c_prev_rows = n;
      } else {
        const int64_t prev = previous_time(s, t);
        p.c_prev = row_ptr(c_states, s.offsets[prev]), p.c_prev_stride = c_states.stride(0);
        p.c_prev_rows = s.sizes[prev];
      }
      p.gates = row_ptr(saved_gates, row);
      p.c = row_ptr(c_computed, row);
      p.grad_z = row_ptr(grad_z, row);
      p.grad_zhat = layer_norm ? row_ptr(grad_zhat, row) : nullptr;
      p.rows = n;
      Tensor dz = grad_z.narrow(0, row, n);
      if (full) {
        p.part = Part::Output;
        run_backward(kernels, p);
        output_peephole->run_into(dz.narrow(1, o_column, H), grad_state.c.narrow(0, 0, n));
        p.part = Part::Update;
      }
      run_backward(kernels, p);
      if (weight_ln_sums.defined()) {  // dγ += this step's sum over rows of dẑ ⊙ x̂
        column_product_sums_into({{row_ptr(grad_zhat, row), GH,
                                   static_cast<char*>(row_ptr(saved_gates, row)) + GH * element,
                                   saved_gates.stride(0), GH}},
                                 n, input.scalar_type(), weight_ln_sums.data_ptr(), true);
      }
      if (peephole_sums.defined() && !p.peephole_sums) {
        // dw_c += this step's sums over rows of dz_(i,f) ⊙ c_{t-1} and dz_o ⊙ c_t, c_{t-1} from the
        // previous step's states for the rows carried from it, else from c_0.
        const int64_t carried = carried_rows(s, t);
        auto add_sums = [&](int64_t first, int64_t rows, const void* c_prev, int64_t c_prev_stride) {
          if (rows == 0) return;
          const char* dz_rows = static_cast<const char*>(row_ptr(grad_z, row + first));
          std::vector<ProductColumns> pairs;
          for (int b = 0; b < peephole_input_blocks(coupled); ++b) {
            pairs.push_back({dz_rows + b * H * element, grad_z.stride(0), c_prev, c_prev_stride, H});
          }
          pairs.push_back({dz_rows + o_column * element, grad_z.stride(0),
                           row_ptr(c_computed, row + first), c_computed.stride(0), H});
          column_product_sums_into(pairs, rows, input.scalar_type(), peephole_sums.data_ptr(),
                                   true);
        };
        if (carried > 0) {
          add_sums(0, carried, row_ptr(c_states, s.offsets[previous_time(s, t)]),
                   c_states.stride(0));
        }
        add_sums(carried, n - carried, row_ptr(c_init, carried), c_init.stride(0));
      }
      if (full) {
        recurrent.run_into(dz, grad_state.h.narrow(0, 0, n));
        input_peephole->run_into(dz.narrow(1, 0, peep_columns), grad_state.c.narrow(0, 0, n));
      } else if (carry_in_state) {
        recurrent.run_into(dz, dh_running);
      } else {
        // In place into the running state, or (oneDNN) a new tensor the next step reads.
        dh_carry = recurrent.run(dz, grad_state.h);
      }
    }
  });

  Tensor grad_input = need_input_grad ? gemm_nt(grad_z, weight_ih.t()).view(input.sizes())
                                      : at::empty({0}, options);
  Tensor grad_weight_ih = gemm_tn(grad_z, x);
  Tensor grad_weight_hh = gemm_tn(grad_z, previous_states(out, h0, s));
  // With layer norm the bias is the norm's shift: its gradient is dẑ's, γ's is dẑ x̂'s.
  Tensor grad_bias = bias_sums.defined() ? bias_sums.to(input.scalar_type())
                    : layer_norm          ? grad_zhat.sum(0)
                                          : grad_z.sum(0);
  Tensor grad_weight_ln =
      weight_ln_sums.defined()
          ? weight_ln_sums.view({shape.gates, H}).to(input.scalar_type())
      : layer_norm ? layer_norm_weight_grad(grad_zhat, saved_gates.narrow(1, GH, GH), shape.gates)
                   : at::empty({0}, options);
  Tensor grad_weight_ch =
      shape.peephole == Peephole::None ? at::empty({0}, options)
      : peephole_sums.defined()
          ? peephole_sums.view({num_peepholes(coupled), H}).to(input.scalar_type())
          : peephole_grad(shape.peephole, grad_z, previous_states(c_states, c_init, s).contiguous(),
                          c_computed.contiguous(), coupled);
  Tensor grad_weight_hr = at::empty({0}, options);
  if (projected) {
    const Tensor unprojected = saved_gates.narrow(1, o_column, H) * c_computed.tanh();
    grad_weight_hr = gemm_tn(grad_h_all, unprojected);
  }
  const Tensor grad_h0 = carry_in_state ? grad_state.final_h() : dh_carry;
  return {grad_input, grad_h0, grad_state.final_c(), grad_weight_ih, grad_weight_hh,
          grad_bias, grad_weight_ch, grad_weight_hr, grad_weight_ln};
}

// --- GRU -------------------------------------------------------------------------------------
// The GRU's time loop (issue 24), with the LSTM's schedule, GEMM choice and state helpers above:
//   forward,  once:      a = x W_ih^T + b_ih                       (one GEMM over all steps)
//             per step:  b_t = h_{t-1} W_hh^T                      (one GEMM into a step buffer:
//                                                                   the reset gate multiplies
//                                                                   b_n, so it cannot add onto a)
//                        pointwise forward (adds b_hh)             (one kernel; saves r, z, n
//                                                                   and b_n for backward)
//   backward, per step:  pointwise backward -> da_t, db_t, dh z    (one kernel)
//                        dh_{t-1} = dh z + db_t W_hh               (one accumulating GEMM)
// Zoneout of h (keep values m): h_t = m h_{t-1} + (1 - m) h~_t in the kernel, and its gradient
// split there (m dh to h_{t-1}, (1 - m) dh to the update).
//             once:      dW_ih, dW_hh, dx, the bias gradients over all T*B rows.

namespace {

constexpr int64_t kGruGates = GruLayout::kGates;
constexpr int64_t kGruSaved = kGruGates + 1;  // r, z, n, b_n

// The GRU's tensors against input: returns H.
int64_t check_gru_layer(const Tensor& input, const Tensor& h0, const Tensor& weight_ih,
                        const Tensor& weight_hh, const OptTensor& bias_ih,
                        const OptTensor& bias_hh, const Schedule& schedule) {
  const Named like{input, "input"};
  check_floating(like);
  TORCH_CHECK_VALUE(weight_ih.dim() == 2 && weight_ih.size(0) % kGruGates == 0,
                    "lstm_fused: expected weight_ih of shape [3*H, I] (GRU gates r, z, n), got ",
                    weight_ih.sizes());
  const int64_t H = weight_ih.size(0) / kGruGates;
  check_arg({weight_ih, "weight_ih"}, like, {kGruGates * H, input.size(-1)},
            "[3*H, I], with I from input");
  check_arg({weight_hh, "weight_hh"}, like, {kGruGates * H, H},
            "[3*H, H], with H = weight_ih rows / 3");
  check_arg({h0, "h0"}, like, {schedule.batch, H},
            "[B, H], with B from input (packed: batch_sizes[0]) and H = weight_ih rows / 3");
  const char* bias = "[3*H], with 3*H from weight_ih";
  if (bias_ih) check_arg({*bias_ih, "bias_ih"}, like, {kGruGates * H}, bias);
  if (bias_hh) check_arg({*bias_hh, "bias_hh"}, like, {kGruGates * H}, bias);
  return H;
}

// Zoneout of the GRU's h (lstm_math.h zoneout): keep values [..., H], one row per row of input.
void check_gru_zoneout(const OptTensor& keep_h, const Tensor& input, int64_t hidden) {
  if (!keep_h) return;
  check_arg({*keep_h, "zoneout_h"}, {input, "input"}, per_row_sizes(input, hidden),
            "[..., H]: one keep value per h unit of every row of input, H = weight_ih rows / 3");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh,
    const OptTensor& bias_ih, const OptTensor& bias_hh, at::OptionalIntArrayRef batch_sizes,
    bool reverse, bool need_backward, const OptTensor& zoneout_h,
    const PointwiseKernels& kernels) {
  const Schedule s = make_schedule(input, batch_sizes, reverse);
  const int64_t H = check_gru_layer(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, s);
  check_gru_zoneout(zoneout_h, input, H);
  const c10::OptionalDeviceGuard guard(input.device());
  const int64_t B = s.batch, N = s.rows;
  const auto options = input.options();
  const Tensor x = input.reshape({N, input.size(-1)});
  // a of every step, a chunk of steps at a time at large sizes, the same in training and
  // inference (so both give the same numbers: a is not saved); in training the kernel writes the
  // saved rows [r, z, n, b_n] to `gates`.
  const Tensor b_ih = bias_ih ? *bias_ih : Tensor();
  StepPreactivations input_gates(s, x, weight_ih, b_ih, kGruGates);
  const Tensor gates =
      need_backward ? at::empty({N, kGruSaved * H}, options) : at::empty({0}, options);
  Tensor output = at::empty({N, H}, options);
  // Packed input keeps a running h (the rows of sequences that ended keep theirs); padded input
  // reads h_{t-1} from the previous step's output rows.
  const Tensor h_initial = rows_contiguous(h0);
  Tensor h_state = s.ragged ? h0.clone(at::MemoryFormat::Contiguous) : Tensor();
  const RepeatedGemm recurrent(weight_hh, B, s.steps(), false);
  const Tensor step_buffer = at::empty({B, kGruGates * H}, options);
  const Tensor b_hh = bias_hh ? bias_hh->contiguous() : Tensor();

  const Tensor keep_h = keep_rows(zoneout_h, N, H);
  GruForwardStep p{};
  p.keep_h_stride = keep_h.defined() ? keep_h.stride(0) : 0;
  p.input_gates_stride = input_gates.stride();
  p.bias_hh = b_hh.defined() ? b_hh.data_ptr() : nullptr;
  p.gates_stride = gates.stride(0);
  p.stream_saved = need_backward && input.device().is_cpu();
  p.h_out_stride = H;
  p.h_state = h_state.defined() ? h_state.data_ptr() : nullptr;
  p.h_state_stride = H;
  p.hidden = H, p.dtype = input.scalar_type();
  run_with_thread_team(gemms_are_ours({&recurrent, input_gates.chunk_gemm()}), [&] {
    for (int64_t step = 0; step < s.steps(); ++step) {
      const int64_t t = s.time(step), n = s.sizes[t], row = s.offsets[t];
      const Tensor h_prev = s.ragged    ? h_state.narrow(0, 0, n)
                            : step == 0 ? h_initial
                                        : output.narrow(0, s.offsets[s.time(step - 1)], n);
      // In place into the step buffer, or (oneDNN) a new tensor.
      const Tensor b = recurrent.run(h_prev, step_buffer.narrow(0, 0, n));
      const auto [a_rows, a_row] = input_gates.rows_of(step);
      p.input_gates = row_ptr(a_rows, a_row);
      p.hidden_gates = b.data_ptr(), p.hidden_gates_stride = b.stride(0);
      p.h_prev = h_prev.data_ptr(), p.h_prev_stride = h_prev.stride(0);
      p.gates_out = need_backward ? row_ptr(gates, row) : nullptr;
      p.h_out = row_ptr(output, row);
      p.keep_h = keep_h.defined() ? row_ptr(keep_h, row) : nullptr;
      p.rows = n;
      run_gru_forward(kernels, p);
    }
  });
  Tensor h_n = h_state.defined()  ? h_state
               : s.steps() == 0 ? h0.clone(at::MemoryFormat::Contiguous)
                                 : output.narrow(0, s.offsets[s.time(s.steps() - 1)], B).clone();
  return {output.view(per_row_sizes(input, H)), h_n,
          need_backward ? gates.view(per_row_sizes(input, kGruSaved * H)) : gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& input,
    const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
    const OptTensor& bias_hh, const Tensor& output, const Tensor& gates,
    at::OptionalIntArrayRef batch_sizes, bool reverse, bool need_input_grad,
    const OptTensor& zoneout_h, const PointwiseKernels& kernels) {
  const Schedule s = make_schedule(input, batch_sizes, reverse);
  const int64_t H = check_gru_layer(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, s);
  check_gru_zoneout(zoneout_h, input, H);
  const Named like{input, "input"};
  const char* per_step_h = "[..., H], with the leading dimensions of input and H = weight_ih rows / 3";
  check_arg({output, "output"}, like, per_row_sizes(input, H), per_step_h);
  check_arg({gates, "gates"}, like, per_row_sizes(input, kGruSaved * H),
            "[..., 4*H] (r, z, n and W_hn h + b_hn of every step), with the leading dimensions "
            "of input and H = weight_ih rows / 3");
  if (grad_output) check_arg({*grad_output, "grad_output"}, like, per_row_sizes(input, H), per_step_h);
  if (grad_h_n) {
    check_arg({*grad_h_n, "grad_h_n"}, like, {s.batch, H},
              "[B, H], with B from input (packed: batch_sizes[0]) and H = weight_ih rows / 3");
  }
  const c10::OptionalDeviceGuard guard(input.device());
  const int64_t B = s.batch, N = s.rows, G = kGruGates * H;
  const auto options = input.options();
  const Tensor x = input.reshape({N, input.size(-1)});
  const Tensor saved = gates.reshape({N, kGruSaved * H}).contiguous();
  // h_{t-1} of every row (the kernel's dz and the GEMM for dW_hh).
  const Tensor h_prev_all = previous_states(output.reshape({N, H}), h0, s).contiguous();
  const Tensor grad_out = grad_output ? grad_output->reshape({N, H}).contiguous() : Tensor();
  Tensor grad_a = at::empty({N, G}, options), grad_b = at::empty({N, G}, options);
  // dh_t arriving through the recurrence, rows like the batch: for packed input the rows of
  // sequences that end at an earlier step still hold their grad_h_n.
  Tensor dh_carry = grad_h_n ? grad_h_n->clone(at::MemoryFormat::Contiguous)
                             : at::zeros({B, H}, options);
  const RepeatedGemm recurrent(weight_hh.t(), B, s.steps(), true);

  const Tensor keep_h = keep_rows(zoneout_h, N, H);
  GruBackwardStep p{};
  p.keep_h_stride = keep_h.defined() ? keep_h.stride(0) : 0;
  p.grad_h_stride = H, p.grad_h2_stride = H;
  p.gates_stride = saved.stride(0);
  p.h_prev_stride = H;
  p.grad_input_gates_stride = G, p.grad_hidden_gates_stride = G;
  p.hidden = H, p.dtype = input.scalar_type();
  run_with_thread_team(gemms_are_ours({&recurrent}), [&] {
    for (int64_t step = s.steps() - 1; step >= 0; --step) {
      const int64_t t = s.time(step), n = s.sizes[t], row = s.offsets[t];
      const Tensor dh_running = dh_carry.narrow(0, 0, n);
      p.grad_h = grad_out.defined() ? row_ptr(grad_out, row) : nullptr;
      p.grad_h2 = dh_running.data_ptr();
      p.gates = row_ptr(saved, row);
      p.h_prev = row_ptr(h_prev_all, row);
      p.grad_input_gates = row_ptr(grad_a, row);
      p.grad_hidden_gates = row_ptr(grad_b, row);
      p.keep_h = keep_h.defined() ? row_ptr(keep_h, row) : nullptr;
      p.rows = n;
      run_gru_backward(kernels, p);  // leaves dh z in dh_running
      recurrent.run_into(grad_b.narrow(0, row, n), dh_running);
    }
  });
  Tensor grad_input = need_input_grad ? gemm_nt(grad_a, weight_ih.t()).view(input.sizes())
                                      : at::empty({0}, options);
  return {grad_input,         dh_carry,          gemm_tn(grad_a, x), gemm_tn(grad_b, h_prev_all),
          grad_a.sum(0),      grad_b.sum(0)};
}

}  // namespace lstm_fused
