// CPU pointwise kernels: the shared chunk functions of pointwise.h, run over rows with
// parallel_range (at::parallel_for, or a time loop's thread team) and over hidden units with SIMD
// registers (float/double) or one value at a time in float math (half/bfloat16 storage).
//
// This file is compiled once per instruction set, like ATen's own CPU kernels: the including
// file (pointwise_cpu*.cpp) defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and enables the
// matching instructions, so at::vec::Vectorized is the native SIMD type of that level, and
// everything here lives in lstm_fused::CPU_CAPABILITY (the inline math of lstm_math.h and
// pointwise.h in lstm_fused::LSTM_FUSED_ISA: ../isa_namespace.h). pointwise_cpu.cpp picks one
// build at run time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "../isa_namespace.h"
#include "../thread_team.h"

// SIMD overloads of the activations, visible to the templates of lstm_math.h (declared before
// them, in their namespace).
namespace lstm_fused {
inline namespace LSTM_FUSED_ISA {
template <typename T>
inline at::vec::Vectorized<T> lstm_exp(at::vec::Vectorized<T> x) { return x.exp(); }
// float: exp(x) = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts, so r is exact
// to a few ULP), e^r by its Taylor polynomial of degree 6 (|r| <= ln2 / 2: error below 1.2e-7);
// at most 4 ULP on [-87, 88]. The fused step computes up to three per element; this form takes 12
// vector operations with AVX-512 (scalef multiplies by 2^n and overflows to inf, underflows to 0)
// and 15 with AVX2 (2^n built in the exponent bits, n clamped to the normal range), against 21
// for ATen's 20-ULP exp_u20 with the NaN put back that it loses (the LSTM forward's activations,
// in a loop on a Zen 4: 88 cycles per 16 units against 98; the inference forward at T = 100,
// I = H = 256, B = 16-64: 0.98-0.99x the time, capped at AVX2 0.98x). The clamps keep NaN
// (min/max return their second operand when one is NaN), so a NaN gate stays NaN.
inline at::vec::Vectorized<float> lstm_exp(at::vec::Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX512)
  using Reg = __m512;
  const auto set = [](float v) { return _mm512_set1_ps(v); };
  const Reg v = _mm512_max_ps(set(-104.f), _mm512_min_ps(set(89.f), x));
  const Reg n = _mm512_roundscale_ps(_mm512_mul_ps(v, set(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const auto fma = [](Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); };
  const auto fnma = [](Reg a, Reg b, Reg c) { return _mm512_fnmadd_ps(a, b, c); };
#elif defined(CPU_CAPABILITY_AVX2)
  using Reg = __m256;
  const auto set = [](float v) { return _mm256_set1_ps(v); };
  const Reg v = _mm256_max_ps(set(-87.3f), _mm256_min_ps(set(88.7f), x));  // n in [-126, 128]
  const Reg n = _mm256_round_ps(_mm256_mul_ps(v, set(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const auto fma = [](Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); };
  const auto fnma = [](Reg a, Reg b, Reg c) { return _mm256_fnmadd_ps(a, b, c); };
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  Reg r = fnma(n, set(0.693359375f), v);  // ln 2 = 0.693359375 - 2.12194440e-4 (+ 1e-11)
  r = fnma(n, set(-2.12194440e-4f), r);
  Reg p = fma(set(1.f / 720), r, set(1.f / 120));
  p = fma(p, r, set(1.f / 24));
  p = fma(p, r, set(1.f / 6));
  p = fma(p, r, set(0.5f));
  p = fma(p, r, set(1.f));
  p = fma(p, r, set(1.f));
#endif
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  // 2^n from its exponent bits: n = 128 gives the bits of inf (e^88.38.. is near FLT_MAX).
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
#else
  return at::vec::Vectorized<float>::blendv(x.exp_u20(), x, x.isnan());
#endif
}
template <typename T>
inline at::vec::Vectorized<T> lstm_tanh(at::vec::Vectorized<T> x) { return x.tanh(); }
// float: a rational approximation (odd degree-13 over even degree-6 polynomial, on x clamped to
// +-7.905, where it reaches 1; the form and coefficients of Eigen's fast float tanh), at most
// 3.4e-7 relative error (about 3 ULP) and 4-5 times faster than Sleef's 1-ULP tanh, which took
// most of the pointwise step: the step computes two tanh per element forward, one backward.
// NaN stays NaN (ATen's minimum/maximum propagate it).
inline at::vec::Vectorized<float> lstm_tanh(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  constexpr float kClamp = 7.90531110763549805f;
  x = at::vec::minimum(at::vec::maximum(x, V(-kClamp)), V(kClamp));
  const V x2 = x * x;
  V p = at::vec::fmadd(x2, V(-2.76076847742355e-16f), V(2.00018790482477e-13f));
  p = at::vec::fmadd(x2, p, V(-8.60467152213735e-11f));
  p = at::vec::fmadd(x2, p, V(5.12229709037114e-08f));
  p = at::vec::fmadd(x2, p, V(1.48572235717979e-05f));
  p = at::vec::fmadd(x2, p, V(6.37261928875436e-04f));
  p = at::vec::fmadd(x2, p, V(4.89352455891786e-03f));
  V q = at::vec::fmadd(x2, V(1.19825839466702e-06f), V(1.18534705686654e-04f));
  q = at::vec::fmadd(x2, q, V(2.26843463243900e-03f));
  q = at::vec::fmadd(x2, q, V(4.89352518554385e-03f));
  return x * p / q;
}
// SIMD forms of the clipping helpers of lstm_math.h (clip_state): minimum/maximum propagate NaN.
template <typename T>
inline at::vec::Vectorized<T> lstm_clamp(at::vec::Vectorized<T> x, at::vec::Vectorized<T> bound) {
  return at::vec::minimum(at::vec::maximum(x, at::vec::Vectorized<T>(0) - bound), bound);
}
template <typename T>
inline at::vec::Vectorized<T> lstm_inside_or_zero(at::vec::Vectorized<T> grad,
                                                  at::vec::Vectorized<T> x,
                                                  at::vec::Vectorized<T> bound) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(V(0), grad, (x > V(0) - bound) & (x < bound));
}
}  // namespace LSTM_FUSED_ISA
}  // namespace lstm_fused

#include "../pointwise.h"
#include "asan_check.h"

namespace lstm_fused::CPU_CAPABILITY {

// The IO types and everything instantiated with them have internal linkage, so the copies
// compiled for different instruction sets never meet in the linker.
namespace {

template <typename scalar_t>
struct SimdIO {
  using storage_t = scalar_t;
  using V = at::vec::Vectorized<scalar_t>;
  using Scalar = scalar_t;  // what a row reduction accumulates in
  static constexpr int kWidth = V::size();
  static V load(const scalar_t* p, int n) {
    LSTM_FUSED_ASAN_CHECK(p, n, false);
    return n == kWidth ? V::loadu(p) : V::loadu(p, n);
  }
  static void store(scalar_t* p, V v, int n) {
    LSTM_FUSED_ASAN_CHECK(p, n, true);
    v.store(p, n);
  }
  // A whole aligned register of floats written with a non-temporal store, which does not read the
  // line into the cache first nor keep it there (end_streamed_stores orders it); else a store.
  static void stream(scalar_t* p, V v, int n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (n == kWidth && reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0) {
        LSTM_FUSED_ASAN_CHECK(p, n, true);
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_ps(p, v);
#else
        _mm256_stream_ps(p, v);
#endif
        return;
      }
    }
#endif
    store(p, v, n);
  }
  // *p += v on the first n lanes (a sum kept in the op-math type, which is scalar_t here).
  static void accumulate(Scalar* p, V v, int n) {
    LSTM_FUSED_ASAN_CHECK(p, n, true);
    store(p, load(p, n) + v, n);
  }
  // The first n lanes of v, the others 0 (a partial chunk of a row reduction).
  static V keep(V v, int n) { return n == kWidth ? v : V::set(V(0), v, n); }
  static Scalar total(V v) {
    alignas(64) scalar_t lanes[kWidth];
    v.store(lanes);
    Scalar sum = 0;
    for (int k = 0; k < kWidth; ++k) sum += lanes[k];
    return sum;
  }
};

template <typename scalar_t>
struct ScalarCpuIO : ScalarIO<scalar_t> {};

// Non-temporal stores are weakly ordered: a thread that streamed (SimdIO::stream) fences them
// before its work is done, so a thread that waits for it reads what it wrote.
inline void end_streamed_stores(bool streamed) {
#if defined(__x86_64__) || defined(_M_X64)
  if (streamed) _mm_sfence();
#endif
}

// SIMD for the types Vectorized computes in natively, one value at a time otherwise.
template <typename scalar_t>
using CpuIO = std::conditional_t<std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>,
                                 SimdIO<scalar_t>, ScalarCpuIO<scalar_t>>;

// `streamed`: the chunks may stream (end_streamed_stores).
template <typename Chunk>
void for_each_chunk(int64_t rows, int64_t hidden, int width, const Chunk& chunk,
                    bool streamed = false) {
  // About 32k element-operations per task; each element costs a few dozen flops.
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(hidden, 1));
  parallel_range(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t j = 0; j < hidden; j += width) {
        chunk(row, j, static_cast<int>(std::min<int64_t>(width, hidden - j)));
      }
    }
    end_streamed_stores(streamed);
  });
}

