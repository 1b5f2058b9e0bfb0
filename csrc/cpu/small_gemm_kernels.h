// Few-row float32 GEMMs on SIMD registers, compiled once per instruction set next to the
// pointwise kernels (included by pointwise_cpu*.cpp after pointwise_cpu_kernels.h, whose
// includes and namespaces it shares); small_gemm.h describes them.
//
// The weight is read as it is stored ([N, K] rows, as nn.LSTM keeps it), so nothing is packed
// per call: a tile of kRows rows of x (4, then 2 and 1 for the rest) and kLanes / kRows weight
// rows (one SIMD register's width in all: 16 with AVX-512) is computed with one accumulator
// register per output, and the accumulators are then summed across lanes all at once by a tree
// of deinterleave-and-add steps, whose result holds the tile's outputs in order. Each thread gets
// the same blocks at every call of the same shape (at::parallel_for splits a range the same way
// every time), so in a time loop its share of the recurrent weight stays in its core's cache.
// Every output is summed by one thread in a fixed order: results do not depend on the thread
// count (nor on the tile an output falls in).
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

// A tile: out[r0 + i, j0 + j] (+)= dot(x[r0 + i, :], w[j0 + j, :]) for i < kRows and
// j < kWidth = kLanes / kRows (kFull: a full tile, fully unrolled) or j < count (the last, partial
// tile of a column range). Register blocking over rows and weight columns: each weight load
// feeds kRows FMAs, each x load kWidth, into kLanes accumulators, acc[i * kWidth + j] holding
// output (i, j)'s partial sums; sum_lanes then returns the tile's outputs row after row. An
// output's sum (its lanes over k in order, then the fixed tree) is the same whatever its position
// in the tile, so the result does not depend on the row blocking either.
template <int kRows, bool kFull>
void dot_tile(const DotGemm& p, int64_t r0, int64_t j0, int count) {
  constexpr int kWidth = kLanes / kRows;
  const int width = kFull ? kWidth : count;
  const float* w = p.w + j0 * p.w_stride;
  const float* x[kRows];
  for (int i = 0; i < kRows; ++i) x[i] = p.x + (r0 + i) * p.x_stride;
  FloatVec acc[kLanes];
  for (int a = 0; a < kLanes; ++a) acc[a] = FloatVec(0.f);
  int64_t k = 0;
  for (; k + kLanes <= p.k; k += kLanes) {
    FloatVec xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = FloatVec::loadu(x[i] + k);
    for (int j = 0; j < width; ++j) {
      const FloatVec wv = FloatVec::loadu(w + j * p.w_stride + k);
      for (int i = 0; i < kRows; ++i) {
        acc[i * kWidth + j] = at::vec::fmadd(xv[i], wv, acc[i * kWidth + j]);
      }
    }
  }
  if (k < p.k) {  // the last K % kLanes columns (loadu(ptr, n) fills the other lanes with 0)
    const int n = static_cast<int>(p.k - k);
    FloatVec xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = FloatVec::loadu(x[i] + k, n);
    for (int j = 0; j < width; ++j) {
      const FloatVec wv = FloatVec::loadu(w + j * p.w_stride + k, n);
      for (int i = 0; i < kRows; ++i) {
        acc[i * kWidth + j] = at::vec::fmadd(xv[i], wv, acc[i * kWidth + j]);
      }
    }
  }
  if constexpr (kRows == 1) {
    float* out = p.out + r0 * p.out_stride + j0;
    FloatVec sums = sum_lanes(acc);
    if (p.accumulate) sums = sums + FloatVec::loadu(out, width);
    sums.store(out, width);
  } else {
    alignas(64) float sums[kLanes];
    sum_lanes(acc).store(sums);
    for (int i = 0; i < kRows; ++i) {
      float* out = p.out + (r0 + i) * p.out_stride + j0;
      for (int j = 0; j < width; ++j) {
        out[j] = p.accumulate ? out[j] + sums[i * kWidth + j] : sums[i * kWidth + j];
      }
    }
  }
}

// Rows [r0, r0 + kRows) of output columns [j_begin, j_end), in tiles of kLanes / kRows columns.
template <int kRows>
void dot_rows(const DotGemm& p, int64_t r0, int64_t j_begin, int64_t j_end) {
  constexpr int kWidth = kLanes / kRows;
  int64_t j = j_begin;
  for (; j + kWidth <= j_end; j += kWidth) dot_tile<kRows, true>(p, r0, j, kWidth);
  if (j < j_end) dot_tile<kRows, false>(p, r0, j, static_cast<int>(j_end - j));
}

// The widest row block (4 rows where a register holds at least 4 lanes, else 2, else 1).
constexpr int kRowBlock = kLanes >= 4 ? 4 : kLanes >= 2 ? 2 : 1;

// Output columns [j_begin, j_end) of p, every row: per column slice of kLanes (whose weight rows
// then stay in L1 for every row block), rows in blocks of kRowBlock, the rest in 2 and 1.
void dot_columns(const DotGemm& p, int64_t j_begin, int64_t j_end) {
  for (int64_t j = j_begin; j < j_end; j += kLanes) {
    const int64_t j1 = std::min(j_end, j + kLanes);
    int64_t r = 0;
    for (; r + kRowBlock <= p.rows; r += kRowBlock) dot_rows<kRowBlock>(p, r, j, j1);
    if constexpr (kRowBlock > 2) {
      for (; r + 2 <= p.rows; r += 2) dot_rows<2>(p, r, j, j1);
    }
    for (; r < p.rows; ++r) dot_rows<1>(p, r, j, j1);
  }
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
