// The fused pointwise step of an LSTM layer, as plain parameter structs and one chunk function
// per direction, shared by the CPU kernels (SIMD chunks), the CUDA kernels (one element per
// thread) and the host shim that runs the CUDA kernels on the CPU in tests.
//
// A "step" is one time step for `rows` batch rows of `hidden` units. Pointers are raw, strides
// are row strides in elements (the hidden dimension is always contiguous). The kernels never
// allocate and never synchronise: the driver (layer.cpp / cell.cpp) owns all memory.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include "lstm_math.h"

namespace lstm_fused {

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
inline int num_peepholes(bool coupled) { return coupled ? 2 : 3; }

struct ForwardStep {
  const void* z;            // [rows, G*H] gate pre-activations (may alias gates_out)
  int64_t z_stride;
  void* gates_out;          // [rows, G*H] activated gates, saved for backward
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
  c10::ScalarType dtype;
};

struct BackwardStep {
  const void* grad_h;       // [rows, H] gradient of o * tanh(c); null means zero
  int64_t grad_h_stride;
  const void* grad_h2;      // optional second addend of that gradient (recurrent path)
  int64_t grad_h2_stride;
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
  c10::ScalarType dtype;
};

// One value at a time, computed in the op-math type (float for half/bfloat16 storage).
template <typename scalar_t>
struct ScalarIO {
  using storage_t = scalar_t;
  using V = at::opmath_type<scalar_t>;
  static constexpr int kWidth = 1;
  LSTM_HD static V load(const scalar_t* p, int /*n*/) { return static_cast<V>(*p); }
  LSTM_HD static void store(scalar_t* p, V v, int /*n*/) { *p = static_cast<scalar_t>(v); }
};

// Computes the forward step for hidden units [j, j + n) of one row. IO decides how many values
// one V holds (1 on the GPU, a SIMD register on the CPU).
template <typename IO, bool kCoupled, bool kDiagonal>
LSTM_HD inline void forward_chunk(const ForwardStep& p, int64_t row, int64_t j, int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden;

  V w_ci(0), w_cf(0), w_co(0);
  if (kDiagonal) {
    const S* w = static_cast<const S*>(p.weight_ch) + j;
    if (!kCoupled) w_ci = IO::load(w + L::peep_i * H, n);
    w_cf = IO::load(w + L::peep_f * H, n);
    w_co = IO::load(w + L::peep_o * H, n);
  }
  const S* z = static_cast<const S*>(p.z) + row * p.z_stride + j;
  const V c_prev = IO::load(static_cast<const S*>(p.c_prev) + row * p.c_prev_stride + j, n);
  const V z_i = kCoupled ? V(0) : IO::load(z + L::i * H, n);
  const V z_f = IO::load(z + L::f * H, n);
  const V z_g = IO::load(z + L::g * H, n);
  const V z_o = IO::load(z + L::o * H, n);

  Gates<V> gates;
  const V c = cell_update<kCoupled, kDiagonal>(z_i, z_f, z_g, c_prev, w_ci, w_cf, gates);
  const V h = cell_output<kDiagonal>(z_o, c, w_co, gates);

  S* out = static_cast<S*>(p.gates_out) + row * p.gates_stride + j;
  if (!kCoupled) IO::store(out + L::i * H, gates.i, n);
  IO::store(out + L::f * H, gates.f, n);
  IO::store(out + L::g * H, gates.g, n);
  IO::store(out + L::o * H, gates.o, n);
  IO::store(static_cast<S*>(p.c_out) + row * p.c_out_stride + j, c, n);
  if (p.c_state) IO::store(static_cast<S*>(p.c_state) + row * p.c_state_stride + j, c, n);
  IO::store(static_cast<S*>(p.h_out) + row * p.h_out_stride + j, h, n);
  if (p.h_state) IO::store(static_cast<S*>(p.h_state) + row * p.h_state_stride + j, h, n);
}

template <typename IO, bool kCoupled, bool kDiagonal>
LSTM_HD inline void backward_chunk(const BackwardStep& p, int64_t row, int64_t j, int n) {
  using S = typename IO::storage_t;
  using V = typename IO::V;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden;

  V w_ci(0), w_cf(0), w_co(0);
  if (kDiagonal) {
    const S* w = static_cast<const S*>(p.weight_ch) + j;
    if (!kCoupled) w_ci = IO::load(w + L::peep_i * H, n);
    w_cf = IO::load(w + L::peep_f * H, n);
    w_co = IO::load(w + L::peep_o * H, n);
  }
  V dh(0), dc_in(0);
  if (p.grad_h) dh = IO::load(static_cast<const S*>(p.grad_h) + row * p.grad_h_stride + j, n);
  if (p.grad_h2) {
    dh = dh + IO::load(static_cast<const S*>(p.grad_h2) + row * p.grad_h2_stride + j, n);
  }
  if (p.dc_in) dc_in = IO::load(static_cast<const S*>(p.dc_in) + row * p.dc_in_stride + j, n);

  const S* saved = static_cast<const S*>(p.gates) + row * p.gates_stride + j;
  Gates<V> gates;
  gates.f = IO::load(saved + L::f * H, n);
  gates.i = kCoupled ? V(1) - gates.f : IO::load(saved + L::i * H, n);
  gates.g = IO::load(saved + L::g * H, n);
  gates.o = IO::load(saved + L::o * H, n);
  const S* c_prev_row = row < p.c_prev_rows
                            ? static_cast<const S*>(p.c_prev) + row * p.c_prev_stride
                            : static_cast<const S*>(p.c_prev_tail) + row * p.c_prev_tail_stride;
  const V c_prev = IO::load(c_prev_row + j, n);
  const V c = IO::load(static_cast<const S*>(p.c) + row * p.c_stride + j, n);

  V dc(0);
  const V dz_o = output_backward<kDiagonal>(dh, dc_in, c, gates.o, w_co, dc);
  CellGrads<V> grads;
  cell_update_backward<kCoupled, kDiagonal>(dc, c_prev, gates, w_ci, w_cf, grads);

  S* dz = static_cast<S*>(p.grad_z) + row * p.grad_z_stride + j;
  if (!kCoupled) IO::store(dz + L::i * H, grads.dz_i, n);
  IO::store(dz + L::f * H, grads.dz_f, n);
  IO::store(dz + L::g * H, grads.dz_g, n);
  IO::store(dz + L::o * H, dz_o, n);
  IO::store(static_cast<S*>(p.dc_prev_out) + row * p.dc_prev_stride + j, grads.dc_prev, n);
}

// Turns runtime flags into compile-time constants so the hot loops carry no variant branches.
#define LSTM_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                   \
    if (COND) {                           \
      constexpr static bool NAME = true;  \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr static bool NAME = false; \
      return __VA_ARGS__();               \
    }                                     \
  }()

#define LSTM_VARIANT_SWITCH(STEP, ...)                                          \
  LSTM_BOOL_SWITCH((STEP).coupled, kCoupled, [&] {                              \
    return LSTM_BOOL_SWITCH((STEP).peephole == ::lstm_fused::Peephole::Diagonal, \
                            kDiagonal, __VA_ARGS__);                            \
  })

// One kernel table per device; the drivers in cell.cpp and layer.cpp are device-generic.
struct PointwiseKernels {
  void (*forward)(const ForwardStep&);
  void (*backward)(const BackwardStep&);
};

const PointwiseKernels& cpu_kernels();
const PointwiseKernels& cuda_kernels();       // only in CUDA builds
const PointwiseKernels& host_shim_kernels();  // the CUDA kernels, run on the CPU

}  // namespace lstm_fused
