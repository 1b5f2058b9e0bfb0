// Few-row float32 GEMMs on SIMD registers, compiled once per instruction set next to the
// pointwise kernels (included by pointwise_cpu*.cpp after pointwise_cpu_kernels.h, whose
// includes and namespaces it shares); small_gemm.h describes them.
//
// The weight is read as it is stored ([N, K] rows, as nn.LSTM keeps it), so nothing is packed
// per call: a block of one SIMD register's width of weight rows (16 with AVX-512) is multiplied
// with each row of x, one accumulator register per weight row, and the accumulators are then
// summed across lanes all at once by a tree of deinterleave-and-add steps, whose result holds
// the block's outputs in order. Each thread gets the same blocks at every call of the same shape
// (at::parallel_for splits a range the same way every time), so in a time loop its share of the
// recurrent weight stays in its core's cache. Every output is summed by one thread in a fixed
// order: results do not depend on the thread count.
#pragma once

#include "small_gemm.h"

namespace lstm_fused::CPU_CAPABILITY {

namespace {

using FloatVec = at::vec::Vectorized<float>;
constexpr int kLanes = FloatVec::size();

// acc[j] holds partial sums of output j in its lanes; returns {sum(acc[0]), ..., sum(acc[L-1])}.
// Each level halves the vectors: deinterleave2(a, b) puts the even lanes of a then of b in one
// vector and the odd lanes in the other, so their sum keeps every output's partials together.
FloatVec sum_lanes(FloatVec (&acc)[kLanes]) {
  for (int width = kLanes; width > 1; width /= 2) {
    for (int i = 0; i < width / 2; ++i) {
      const auto [even, odd] = at::vec::deinterleave2(acc[2 * i], acc[2 * i + 1]);
      acc[i] = even + odd;
    }
  }
  return acc[0];
}

// out[r, j0 + j] (+)= dot(x[r, :], w[j0 + j, :]) for j < kCount (kCount == kLanes: a full block,
// fully unrolled) or j < count (kCount == 0: the last, partial block).
template <int kCount>
void dot_block(const DotGemm& p, int64_t j0, int count) {
  const int rows_in_block = kCount > 0 ? kCount : count;
  const float* w = p.w + j0 * p.w_stride;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* x = p.x + r * p.x_stride;
    FloatVec acc[kLanes];
    for (int j = 0; j < kLanes; ++j) acc[j] = FloatVec(0.f);
    int64_t k = 0;
    for (; k + kLanes <= p.k; k += kLanes) {
      const FloatVec xv = FloatVec::loadu(x + k);
      for (int j = 0; j < (kCount > 0 ? kCount : rows_in_block); ++j) {
        acc[j] = at::vec::fmadd(xv, FloatVec::loadu(w + j * p.w_stride + k), acc[j]);
      }
    }
    if (k < p.k) {  // the last K % kLanes columns (loadu(ptr, n) fills the other lanes with 0)
      const int n = static_cast<int>(p.k - k);
      const FloatVec xv = FloatVec::loadu(x + k, n);
      for (int j = 0; j < rows_in_block; ++j) {
        acc[j] = at::vec::fmadd(xv, FloatVec::loadu(w + j * p.w_stride + k, n), acc[j]);
      }
    }
    float* out = p.out + r * p.out_stride + j0;
    FloatVec sums = sum_lanes(acc);
    if (p.accumulate) sums = sums + FloatVec::loadu(out, rows_in_block);
    sums.store(out, rows_in_block);
  }
}

// Output columns [j_begin, j_end) of p, in blocks of kLanes from j_begin.
void dot_columns(const DotGemm& p, int64_t j_begin, int64_t j_end) {
  int64_t j = j_begin;
  for (; j + kLanes <= j_end; j += kLanes) dot_block<kLanes>(p, j, kLanes);
  if (j < j_end) dot_block<0>(p, j, static_cast<int>(j_end - j));
}

void dot_gemm(const DotGemm& p) {
  const int64_t blocks = (p.n + kLanes - 1) / kLanes;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    dot_columns(p, begin * kLanes, std::min(p.n, end * kLanes));
  });
}

// One forward step of a layer: z += h_{t-1} W_hhᵀ, then the pointwise forward, split by hidden
// units. A thread takes units [u0, u1): every gate's rows of W_hh for them, then their pointwise
// step, so the step needs one parallel region, and z is activated while it is in the cache.
void recurrent_step(const DotGemm& gemm, const ForwardStep& step) {
  const int64_t H = step.hidden;
  const int gates = num_gates(step.coupled);
  const int64_t blocks = (H + kLanes - 1) / kLanes;
  variant_switch(step, [&](auto coupled, auto diagonal, auto part) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t u0 = begin * kLanes, u1 = std::min(H, end * kLanes);
      for (int g = 0; g < gates; ++g) dot_columns(gemm, g * H + u0, g * H + u1);
      for (int64_t row = 0; row < step.rows; ++row) {
        for (int64_t j = u0; j < u1; j += kLanes) {
          forward_chunk<SimdIO<float>, decltype(coupled)::value, decltype(diagonal)::value,
                        decltype(part)::value>(step, row, j,
                                               static_cast<int>(std::min<int64_t>(kLanes, u1 - j)));
        }
      }
    });
  });
}

}  // namespace

const CpuGemmKernels& gemm_kernels() {
  static const CpuGemmKernels table{dot_gemm, recurrent_step};
  return table;
}

}  // namespace lstm_fused::CPU_CAPABILITY
