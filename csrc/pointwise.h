// The fused pointwise step of an LSTM (and a GRU) layer, as plain parameter structs and one chunk function
// per direction, shared by the CPU kernels (SIMD chunks), the CUDA kernels (one element per
// thread) and the host shim that runs the CUDA kernels on the CPU in tests.
//
// A "step" is one time step for `rows` batch rows of `hidden` units. Pointers are raw, strides
// are row strides in elements (the hidden dimension is always contiguous). The kernels never
// allocate and never synchronise: the driver (layer.cpp / cell.cpp) owns all memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "lstm_math.h"

namespace lstm_fused {

// Full peepholes put a GEMM inside the step (W_co c_t needs the new c_t, and the backward needs
// W_co^T dz_o before the rest), so their step runs as two kernels: Update, GEMM, Output forward,
// and Output, GEMM, Update backward. The other variants run the whole step (All) in one kernel.
enum class Part : int { All = 0, Update = 1, Output = 2 };

struct ForwardStep {
  const void* z;            // [rows, G*H] gate pre-activations (may alias gates_out)
  int64_t z_stride;
  void* gates_out;          // [rows, G*H] activated gates, saved for backward; null: not stored
  int64_t gates_stride;
  const void* c_prev;       // [rows, H]
  int64_t c_prev_stride;
  const void* weight_ch;    // [P, H] diagonal peepholes, contiguous; null otherwise
  void* c_out;              // [rows, H] new cell state
  int64_t c_out_stride;
  void* c_state;            // optional second copy of c (the layer's running state); may alias c_prev
  int64_t c_state_stride;
  void* h_out;              // [rows, H] o * tanh(c)
  int64_t h_out_stride;
  void* h_state;            // optional second copy of h
  int64_t h_state_stride;
  int64_t rows;
  int64_t hidden;
  bool coupled;
  Peephole peephole;
  Part part;                // Output reads z_o and the c_out written by Update
  c10::ScalarType dtype;
  double cell_clip;         // > 0: c_t clipped to [-cell_clip, cell_clip] (clip_state); 0: off
  // Zoneout (lstm_math.h zoneout): with keep_c, c_out gets the computed c~_t (what the output
  // gate and tanh see) and c_state / c_zoned the zoned m c_{t-1} + (1 - m) c~_t; with keep_h,
  // h_out / h_state get m h_{t-1} + (1 - m) o tanh(c~_t) (layers without a projection: the
  // projected h is zoned by the driver). Keep rows may have stride 0 (eval: one rate per unit).
  const void* keep_c;       // [rows, H] keep values of c; null: no zoneout of c
  int64_t keep_c_stride;
  void* c_zoned;            // optional third copy of the zoned c (saved for backward)
  int64_t c_zoned_stride;
  const void* keep_h;       // [rows, H] keep values of h; null: no zoneout of h
  int64_t keep_h_stride;
  const void* h_prev;       // [rows, H] h_{t-1}, read with keep_h
  int64_t h_prev_stride;
  // Layer normalisation (layer_norm_forward_row): z holds the pre-norm W x + W h (no bias, full
  // peepholes' W_c c added by the driver's GEMMs); the kernel adds the diagonal peephole terms,
  // normalises each gate over its H units and adds bias_ln after the norm. gates_out rows then
  // hold [activated gates | x̂ (G*H) | (mean, rstd) per gate (2*G)] (layer_norm_saved_width).
  bool layer_norm;
  const void* weight_ln;    // [G, H] γ, contiguous (layer_norm only)
  const void* bias_ln;      // [G*H] b_ih + b_hh, contiguous; null: no bias
  double layer_norm_eps;
  // gates_out and (Part::All) c_out are rows saved for the backward that nothing in this call
  // reads again: forward_chunk writes them past the CPU's caches (IO::stream), not over the
  // step's data (layer norm's rows are written as usual).
  bool stream_saved;
};

struct BackwardStep {
  const void* grad_h;       // [rows, H] gradient of o * tanh(c); null means zero
  int64_t grad_h_stride;
  void* grad_h2;            // optional second addend of that gradient (recurrent path)
  int64_t grad_h2_stride;
  bool consume_grad_h2;     // Output part: zero grad_h2 after reading it (so a GEMM can add to it)
  const void* dc_in;        // [rows, H] gradient reaching c from later steps; null means zero
  int64_t dc_in_stride;
  void* dc_prev_out;        // [rows, H] gradient of c_prev (may alias dc_in)
  int64_t dc_prev_stride;
  const void* gates;        // [rows, G*H] activated gates from the forward
  int64_t gates_stride;
  const void* c_prev;       // rows < c_prev_rows read c_prev from here ...
  int64_t c_prev_stride;
  int64_t c_prev_rows;
  const void* c_prev_tail;  // ... the others from here (the initial state, for packed input)
  int64_t c_prev_tail_stride;
  const void* c;            // [rows, H] cell state of this step
  int64_t c_stride;
  const void* weight_ch;    // [P, H] diagonal peepholes, contiguous; null otherwise
  void* grad_z;             // [rows, G*H] gradient of the gate pre-activations
  int64_t grad_z_stride;
  int64_t rows;
  int64_t hidden;
  bool coupled;
  Peephole peephole;
  Part part;                // Output: dz_o and dc without W_co^T dz_o; Update: the rest from dc
  c10::ScalarType dtype;
  double cell_clip;         // the forward's cell_clip: dc zeroed where it was active (|c| at it)
  // Zoneout (lstm_math.h zoneout_backward). `c` is then the computed c~_t and c_prev the zoned
  // c_{t-1}. keep_c: dc_in is the gradient of the zoned c_t; (1 - m) of it reaches c~_t and
  // m of it is added to dc_prev_out. Full peepholes: the Output part writes that m dc_in to
  // dc_keep, the Update part (whose dc_in is then the total gradient of c~_t) adds it; layer
  // norm's rows (which overwrite dc_prev_out before their Update loop) always go through dc_keep.
  // keep_h: the gradient of the zoned h_t, grad_h + grad_h2, is split: (1 - m) of it reaches
  // o tanh(c~_t), and m of it is written back into grad_h2 (which must then be consumed) for
  // the GEMM that adds dz W_hh to it.
  const void* keep_c;       // [rows, H] keep values of c; null: no zoneout of c
  int64_t keep_c_stride;
  void* dc_keep;            // [rows, H] with keep_c: full peepholes and layer norm only
  int64_t dc_keep_stride;
  const void* keep_h;       // [rows, H] keep values of h; null: no zoneout of h
  int64_t keep_h_stride;
  // Layer normalisation (layer_norm_backward_row): `gates` rows are the forward's saved rows
  // [activated gates | x̂ | (mean, rstd) per gate]; grad_z receives dv, the gradient of the
  // pre-norm v (what the GEMMs and peepholes need), grad_zhat dẑ (for dγ and the bias).
  bool layer_norm;
  const void* weight_ln;    // [G, H] γ, contiguous
  void* grad_zhat;          // [rows, G*H] gradient of the normalised pre-activations ẑ
  int64_t grad_zhat_stride;
  // The CPU's step-by-step column sums, in the op-math type, added to while the step's dz rows
  // are in the cache (null: summed elsewhere): bias_sums [G*H] += Σ_rows dz (the bias gradient),
  // peephole_sums [P*H] += Σ_rows dz_(i,f) ⊙ c_{t-1}, dz_o ⊙ c_t (the diagonal peepholes'). Part::All
  // without layer norm; the kernel then splits the units, not the rows, between the threads, so
  // each column is summed in row order whatever the thread count (add_column_sums).
  void* bias_sums;
  void* peephole_sums;
};

// One GRU time step (lstm_math.h gru_update) for `rows` rows of `hidden` units. Saved rows for
// backward are [r, z, n, b_n] (4H): the activated gates and the recurrent n pre-activation
// W_hn h_{t-1} + b_hn that the reset gate multiplied.
struct GruForwardStep {
  const void* input_gates;   // [rows, 3H] a = x_t W_ihᵀ + b_ih
  int64_t input_gates_stride;
  const void* hidden_gates;  // [rows, 3H] h_{t-1} W_hhᵀ, without b_hh
  int64_t hidden_gates_stride;
  const void* bias_hh;       // [3H] contiguous, added to hidden_gates; null: no bias
  const void* h_prev;        // [rows, H] h_{t-1} (may alias h_state: loads come first)
  int64_t h_prev_stride;
  void* gates_out;           // [rows, 4H] r, z, n, b_n for backward; null: not stored
  int64_t gates_stride;
  void* h_out;               // [rows, H] h_t
  int64_t h_out_stride;
  void* h_state;             // optional second copy of h_t (the running state); may be null
  int64_t h_state_stride;
  // Zoneout of h (lstm_math.h zoneout): h_t = m h_{t-1} + (1 - m) h~_t, h~_t the GRU's update;
  // rows may have stride 0 (eval: one rate per unit).
  const void* keep_h;        // [rows, H] keep values; null: no zoneout
  int64_t keep_h_stride;
  int64_t rows;
  int64_t hidden;
  c10::ScalarType dtype;
  bool stream_saved;         // gates_out past the CPU's caches (ForwardStep::stream_saved)
};

struct GruBackwardStep {
  const void* grad_h;        // [rows, H] gradient of h_t from the output; null means zero
  int64_t grad_h_stride;
  void* grad_h2;             // [rows, H] gradient of h_t from the next step; replaced by the part
  int64_t grad_h2_stride;    // that reaches h_{t-1} directly, dh z (a GEMM then adds db W_hh)
  const void* gates;         // [rows, 4H] the forward's saved r, z, n, b_n
  int64_t gates_stride;
  const void* h_prev;        // [rows, H] h_{t-1}
  int64_t h_prev_stride;
  void* grad_input_gates;    // [rows, 3H] da, gradient of x_t W_ihᵀ + b_ih
  int64_t grad_input_gates_stride;
  void* grad_hidden_gates;   // [rows, 3H] db, gradient of h_{t-1} W_hhᵀ + b_hh
  int64_t grad_hidden_gates_stride;
  // Zoneout of h: the gradient of the zoned h_t is split, (1 - m) of it to the update h~_t and
  // m of it straight to h_{t-1} (added to what grad_h2 passes on).
  const void* keep_h;        // [rows, H] keep values; null: no zoneout
  int64_t keep_h_stride;
  int64_t rows;
  int64_t hidden;
  c10::ScalarType dtype;
};

// The inline code below is compiled once per kernel build; see isa_namespace.h.
inline namespace LSTM_FUSED_ISA {

// Gate blocks of H columns in z and in the saved gates: (i, f, g, o), or (f, g, o) when
// coupled. Peephole rows of weight_ch: (i, f, o), or (f, o) when coupled.
template <bool kCoupled>
struct GateLayout {
  static constexpr int kGates = kCoupled ? 3 : 4;
  static constexpr int i = 0;  // unused when coupled
  static constexpr int f = kCoupled ? 0 : 1;
  static constexpr int g = kCoupled ? 1 : 2;
  static constexpr int o = kCoupled ? 2 : 3;
  static constexpr int peep_i = 0;  // unused when coupled
  static constexpr int peep_f = kCoupled ? 0 : 1;
  static constexpr int peep_o = kCoupled ? 1 : 2;
};

inline int num_gates(bool coupled) { return coupled ? 3 : 4; }
// Columns of a saved row with layer norm: the activated gates, x̂ of every gate, then (mean,
// rstd) of each gate.
inline int64_t layer_norm_saved_width(bool coupled, int64_t hidden) {
  return 2 * num_gates(coupled) * hidden + 2 * num_gates(coupled);
}
inline int num_peepholes(bool coupled) { return coupled ? 2 : 3; }

// One value at a time, computed in the op-math type (float for half/bfloat16 storage).
template <typename scalar_t>
struct ScalarIO {
  using storage_t = scalar_t;
  using V = at::opmath_type<scalar_t>;
  using Scalar = V;  // what a row reduction accumulates in
  static constexpr int kWidth = 1;
  LSTM_HD static V load(const scalar_t* p, int /*n*/) { return static_cast<V>(*p); }
  LSTM_HD static void store(scalar_t* p, V v, int /*n*/) { *p = static_cast<scalar_t>(v); }
  // A store that need not stay in the cache (the CPU's SimdIO: non-temporal where it can).
  LSTM_HD static void stream(scalar_t* p, V v, int n) { store(p, v, n); }
  // *p += v for a sum kept in the op-math type.
  LSTM_HD static void accumulate(Scalar* p, V v, int /*n*/) { *p += v; }
  LSTM_HD static V keep(V v, int /*n*/) { return v; }  // the first n lanes, the others 0
  LSTM_HD static Scalar total(V v) { return v; }       // the sum of the lanes
};

// A value saved for the backward: streamed past the caches where the step allows it.
template <typename IO>
LSTM_HD inline void store_saved(bool stream, typename IO::storage_t* p, typename IO::V v, int n) {
  if (stream) {
    IO::stream(p, v, n);
  } else {
    IO::store(p, v, n);
  }
}

// Computes the forward step for hidden units [j, j + n) of one row. IO decides how many values
// one V holds (1 on the GPU, a SIMD register on the CPU). All loads come before all stores, so z
// may alias gates_out and c_prev may alias c_state.
template <typename IO, bool kCoupled, bool kDiagonal, Part kPart>
LSTM_HD inline void forward_chunk(const ForwardStep& p, int64_t row, int64_t j, int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden;
  const S* z = static_cast<const S*>(p.z) + row * p.z_stride + j;
  S* out = p.gates_out ? static_cast<S*>(p.gates_out) + row * p.gates_stride + j : nullptr;
  S* c_out = static_cast<S*>(p.c_out) + row * p.c_out_stride + j;
  Gates<V> gates{};

  V w_ci(0), w_cf(0), w_co(0);
  if (kDiagonal) {
    const S* w = static_cast<const S*>(p.weight_ch) + j;
    if (!kCoupled) w_ci = IO::load(w + L::peep_i * H, n);
    w_cf = IO::load(w + L::peep_f * H, n);
    w_co = IO::load(w + L::peep_o * H, n);
  }
  V c(0), z_o(0);
  if (kPart == Part::Output) {
    c = IO::load(c_out, n);
    z_o = IO::load(z + L::o * H, n);
  } else {
    const V c_prev = IO::load(static_cast<const S*>(p.c_prev) + row * p.c_prev_stride + j, n);
    const V z_i = kCoupled ? V(0) : IO::load(z + L::i * H, n);
    const V z_f = IO::load(z + L::f * H, n);
    const V z_g = IO::load(z + L::g * H, n);
    if (kPart == Part::All) z_o = IO::load(z + L::o * H, n);
    c = cell_update<kCoupled, kDiagonal>(z_i, z_f, z_g, c_prev, w_ci, w_cf, gates);
    if (p.cell_clip > 0) c = clip_state(c, V(p.cell_clip));
    if (out) {
      if (!kCoupled) store_saved<IO>(p.stream_saved, out + L::i * H, gates.i, n);
      store_saved<IO>(p.stream_saved, out + L::f * H, gates.f, n);
      store_saved<IO>(p.stream_saved, out + L::g * H, gates.g, n);
    }
    V state = c;
    if (p.keep_c) {
      const V keep = IO::load(static_cast<const S*>(p.keep_c) + row * p.keep_c_stride + j, n);
      state = zoneout(c_prev, c, keep);
      if (p.c_zoned) IO::store(static_cast<S*>(p.c_zoned) + row * p.c_zoned_stride + j, state, n);
    }
    // Part::Update's c_out is what Part::Output reads.
    store_saved<IO>(p.stream_saved && kPart == Part::All, c_out, c, n);
    if (p.c_state) IO::store(static_cast<S*>(p.c_state) + row * p.c_state_stride + j, state, n);
    if (kPart == Part::Update) return;
  }
  V h = cell_output<kDiagonal>(z_o, c, w_co, gates);
  if (p.keep_h) {
    const V keep = IO::load(static_cast<const S*>(p.keep_h) + row * p.keep_h_stride + j, n);
    h = zoneout(IO::load(static_cast<const S*>(p.h_prev) + row * p.h_prev_stride + j, n), h, keep);
  }
  if (out) store_saved<IO>(p.stream_saved, out + L::o * H, gates.o, n);
  IO::store(static_cast<S*>(p.h_out) + row * p.h_out_stride + j, h, n);
  if (p.h_state) IO::store(static_cast<S*>(p.h_state) + row * p.h_state_stride + j, h, n);
}

// The gradient reaching o tanh(c~_t) for units [j, j + n) of a row: grad_h + grad_h2 (the total
// gradient of h_t), of which zoneout of h passes m straight to h_{t-1}: that part (0 without
// zoneout) replaces grad_h2 when the step consumes it, and (1 - m) of it is returned.
template <typename IO>
LSTM_HD inline typename IO::V output_grad(const BackwardStep& p, int64_t row, int64_t j, int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  V dh(0);
  if (p.grad_h) dh = IO::load(static_cast<const S*>(p.grad_h) + row * p.grad_h_stride + j, n);
  S* grad_h2 = p.grad_h2 ? static_cast<S*>(p.grad_h2) + row * p.grad_h2_stride + j : nullptr;
  if (grad_h2) dh = dh + IO::load(grad_h2, n);
  V dh_kept(0);
  if (p.keep_h) {
    const V keep = IO::load(static_cast<const S*>(p.keep_h) + row * p.keep_h_stride + j, n);
    dh = zoneout_backward(dh, keep, dh_kept);
  }
  if (grad_h2 && p.consume_grad_h2) IO::store(grad_h2, dh_kept, n);
  return dh;
}

// c_{t-1} of a row of the backward step: rows below c_prev_rows from c_prev, the others (packed
// input: sequences that start at this step) from c_prev_tail.
template <typename S>
LSTM_HD inline const S* previous_cell_row(const BackwardStep& p, int64_t row) {
  return row < p.c_prev_rows ? static_cast<const S*>(p.c_prev) + row * p.c_prev_stride
                             : static_cast<const S*>(p.c_prev_tail) + row * p.c_prev_tail_stride;
}

template <typename IO, bool kCoupled, bool kDiagonal, Part kPart>
LSTM_HD inline void backward_chunk(const BackwardStep& p, int64_t row, int64_t j, int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden;
  const S* saved = static_cast<const S*>(p.gates) + row * p.gates_stride + j;
  S* dz = static_cast<S*>(p.grad_z) + row * p.grad_z_stride + j;
  S* dc_prev_out = static_cast<S*>(p.dc_prev_out) + row * p.dc_prev_stride + j;

  V w_ci(0), w_cf(0), w_co(0);
  if (kDiagonal) {
    const S* w = static_cast<const S*>(p.weight_ch) + j;
    if (!kCoupled) w_ci = IO::load(w + L::peep_i * H, n);
    w_cf = IO::load(w + L::peep_f * H, n);
    w_co = IO::load(w + L::peep_o * H, n);
  }
  V dc_in(0);
  if (p.dc_in) dc_in = IO::load(static_cast<const S*>(p.dc_in) + row * p.dc_in_stride + j, n);
  // Zoneout of c: the part of dc_in that goes straight to c_{t-1}. The Update part of a full
  // peephole step gets the total gradient of c~_t as dc_in, and that part from dc_keep.
  V dc_kept(0);
  if (p.keep_c) {
    if (kPart == Part::Update) {
      dc_kept = IO::load(static_cast<const S*>(p.dc_keep) + row * p.dc_keep_stride + j, n);
    } else {
      const V keep = IO::load(static_cast<const S*>(p.keep_c) + row * p.keep_c_stride + j, n);
      dc_in = zoneout_backward(dc_in, keep, dc_kept);
    }
  }

  V dc = dc_in;  // the Update part receives the total dc
  const bool clipped = p.cell_clip > 0;
  V c(0);
  if (kPart != Part::Update || clipped) {
    c = IO::load(static_cast<const S*>(p.c) + row * p.c_stride + j, n);
  }
  if (kPart != Part::Update) {
    const V dh = output_grad<IO>(p, row, j, n);
    const V o = IO::load(saved + L::o * H, n);
    const V dz_o = output_backward<kDiagonal>(dh, dc_in, c, o, w_co, dc);
    IO::store(dz + L::o * H, dz_o, n);
    if (kPart == Part::Output) {
      IO::store(dc_prev_out, dc, n);
      if (p.keep_c) {
        IO::store(static_cast<S*>(p.dc_keep) + row * p.dc_keep_stride + j, dc_kept, n);
      }
      return;
    }
  }
  // dc so far is the gradient of the clipped c_t (every use sees it); the update made the raw one.
  if (clipped) dc = clip_state_backward(dc, c, V(p.cell_clip));
  Gates<V> gates{};
  gates.f = IO::load(saved + L::f * H, n);
  gates.i = kCoupled ? V(1) - gates.f : IO::load(saved + L::i * H, n);
  gates.g = IO::load(saved + L::g * H, n);
  const V c_prev = IO::load(previous_cell_row<S>(p, row) + j, n);
  CellGrads<V> grads{};
  cell_update_backward<kCoupled, kDiagonal>(dc, c_prev, gates, w_ci, w_cf, grads);
  if (!kCoupled) IO::store(dz + L::i * H, grads.dz_i, n);
  IO::store(dz + L::f * H, grads.dz_f, n);
  IO::store(dz + L::g * H, grads.dz_g, n);
  IO::store(dc_prev_out, p.keep_c ? grads.dc_prev + dc_kept : grads.dc_prev, n);
}

// A block of units' column sums over the rows of one backward step (BackwardStep::bias_sums).
template <typename V>
struct ColumnSums {
  V dz[4];    // Σ dz of each gate block
  V peep[3];  // Σ dz_i c_{t-1}, dz_f c_{t-1}, dz_o c_t (peep_i, peep_f, peep_o)
};

// Adds row `row`'s terms for hidden units [j, j + n) to `sums`, reading back the dz that
// backward_chunk just wrote: the bias gradient is Σ dz, the diagonal peepholes' Σ dz_(i,f) c_{t-1}
// and Σ dz_o c_t (the peephole terms of cell_update and cell_output).
template <typename IO, bool kCoupled, bool kDiagonal>
LSTM_HD inline void add_column_sums(const BackwardStep& p, int64_t row, int64_t j, int n,
                                    ColumnSums<typename IO::V>& sums) {
  using S = typename IO::storage_t;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden;
  const S* dz_row = static_cast<const S*>(p.grad_z) + row * p.grad_z_stride + j;
  typename IO::V dz[L::kGates];
  for (int g = 0; g < L::kGates; ++g) {
    dz[g] = IO::load(dz_row + g * H, n);
    sums.dz[g] = sums.dz[g] + dz[g];
  }
  if (kDiagonal) {
    const auto c_prev = IO::load(previous_cell_row<S>(p, row) + j, n);
    const auto c = IO::load(static_cast<const S*>(p.c) + row * p.c_stride + j, n);
    if (!kCoupled) sums.peep[L::peep_i] = sums.peep[L::peep_i] + dz[L::i] * c_prev;
    sums.peep[L::peep_f] = sums.peep[L::peep_f] + dz[L::f] * c_prev;
    sums.peep[L::peep_o] = sums.peep[L::peep_o] + dz[L::o] * c;
  }
}

// --- layer normalisation: whole rows ----------------------------------------------------------
// The norm is a reduction over the H units of each gate of a row, so with layer_norm the kernels
// take whole rows (one task or thread per row) instead of chunks: the statistics of a gate
// first, then the chunk math of lstm_math.h on the normalised ẑ (with no peephole term: the
// peepholes are inside v). The output gate's statistics come after the row's c_t update.

template <typename IO>
struct LayerNormStats {
  typename IO::Scalar mean, rstd;
};

// v of one gate block for units [j, j + n): z, plus w ⊙ c with a diagonal peephole (w non-null).
template <typename IO>
LSTM_HD inline typename IO::V layer_norm_input(const typename IO::storage_t* z,
                                               const typename IO::storage_t* w,
                                               const typename IO::storage_t* c, int64_t j, int n) {
  typename IO::V v = IO::load(z + j, n);
  if (w) v = v + IO::load(w + j, n) * IO::load(c + j, n);
  return v;
}

template <typename IO>
LSTM_HD inline int chunk_width(int64_t hidden, int64_t j) {
  return hidden - j < IO::kWidth ? static_cast<int>(hidden - j) : IO::kWidth;
}

// Mean and rstd of v (layer_norm_input) over the H units: two passes (the mean, then the sum of
// squared deviations), which loses nothing to cancellation when the mean is large.
template <typename IO>
LSTM_HD inline LayerNormStats<IO> layer_norm_statistics(const typename IO::storage_t* z,
                                                        const typename IO::storage_t* w,
                                                        const typename IO::storage_t* c,
                                                        int64_t H, double eps) {
  using V = typename IO::V;
  using A = typename IO::Scalar;
  V sum(0);
  for (int64_t j = 0; j < H; j += IO::kWidth) {
    const int n = chunk_width<IO>(H, j);
    sum = sum + IO::keep(layer_norm_input<IO>(z, w, c, j, n), n);
  }
  const A mean = IO::total(sum) / static_cast<A>(H);
  V squares(0);
  for (int64_t j = 0; j < H; j += IO::kWidth) {
    const int n = chunk_width<IO>(H, j);
    const V d = IO::keep(layer_norm_input<IO>(z, w, c, j, n) - V(mean), n);
    squares = squares + d * d;
  }
  return {mean, layer_norm_rstd(IO::total(squares), static_cast<A>(H), static_cast<A>(eps))};
}

// x̂ and ẑ = γ x̂ + b of gate block k for units [j, j + n); x̂ stored in normed_out if non-null.
template <typename IO>
LSTM_HD inline typename IO::V layer_norm_gate(const ForwardStep& p, int k,
                                              const typename IO::storage_t* z,
                                              const typename IO::storage_t* w,
                                              const typename IO::storage_t* c,
                                              const LayerNormStats<IO>& stats,
                                              typename IO::storage_t* normed_out, int64_t j,
                                              int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  const int64_t H = p.hidden;
  const V normed = layer_norm_normalize(layer_norm_input<IO>(z, w, c, j, n), V(stats.mean),
                                        V(stats.rstd));
  if (normed_out) IO::store(normed_out + k * H + j, normed, n);
  const V gamma = IO::load(static_cast<const S*>(p.weight_ln) + k * H + j, n);
  const V shift = p.bias_ln ? IO::load(static_cast<const S*>(p.bias_ln) + k * H + j, n) : V(0);
  return layer_norm_affine(normed, gamma, shift);
}

template <typename IO>
LSTM_HD inline void store_layer_norm_stats(typename IO::storage_t* stats_out, int k,
                                           const LayerNormStats<IO>& stats) {
  using S = typename IO::storage_t;
  if (!stats_out) return;
  stats_out[2 * k] = static_cast<S>(stats.mean);
  stats_out[2 * k + 1] = static_cast<S>(stats.rstd);
}

// The forward step of one row with layer norm: Update (i, f, g and c_t), Output (o and h_t) or
// both. Reads every z of a gate before it writes that gate's activations, so z may alias
// gates_out; c_prev may alias c_state or (inference) c_out.
template <typename IO, bool kCoupled, bool kDiagonal, Part kPart>
LSTM_HD inline void layer_norm_forward_row(const ForwardStep& p, int64_t row) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden;
  if (H == 0) return;
  const int64_t GH = L::kGates * H;
  const S* z = static_cast<const S*>(p.z) + row * p.z_stride;
  S* out = p.gates_out ? static_cast<S*>(p.gates_out) + row * p.gates_stride : nullptr;
  S* normed_out = out ? out + GH : nullptr;
  S* stats_out = out ? out + 2 * GH : nullptr;
  S* c_out = static_cast<S*>(p.c_out) + row * p.c_out_stride;
  const S* peep = kDiagonal ? static_cast<const S*>(p.weight_ch) : nullptr;
  const double eps = p.layer_norm_eps;

  if (kPart != Part::Output) {
    const S* c_prev = static_cast<const S*>(p.c_prev) + row * p.c_prev_stride;
    const S* peep_i = kDiagonal && !kCoupled ? peep + L::peep_i * H : nullptr;
    const S* peep_f = kDiagonal ? peep + L::peep_f * H : nullptr;
    LayerNormStats<IO> stats_i{};
    if (!kCoupled) stats_i = layer_norm_statistics<IO>(z + L::i * H, peep_i, c_prev, H, eps);
    const LayerNormStats<IO> stats_f =
        layer_norm_statistics<IO>(z + L::f * H, peep_f, c_prev, H, eps);
    const LayerNormStats<IO> stats_g =
        layer_norm_statistics<IO>(z + L::g * H, nullptr, c_prev, H, eps);
    if (!kCoupled) store_layer_norm_stats<IO>(stats_out, L::i, stats_i);
    store_layer_norm_stats<IO>(stats_out, L::f, stats_f);
    store_layer_norm_stats<IO>(stats_out, L::g, stats_g);
    for (int64_t j = 0; j < H; j += IO::kWidth) {
      const int n = chunk_width<IO>(H, j);
      const V z_i = kCoupled ? V(0)
                             : layer_norm_gate<IO>(p, L::i, z + L::i * H, peep_i, c_prev, stats_i,
                                                   normed_out, j, n);
      const V z_f =
          layer_norm_gate<IO>(p, L::f, z + L::f * H, peep_f, c_prev, stats_f, normed_out, j, n);
      const V z_g =
          layer_norm_gate<IO>(p, L::g, z + L::g * H, nullptr, c_prev, stats_g, normed_out, j, n);
      Gates<V> gates{};
      V c = cell_update<kCoupled, false>(z_i, z_f, z_g, IO::load(c_prev + j, n), V(0), V(0),
                                         gates);
      if (p.cell_clip > 0) c = clip_state(c, V(p.cell_clip));
      if (out) {
        if (!kCoupled) IO::store(out + L::i * H + j, gates.i, n);
        IO::store(out + L::f * H + j, gates.f, n);
        IO::store(out + L::g * H + j, gates.g, n);
      }
      // Zoneout of c (after the clip): c_out keeps the computed c~_t, which the output gate's
      // norm and tanh see; the state carried on is the zoned one.
      V state = c;
      if (p.keep_c) {
        const V keep = IO::load(static_cast<const S*>(p.keep_c) + row * p.keep_c_stride + j, n);
        state = zoneout(IO::load(c_prev + j, n), c, keep);
        if (p.c_zoned) {
          IO::store(static_cast<S*>(p.c_zoned) + row * p.c_zoned_stride + j, state, n);
        }
      }
      IO::store(c_out + j, c, n);
      if (p.c_state) IO::store(static_cast<S*>(p.c_state) + row * p.c_state_stride + j, state, n);
    }
    if (kPart == Part::Update) return;
  }
  // The output gate's norm sees the new, clipped c_t (its peephole term is inside v_o).
  const S* peep_o = kDiagonal ? peep + L::peep_o * H : nullptr;
  const LayerNormStats<IO> stats_o = layer_norm_statistics<IO>(z + L::o * H, peep_o, c_out, H, eps);
  store_layer_norm_stats<IO>(stats_out, L::o, stats_o);
  for (int64_t j = 0; j < H; j += IO::kWidth) {
    const int n = chunk_width<IO>(H, j);
    const V z_o =
        layer_norm_gate<IO>(p, L::o, z + L::o * H, peep_o, c_out, stats_o, normed_out, j, n);
    Gates<V> gates{};
    V h = cell_output<false>(z_o, IO::load(c_out + j, n), V(0), gates);
    if (p.keep_h) {
      const V keep = IO::load(static_cast<const S*>(p.keep_h) + row * p.keep_h_stride + j, n);
      h = zoneout(IO::load(static_cast<const S*>(p.h_prev) + row * p.h_prev_stride + j, n), h,
                  keep);
    }
    if (out) IO::store(out + L::o * H + j, gates.o, n);
    IO::store(static_cast<S*>(p.h_out) + row * p.h_out_stride + j, h, n);
    if (p.h_state) IO::store(static_cast<S*>(p.h_state) + row * p.h_state_stride + j, h, n);
  }
}

// The two row means of the norm's backward for gate block k, a = mean(γ dẑ) and
// m = mean(γ dẑ x̂), with dẑ read back from grad_zhat.
template <typename IO>
struct LayerNormGradMeans {
  typename IO::Scalar a, m;
};

template <typename IO>
LSTM_HD inline LayerNormGradMeans<IO> layer_norm_grad_means(const typename IO::storage_t* gamma,
                                                            const typename IO::storage_t* dzhat,
                                                            const typename IO::storage_t* normed,
                                                            int64_t H) {
  using V = typename IO::V;
  using A = typename IO::Scalar;
  V sum_a(0), sum_m(0);
  for (int64_t j = 0; j < H; j += IO::kWidth) {
    const int n = chunk_width<IO>(H, j);
    const V gamma_grad = IO::keep(IO::load(gamma + j, n) * IO::load(dzhat + j, n), n);
    sum_a = sum_a + gamma_grad;
    sum_m = sum_m + gamma_grad * IO::load(normed + j, n);
  }
  return {IO::total(sum_a) / static_cast<A>(H), IO::total(sum_m) / static_cast<A>(H)};
}

// dv of gate block k for units [j, j + n), stored in grad_z; returned for the peephole paths.
template <typename IO>
LSTM_HD inline typename IO::V layer_norm_input_grad(const typename IO::storage_t* gamma,
                                                    const typename IO::storage_t* dzhat,
                                                    const typename IO::storage_t* normed,
                                                    typename IO::Scalar rstd,
                                                    const LayerNormGradMeans<IO>& means,
                                                    typename IO::storage_t* dv_out, int64_t j,
                                                    int n) {
  using V = typename IO::V;
  const V dv = layer_norm_backward(IO::load(gamma + j, n) * IO::load(dzhat + j, n),
                                   IO::load(normed + j, n), V(rstd), V(means.a), V(means.m));
  IO::store(dv_out + j, dv, n);
  return dv;
}

// The backward step of one row with layer norm, the mirror of layer_norm_forward_row: Output
// (dẑ_o, then dv_o and dc with its peephole path; full peepholes add W_coᵀ dv_o by a GEMM
// before Update), Update (from the total dc: dẑ_i, dẑ_f, dẑ_g, then their dv and dc_prev) or both.
template <typename IO, bool kCoupled, bool kDiagonal, Part kPart>
LSTM_HD inline void layer_norm_backward_row(const BackwardStep& p, int64_t row) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden;
  if (H == 0) return;
  const int64_t GH = L::kGates * H;
  const S* saved = static_cast<const S*>(p.gates) + row * p.gates_stride;
  const S* normed = saved + GH;
  const S* stats = saved + 2 * GH;
  S* dz = static_cast<S*>(p.grad_z) + row * p.grad_z_stride;
  S* dzhat = static_cast<S*>(p.grad_zhat) + row * p.grad_zhat_stride;
  S* dc_prev_out = static_cast<S*>(p.dc_prev_out) + row * p.dc_prev_stride;
  const S* gamma = static_cast<const S*>(p.weight_ln);
  const S* peep = kDiagonal ? static_cast<const S*>(p.weight_ch) : nullptr;
  const S* c = static_cast<const S*>(p.c) + row * p.c_stride;
  const S* dc_in = p.dc_in ? static_cast<const S*>(p.dc_in) + row * p.dc_in_stride : nullptr;
  using A = typename IO::Scalar;
  auto rstd_of = [&](int k) { return static_cast<A>(stats[2 * k + 1]); };