// Layer norm: one task per row (the norm reduces over each gate's H units of the row).
template <typename Row>
void for_each_row(int64_t rows, int64_t hidden, const Row& row_step) {
  const int64_t grain = std::max<int64_t>(1, 256 / std::max<int64_t>(hidden, 1));
  parallel_range(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) row_step(row);
  });
}

void forward_cpu(const ForwardStep& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_forward_cpu", [&] {
    using IO = CpuIO<scalar_t>;
    variant_switch(p, [&](auto coupled, auto diagonal, auto part) {
      if (p.layer_norm) {
        for_each_row(p.rows, p.hidden, [&](int64_t row) {
          layer_norm_forward_row<IO, decltype(coupled)::value, decltype(diagonal)::value,
                                 decltype(part)::value>(p, row);
        });
        return;
      }
      for_each_chunk(p.rows, p.hidden, IO::kWidth, [&](int64_t row, int64_t j, int n) {
        forward_chunk<IO, decltype(coupled)::value, decltype(diagonal)::value,
                      decltype(part)::value>(p, row, j, n);
      }, p.stream_saved);
    });
  });
}

// The backward step with its column sums (BackwardStep::bias_sums, peephole_sums): each task a
// block of units over every row in row order, summing while the dz it wrote is in registers and
// L1; one addition per block and step to the sums.
template <typename IO, bool kCoupled, bool kDiagonal>
void backward_by_units(const BackwardStep& p) {
  using V = typename IO::V;
  using Scalar = typename IO::Scalar;
  using L = GateLayout<kCoupled>;
  const int64_t H = p.hidden, blocks = (H + IO::kWidth - 1) / IO::kWidth;
  parallel_range(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j = block * IO::kWidth;
      const int n = static_cast<int>(std::min<int64_t>(IO::kWidth, H - j));
      ColumnSums<V> sums{{V(0), V(0), V(0), V(0)}, {V(0), V(0), V(0)}};
      for (int64_t row = 0; row < p.rows; ++row) {
        backward_chunk<IO, kCoupled, kDiagonal, Part::All>(p, row, j, n);
        add_column_sums<IO, kCoupled, kDiagonal>(p, row, j, n, sums);
      }
      if (p.bias_sums) {
        for (int g = 0; g < L::kGates; ++g) {
          IO::accumulate(static_cast<Scalar*>(p.bias_sums) + g * H + j, sums.dz[g], n);
        }
      }
      if (kDiagonal && p.peephole_sums) {
        for (int k = 0; k < num_peepholes(kCoupled); ++k) {
          IO::accumulate(static_cast<Scalar*>(p.peephole_sums) + k * H + j, sums.peep[k], n);
        }
      }
    }
  });
}

