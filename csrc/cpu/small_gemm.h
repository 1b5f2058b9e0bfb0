// Few-row float32 GEMMs of our own (small_gemm_kernels.h, one build per instruction set, chosen
// with the pointwise kernels): out[r, j] (+)= sum_k x[r, k] w[j, k], for r < rows, j < n. Three
// forms: DotGemm reads the weight as it is stored (one-off GEMMs: the LSTMCell step, where
// nothing can be prepared), PanelGemm reads it packed into panels once per call (the time loops'
// repeated GEMMs); and TransposedGemm, aᵀ·b (the weight gradients) or a·b (the input gradient).
// gemm.cpp offers them as the "simd" path of its measured choice, next to ATen, oneDNN and MKL;
// layer.cpp and cell.cpp run a whole forward step with them.
#pragma once

#include <cstdint>

namespace lstm_fused {

struct DotGemm {
  const float* x;  // [rows, k]
  int64_t x_stride;
  int64_t rows;
  int64_t k;
  const float* w;  // [n, k], row stride w_stride, unit column stride
  int64_t w_stride;
  int64_t n;
  float* out;  // [rows, n]
  int64_t out_stride;
  bool accumulate;
};

// The weight [n, k] packed by pack_panels (gemm.cpp) for a SIMD width of `lanes`: its n rows in
// `groups` groups of group_columns (the gates of a recurrent weight), each group in panels of
// `lanes` weight rows (zero rows after the group's last), a panel stored k-major ([k, lanes]), so
// that one SIMD load at k holds w[j, k] for the panel's lanes consecutive outputs j. Panel q of
// group g starts at panels + (g * group_panels + q) * k * lanes, group_panels =
// ceil(group_columns / lanes). Output column of group g's column c: g * group_columns + c.
struct PanelGemm {
  const float* x;  // [rows, k]
  int64_t x_stride;
  int64_t rows;
  int64_t k;
  const float* panels;
  int64_t groups;
  int64_t group_columns;
  float* out;  // [rows, groups * group_columns]
  int64_t out_stride;
  bool accumulate;
  // [groups * group_columns] added to every row after its sum, or null (not with accumulate):
  // the input projection's bias, with no pass of its own over the output.
  const float* bias;
};

// out [m, n] = aᵀ b, the sum over `rows` of outer products of a row of a [rows, m] and a row of
// b [rows, n] (unit column strides): the weight gradients dzᵀ x and dzᵀ h_{t-1}; or, with
// a_transposed, out = a b for a stored as [m, rows] (the input gradient dz W_ih). The rows of b
// are already what the panels above hold for a packed weight (each row's next lanes columns in
// one SIMD load), so b is read as stored.
struct TransposedGemm {
  const float* a;  // a(k, j) = a[k * a_stride + j], or a[j * a_stride + k] if a_transposed
  int64_t a_stride;
  bool a_transposed;
  int64_t m;
  const float* b;
  int64_t b_stride;
  int64_t n;
  int64_t rows;
  float* out;  // [m, n]
  int64_t out_stride;
};

struct ForwardStep;

struct CpuGemmKernels {
  void (*dot)(const DotGemm&);
  void (*panel)(const PanelGemm&);
  void (*transposed)(const TransposedGemm&);
  // A forward step, float32, peephole none or diagonal: gemm (x = h_{t-1}, w = W_hh, out = z,
  // accumulating) and then step's pointwise forward, per block of hidden units; the weight as
  // stored (the cell step) or packed in one panel group per gate (a layer's time loop).
  void (*recurrent_step)(const DotGemm& gemm, const ForwardStep& step);
  void (*recurrent_step_panels)(const PanelGemm& gemm, const ForwardStep& step);
  int panel_lanes;  // the SIMD width the panels are packed for
};

// gemm.cpp reaches the kernels through this: pointwise_cpu.cpp provides the build that matches
// the pointwise kernels. The test-only host shim library compiles gemm.cpp without the CPU
// kernels: there nothing provides them and the simd path does not exist.
using CpuGemmKernelsSource = const CpuGemmKernels& (*)();
bool provide_cpu_gemm_kernels(CpuGemmKernelsSource source);

}  // namespace lstm_fused