  if (kPart != Part::Update) {
    for (int64_t j = 0; j < H; j += IO::kWidth) {
      const int n = chunk_width<IO>(H, j);
      const V dh = output_grad<IO>(p, row, j, n);
      V dc_t = dc_in ? IO::load(dc_in + j, n) : V(0);
      // Zoneout of c: m dc_t passes straight to c_{t-1}, kept in dc_keep for the Update loop
      // (dc_in may alias dc_prev_out, which this loop overwrites).
      if (p.keep_c) {
        const V keep = IO::load(static_cast<const S*>(p.keep_c) + row * p.keep_c_stride + j, n);
        V dc_kept(0);
        dc_t = zoneout_backward(dc_t, keep, dc_kept);
        IO::store(static_cast<S*>(p.dc_keep) + row * p.dc_keep_stride + j, dc_kept, n);
      }
      V dc(0);
      const V dzhat_o = output_backward<false>(dh, dc_t, IO::load(c + j, n),
                                               IO::load(saved + L::o * H + j, n), V(0), dc);
      IO::store(dzhat + L::o * H + j, dzhat_o, n);
      IO::store(dc_prev_out + j, dc, n);  // dc so far (dc_in may alias it: read above)
    }
    const LayerNormGradMeans<IO> means_o = layer_norm_grad_means<IO>(
        gamma + L::o * H, dzhat + L::o * H, normed + L::o * H, H);
    for (int64_t j = 0; j < H; j += IO::kWidth) {
      const int n = chunk_width<IO>(H, j);
      const V dv_o = layer_norm_input_grad<IO>(gamma + L::o * H, dzhat + L::o * H,
                                               normed + L::o * H, rstd_of(L::o), means_o,
                                               dz + L::o * H, j, n);
      // v_o holds w_co ⊙ c_t: its gradient reaches c_t.
      if (kDiagonal) {
        IO::store(dc_prev_out + j,
                  IO::load(dc_prev_out + j, n) + IO::load(peep + L::peep_o * H + j, n) * dv_o, n);
      }
    }
    if (kPart == Part::Output) return;
  }
  // Update: from the total dc of the clipped c_t (All: in dc_prev_out now; Update: in dc_in).
  const S* dc_total = kPart == Part::Update ? dc_in : dc_prev_out;
  const S* c_prev = row < p.c_prev_rows
                        ? static_cast<const S*>(p.c_prev) + row * p.c_prev_stride
                        : static_cast<const S*>(p.c_prev_tail) + row * p.c_prev_tail_stride;
  for (int64_t j = 0; j < H; j += IO::kWidth) {
    const int n = chunk_width<IO>(H, j);
    V dc = dc_total ? IO::load(dc_total + j, n) : V(0);
    if (p.cell_clip > 0) dc = clip_state_backward(dc, IO::load(c + j, n), V(p.cell_clip));
    Gates<V> gates{};
    gates.f = IO::load(saved + L::f * H + j, n);
    gates.i = kCoupled ? V(1) - gates.f : IO::load(saved + L::i * H + j, n);
    gates.g = IO::load(saved + L::g * H + j, n);
    CellGrads<V> grads{};
    cell_update_backward<kCoupled, false>(dc, IO::load(c_prev + j, n), gates, V(0), V(0), grads);
    if (!kCoupled) IO::store(dzhat + L::i * H + j, grads.dz_i, n);
    IO::store(dzhat + L::f * H + j, grads.dz_f, n);
    IO::store(dzhat + L::g * H + j, grads.dz_g, n);
    V dc_prev = grads.dc_prev;
    if (p.keep_c) {
      dc_prev = dc_prev +
                IO::load(static_cast<const S*>(p.dc_keep) + row * p.dc_keep_stride + j, n);
    }
    IO::store(dc_prev_out + j, dc_prev, n);
  }
  LayerNormGradMeans<IO> means_i{};
  if (!kCoupled) {
    means_i = layer_norm_grad_means<IO>(gamma + L::i * H, dzhat + L::i * H, normed + L::i * H, H);
  }
  const LayerNormGradMeans<IO> means_f =
      layer_norm_grad_means<IO>(gamma + L::f * H, dzhat + L::f * H, normed + L::f * H, H);
  const LayerNormGradMeans<IO> means_g =
      layer_norm_grad_means<IO>(gamma + L::g * H, dzhat + L::g * H, normed + L::g * H, H);
  for (int64_t j = 0; j < H; j += IO::kWidth) {
    const int n = chunk_width<IO>(H, j);
    V dv_i(0);
    if (!kCoupled) {
      dv_i = layer_norm_input_grad<IO>(gamma + L::i * H, dzhat + L::i * H, normed + L::i * H,
                                       rstd_of(L::i), means_i, dz + L::i * H, j, n);
    }
    const V dv_f = layer_norm_input_grad<IO>(gamma + L::f * H, dzhat + L::f * H,
                                             normed + L::f * H, rstd_of(L::f), means_f,
                                             dz + L::f * H, j, n);
    layer_norm_input_grad<IO>(gamma + L::g * H, dzhat + L::g * H, normed + L::g * H,
                              rstd_of(L::g), means_g, dz + L::g * H, j, n);
    // v_i and v_f hold w_ci ⊙ c_{t-1} and w_cf ⊙ c_{t-1}: their gradients reach c_{t-1}.
    if (kDiagonal) {
      V dc_prev = IO::load(dc_prev_out + j, n) + IO::load(peep + L::peep_f * H + j, n) * dv_f;
      if (!kCoupled) dc_prev = dc_prev + IO::load(peep + L::peep_i * H + j, n) * dv_i;
      IO::store(dc_prev_out + j, dc_prev, n);
    }
  }
}