void backward_cpu(const BackwardStep& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_backward_cpu", [&] {
    using IO = CpuIO<scalar_t>;
    variant_switch(p, [&](auto coupled, auto diagonal, auto part) {
      if (p.bias_sums || p.peephole_sums) {
        TORCH_INTERNAL_ASSERT(decltype(part)::value == Part::All && !p.layer_norm);
        backward_by_units<IO, decltype(coupled)::value, decltype(diagonal)::value>(p);
        return;
      }
      if (p.layer_norm) {
        for_each_row(p.rows, p.hidden, [&](int64_t row) {
          layer_norm_backward_row<IO, decltype(coupled)::value, decltype(diagonal)::value,
                                  decltype(part)::value>(p, row);
        });
        return;
      }
      for_each_chunk(p.rows, p.hidden, IO::kWidth, [&](int64_t row, int64_t j, int n) {
        backward_chunk<IO, decltype(coupled)::value, decltype(diagonal)::value,
                       decltype(part)::value>(p, row, j, n);
      });
    });
  });
}

void gru_forward_cpu(const GruForwardStep& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_gru_forward_cpu", [&] {
    using IO = CpuIO<scalar_t>;
    for_each_chunk(p.rows, p.hidden, IO::kWidth, [&](int64_t row, int64_t j, int n) {
      gru_forward_chunk<IO>(p, row, j, n);
    }, p.stream_saved);
  });
}

