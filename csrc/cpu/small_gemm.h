// Few-row float32 GEMMs of our own (small_gemm_kernels.h, one build per instruction set, chosen
// with the pointwise kernels): out[r, j] (+)= sum_k x[r, k] w[j, k], for r < rows, j < n, with the
// weight as it is stored. gemm.cpp offers them as the "simd" path of its measured choice, next to
// ATen, oneDNN and MKL; layer.cpp runs a whole forward step with them.
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

struct ForwardStep;

struct CpuGemmKernels {
  void (*dot)(const DotGemm&);
  // A layer's forward step, float32, peephole none or diagonal: gemm (x = h_{t-1}, w = W_hh,
  // out = z, accumulating) and then step's pointwise forward, per block of hidden units.
  void (*recurrent_step)(const DotGemm& gemm, const ForwardStep& step);
};

// gemm.cpp reaches the kernels through this: pointwise_cpu.cpp provides the build that matches
// the pointwise kernels. The test-only host shim library compiles gemm.cpp without the CPU
// kernels: there nothing provides them and the simd path does not exist.
using CpuGemmKernelsSource = const CpuGemmKernels& (*)();
bool provide_cpu_gemm_kernels(CpuGemmKernelsSource source);

}  // namespace lstm_fused