// --- GRU: chunks of hidden units, like the LSTM's ------------------------------------------
// Gate blocks of H columns (r, z, n) in a and b; saved rows (r, z, n, b_n).
struct GruLayout {
  static constexpr int kGates = 3;
  static constexpr int r = 0, z = 1, n = 2, b_n = 3;
};

// The GRU forward step for hidden units [j, j + n) of one row. All loads come before all
// stores, so input_gates may alias gates_out and h_prev may alias h_state.
template <typename IO>
LSTM_HD inline void gru_forward_chunk(const GruForwardStep& p, int64_t row, int64_t j, int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GruLayout;
  const int64_t H = p.hidden;
  const S* a = static_cast<const S*>(p.input_gates) + row * p.input_gates_stride + j;
  const S* b = static_cast<const S*>(p.hidden_gates) + row * p.hidden_gates_stride + j;
  V b_r = IO::load(b + L::r * H, n), b_z = IO::load(b + L::z * H, n),
    b_n = IO::load(b + L::n * H, n);
  if (p.bias_hh) {
    const S* bias = static_cast<const S*>(p.bias_hh) + j;
    b_r = b_r + IO::load(bias + L::r * H, n);
    b_z = b_z + IO::load(bias + L::z * H, n);
    b_n = b_n + IO::load(bias + L::n * H, n);
  }
  const V h_prev = IO::load(static_cast<const S*>(p.h_prev) + row * p.h_prev_stride + j, n);
  GruGates<V> gates{};
  V h = gru_update(IO::load(a + L::r * H, n), IO::load(a + L::z * H, n),
                   IO::load(a + L::n * H, n), b_r, b_z, b_n, h_prev, gates);
  if (p.keep_h) {
    h = zoneout(h_prev, h, IO::load(static_cast<const S*>(p.keep_h) + row * p.keep_h_stride + j, n));
  }
  if (p.gates_out) {
    S* out = static_cast<S*>(p.gates_out) + row * p.gates_stride + j;
    store_saved<IO>(p.stream_saved, out + L::r * H, gates.r, n);
    store_saved<IO>(p.stream_saved, out + L::z * H, gates.z, n);
    store_saved<IO>(p.stream_saved, out + L::n * H, gates.n, n);
    store_saved<IO>(p.stream_saved, out + L::b_n * H, b_n, n);
  }
  IO::store(static_cast<S*>(p.h_out) + row * p.h_out_stride + j, h, n);
  if (p.h_state) IO::store(static_cast<S*>(p.h_state) + row * p.h_state_stride + j, h, n);
}