void gru_backward_cpu(const GruBackwardStep& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_gru_backward_cpu", [&] {
    using IO = CpuIO<scalar_t>;
    for_each_chunk(p.rows, p.hidden, IO::kWidth, [&](int64_t row, int64_t j, int n) {
      gru_backward_chunk<IO>(p, row, j, n);
    });
  });
}

// Philox4x32-10 (lstm_math.h philox_rounds) on kLanes counters at once, in place: words[k][lane]
// is word k of lane's counter. With AVX2 / AVX-512 the lanes are a register's 32-bit lanes
// (U32Lanes: mullo, xor, and the high half of the products from two even/odd 32x32->64
// multiplies); the baseline build runs them one by one.
#if defined(CPU_CAPABILITY_AVX512)
struct U32Lanes {
  static constexpr int kWidth = 16;
  __m512i v;
  U32Lanes() = default;
  explicit U32Lanes(__m512i x) : v(x) {}
  explicit U32Lanes(uint32_t x) : v(_mm512_set1_epi32(static_cast<int>(x))) {}
  static U32Lanes load(const uint32_t* p) { return U32Lanes(_mm512_loadu_si512(p)); }
  void store(uint32_t* p) const { _mm512_storeu_si512(p, v); }
  U32Lanes operator*(U32Lanes o) const { return U32Lanes(_mm512_mullo_epi32(v, o.v)); }
  U32Lanes operator^(U32Lanes o) const { return U32Lanes(_mm512_xor_si512(v, o.v)); }
};
inline U32Lanes philox_mulhi(U32Lanes a, uint32_t m) {
  const __m512i mm = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a.v, mm), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), mm);
  return U32Lanes(_mm512_mask_blend_epi32(0xAAAA, even, odd));
}
#elif defined(CPU_CAPABILITY_AVX2)
struct U32Lanes {
  static constexpr int kWidth = 8;
  __m256i v;
  U32Lanes() = default;
  explicit U32Lanes(__m256i x) : v(x) {}
  explicit U32Lanes(uint32_t x) : v(_mm256_set1_epi32(static_cast<int>(x))) {}
  static U32Lanes load(const uint32_t* p) {
    return U32Lanes(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  void store(uint32_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  U32Lanes operator*(U32Lanes o) const { return U32Lanes(_mm256_mullo_epi32(v, o.v)); }
  U32Lanes operator^(U32Lanes o) const { return U32Lanes(_mm256_xor_si256(v, o.v)); }
};
inline U32Lanes philox_mulhi(U32Lanes a, uint32_t m) {
  const __m256i mm = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a.v, mm), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), mm);
  return U32Lanes(_mm256_blend_epi32(even, odd, 0xAA));
}
#endif