template <typename IO>
LSTM_HD inline void gru_backward_chunk(const GruBackwardStep& p, int64_t row, int64_t j, int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GruLayout;
  const int64_t H = p.hidden;
  const S* saved = static_cast<const S*>(p.gates) + row * p.gates_stride + j;
  V dh(0);
  if (p.grad_h) dh = IO::load(static_cast<const S*>(p.grad_h) + row * p.grad_h_stride + j, n);
  S* grad_h2 = static_cast<S*>(p.grad_h2) + row * p.grad_h2_stride + j;
  dh = dh + IO::load(grad_h2, n);
  V dh_kept(0);  // zoneout: m dh goes straight to h_{t-1}
  if (p.keep_h) {
    dh = zoneout_backward(
        dh, IO::load(static_cast<const S*>(p.keep_h) + row * p.keep_h_stride + j, n), dh_kept);
  }
  GruGates<V> gates{};
  gates.r = IO::load(saved + L::r * H, n);
  gates.z = IO::load(saved + L::z * H, n);
  gates.n = IO::load(saved + L::n * H, n);
  GruGrads<V> grads{};
  gru_update_backward(dh, IO::load(static_cast<const S*>(p.h_prev) + row * p.h_prev_stride + j, n),
                      IO::load(saved + L::b_n * H, n), gates, grads);
  IO::store(grad_h2, p.keep_h ? grads.dh_prev + dh_kept : grads.dh_prev, n);
  S* da = static_cast<S*>(p.grad_input_gates) + row * p.grad_input_gates_stride + j;
  S* db = static_cast<S*>(p.grad_hidden_gates) + row * p.grad_hidden_gates_stride + j;
  IO::store(da + L::r * H, grads.da_r, n);
  IO::store(da + L::z * H, grads.da_z, n);
  IO::store(da + L::n * H, grads.da_n, n);
  IO::store(db + L::r * H, grads.da_r, n);
  IO::store(db + L::z * H, grads.da_z, n);
  IO::store(db + L::n * H, grads.db_n, n);
}