template <int kLanes>
void philox_lanes(uint32_t (&words)[4][kLanes], uint32_t k0, uint32_t k1) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static_assert(kLanes % U32Lanes::kWidth == 0, "whole registers of lanes");
  for (int lane = 0; lane < kLanes; lane += U32Lanes::kWidth) {
    U32Lanes c[4];
    for (int k = 0; k < 4; ++k) c[k] = U32Lanes::load(&words[k][lane]);
    philox_rounds(c[0], c[1], c[2], c[3], k0, k1);
    for (int k = 0; k < 4; ++k) c[k].store(&words[k][lane]);
  }
#else
  for (int lane = 0; lane < kLanes; ++lane) {
    philox_rounds(words[0][lane], words[1][lane], words[2][lane], words[3][lane], k0, k1);
  }
#endif
}

// Zoneout's keep mask: kLanes Philox blocks at a time (philox_lanes), then the compare.
// Each element depends only on (seed, index): the same mask for any thread count and build.
void keep_mask_cpu(const KeepMask& p) {
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t blocks = keep_mask_blocks(p.numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_keep_mask_cpu", [&] {
    scalar_t* out = static_cast<scalar_t*>(p.out);
    // threshold = 2^32 (p = 1) keeps every unit; below it the compare is on 32 bits.
    const bool keep_all = p.threshold > 0xFFFFFFFFu;
    const uint32_t below = static_cast<uint32_t>(keep_all ? 0 : p.threshold);
    at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
      constexpr int kLanes = 16;
      uint32_t words[4][kLanes];
      for (int64_t first = begin; first < end; first += kLanes) {
        // keep_mask_block for blocks first .. first + kLanes: counters (block, 0, 0) with the
        // block's two halves in the first two words, every round across the lanes.
        for (int lane = 0; lane < kLanes; ++lane) {
          const uint64_t block = static_cast<uint64_t>(first + lane);
          words[0][lane] = static_cast<uint32_t>(block);
          words[1][lane] = static_cast<uint32_t>(block >> 32);
          words[2][lane] = words[3][lane] = 0;
        }
        philox_lanes<kLanes>(words, static_cast<uint32_t>(seed),
                             static_cast<uint32_t>(seed >> 32));
        // Word k of block b is element k * blocks + b: four contiguous runs.
        for (int k = 0; k < 4; ++k) {
          const int64_t start = k * blocks + first;
          const int lanes = static_cast<int>(std::min<int64_t>(
              {kLanes, end - first, std::max<int64_t>(p.numel - start, 0)}));
          if (lanes == 0) continue;  // past the end of the mask (the last quarter is shorter)
          scalar_t* run = out + start;
          for (int lane = 0; lane < lanes; ++lane) {
            run[lane] = static_cast<scalar_t>(keep_all || words[k][lane] < below ? 1.0f : 0.0f);
          }
        }
      }
    });
  });
}

}  // namespace

const PointwiseKernels& kernels() {
  static const PointwiseKernels table{forward_cpu, backward_cpu, gru_forward_cpu,
                                      gru_backward_cpu, keep_mask_cpu, true, true};
  return table;
}

}  // namespace lstm_fused::CPU_CAPABILITY