// Calls f(coupled, diagonal, part) with std::integral_constant arguments, so the kernels are
// instantiated per variant and the hot loops carry no variant branches.
template <bool kValue>
using BoolConstant = std::integral_constant<bool, kValue>;
template <Part kValue>
using PartConstant = std::integral_constant<Part, kValue>;

template <typename Step, typename F>
inline void variant_switch(const Step& step, const F& f) {
  auto with_coupled = [&](auto coupled) {
    switch (step.peephole) {
      case Peephole::None:
        return f(coupled, BoolConstant<false>{}, PartConstant<Part::All>{});
      case Peephole::Diagonal:
        return f(coupled, BoolConstant<true>{}, PartConstant<Part::All>{});
      case Peephole::Full:
        TORCH_CHECK(step.part != Part::All, "lstm_fused: a full-peephole step runs in two parts");
        return step.part == Part::Update
                   ? f(coupled, BoolConstant<false>{}, PartConstant<Part::Update>{})
                   : f(coupled, BoolConstant<false>{}, PartConstant<Part::Output>{});
    }
  };
  return step.coupled ? with_coupled(BoolConstant<true>{}) : with_coupled(BoolConstant<false>{});
}

}  // namespace LSTM_FUSED_ISA

// One kernel table per device; the drivers in cell.cpp and layer.cpp are device-generic.
// Zoneout's keep mask (lstm_math.h keep_mask_block): out[i] = 1 with probability p (threshold =
// keep_threshold(p)), else 0, for i < numel; the 64-bit key is read from *seed by the kernel (on
// the GPU it stays in device memory: no synchronisation).
struct KeepMask {
  void* out;                // [numel] contiguous
  int64_t numel;
  const int64_t* seed;      // one element
  uint64_t threshold;
  c10::ScalarType dtype;
};

inline namespace LSTM_FUSED_ISA {
// The elements of Philox block `block`, one in each quarter of the mask (lstm_math.h).
template <typename S>
LSTM_HD inline void keep_mask_store(const KeepMask& p, uint64_t seed, int64_t block) {
  const Philox4 bits = keep_mask_block(seed, static_cast<uint64_t>(block));
  const int64_t quarter = keep_mask_blocks(p.numel);
  S* out = static_cast<S*>(p.out);
  for (int k = 0; k < 4; ++k) {
    const int64_t i = k * quarter + block;
    if (i < p.numel) out[i] = static_cast<S>(bits.word[k] < p.threshold ? 1.0f : 0.0f);
  }
}
}  // namespace LSTM_FUSED_ISA

struct PointwiseKernels {
  void (*forward)(const ForwardStep&);
  void (*backward)(const BackwardStep&);
  void (*gru_forward)(const GruForwardStep&);
  void (*gru_backward)(const GruBackwardStep&);
  void (*keep_mask)(const KeepMask&);
  // The CPU table only: the drivers may run the simd path's one-kernel step (run_recurrent_step,
  // h W_hhᵀ and the pointwise forward together) instead of a GEMM and `forward`.
  bool cpu_simd_step = false;
  // The CPU table only: `backward` sums the columns of BackwardStep::bias_sums / peephole_sums.
  bool column_sums = false;
};

const PointwiseKernels& cpu_kernels();
const PointwiseKernels& cuda_kernels();       // only in CUDA builds
const PointwiseKernels& host_shim_kernels();  // the CUDA kernels, run on the CPU (tests only)

}  // namespace lstm_fused
