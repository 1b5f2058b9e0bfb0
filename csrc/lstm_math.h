// Per-element LSTM math, written once and shared by the CPU kernels (scalar and SIMD) and the
// CUDA kernels (device code, and the same kernels run on the host by the test shim).
//
// Everything here is templated on a value type V that only needs +, -, * and the two
// activations below; V is float/double on the GPU and in scalar CPU code, and
// at::vec::Vectorized<float|double> in the SIMD CPU code (whose lstm_exp/lstm_tanh overloads are
// in cpu/pointwise_cpu_kernels.h).
//
// Notation (docs/design.md section 1): z_* are gate pre-activations with everything that comes
// from a GEMM already added (W_ih x + b_ih + W_hh h + b_hh, and for "full" peepholes the
// W_c* c terms); w_c* are the diagonal peephole weights for one hidden unit.
#pragma once

#include <cmath>
#include <cstdint>

#include "isa_namespace.h"

#if defined(__CUDACC__) || defined(LSTM_FUSED_HOST_SHIM)
#define LSTM_HD __host__ __device__
#else
#define LSTM_HD
#endif

namespace lstm_fused {

// How the gates see the cell state. Full peepholes enter the pre-activations through GEMMs,
// so the pointwise math only distinguishes "diagonal" from "no per-element peephole term".
enum class Peephole : int { None = 0, Diagonal = 1, Full = 2 };

// The functions below are compiled into every kernel build, some with AVX2 / AVX-512 enabled;
// the inline namespace gives each build its own copies (see isa_namespace.h).
inline namespace LSTM_FUSED_ISA {

// Scalar activations. expf/tanhf are the C functions that exist both on the host and in CUDA
// device code, so this header needs no device-specific branches.
LSTM_HD inline float lstm_exp(float x) { return expf(x); }
LSTM_HD inline double lstm_exp(double x) { return exp(x); }
LSTM_HD inline float lstm_tanh(float x) { return tanhf(x); }
LSTM_HD inline double lstm_tanh(double x) { return tanh(x); }

template <typename V>
LSTM_HD inline V lstm_sigmoid(V x) {
  return V(1) / (V(1) + lstm_exp(V(0) - x));
}

// Activated gates of one hidden unit. For coupled (CIFG) cells i is 1 - f and is not stored.
template <typename V>
struct Gates {
  V i, f, g, o;
};

// Forward, part 1: input/forget/cell gates and the new cell state.
//   f = sigmoid(z_f + w_cf c_prev);  i = coupled ? 1 - f : sigmoid(z_i + w_ci c_prev)
//   g = tanh(z_g);                   c = f c_prev + i g
template <bool kCoupled, bool kDiagonal, typename V>
LSTM_HD inline V cell_update(V z_i, V z_f, V z_g, V c_prev, V w_ci, V w_cf, Gates<V>& gates) {
  gates.f = lstm_sigmoid(kDiagonal ? z_f + w_cf * c_prev : z_f);
  if (kCoupled) {
    gates.i = V(1) - gates.f;
  } else {
    gates.i = lstm_sigmoid(kDiagonal ? z_i + w_ci * c_prev : z_i);
  }
  gates.g = lstm_tanh(z_g);
  return gates.f * c_prev + gates.i * gates.g;
}

// Forward, part 2: the output gate sees the NEW cell state.
//   o = sigmoid(z_o + w_co c);  returns h = o tanh(c)   (before any projection)
template <bool kDiagonal, typename V>
LSTM_HD inline V cell_output(V z_o, V c, V w_co, Gates<V>& gates) {
  gates.o = lstm_sigmoid(kDiagonal ? z_o + w_co * c : z_o);
  return gates.o * lstm_tanh(c);
}

// Gradients with respect to the gate pre-activations (z_*) and the previous cell state.
template <typename V>
struct CellGrads {
  V dz_i, dz_f, dz_g, dz_o, dc_prev;
};

// Backward, part 1: output gate. dh is the gradient of o tanh(c); dc_in the gradient that
// reaches c from later steps (or from c_n). Returns dz_o and adds to dc every path through c:
//   dc = dc_in + dh o (1 - tanh(c)^2) + w_co dz_o
// (for full peepholes the W_co^T dz_o term is added by a GEMM between part 1 and part 2).
template <bool kDiagonal, typename V>
LSTM_HD inline V output_backward(V dh, V dc_in, V c, V o, V w_co, V& dc) {
  const V tanh_c = lstm_tanh(c);
  const V dz_o = dh * tanh_c * o * (V(1) - o);
  dc = dc_in + dh * o * (V(1) - tanh_c * tanh_c);
  if (kDiagonal) dc = dc + w_co * dz_o;
  return dz_o;
}

// Backward, part 2: from dc (total gradient of c) to dz_i, dz_f, dz_g and dc_prev.
// Coupled: i = 1 - f, so the input-gate path reaches z_f with a minus sign.
template <bool kCoupled, bool kDiagonal, typename V>
LSTM_HD inline void cell_update_backward(V dc, V c_prev, const Gates<V>& gates, V w_ci, V w_cf,
                                         CellGrads<V>& grads) {
  const V di = dc * gates.g;
  const V df = dc * c_prev;
  grads.dz_g = dc * gates.i * (V(1) - gates.g * gates.g);
  if (kCoupled) {
    grads.dz_i = V(0);
    grads.dz_f = (df - di) * gates.f * (V(1) - gates.f);
  } else {
    grads.dz_i = di * gates.i * (V(1) - gates.i);
    grads.dz_f = df * gates.f * (V(1) - gates.f);
  }
  grads.dc_prev = dc * gates.f;
  if (kDiagonal) {
    grads.dc_prev = grads.dc_prev + w_cf * grads.dz_f;
    if (!kCoupled) grads.dc_prev = grads.dc_prev + w_ci * grads.dz_i;
  }
}


// State clipping (TensorFlow LSTMCell's cell_clip; proj_clip is the same on the projected h):
//   c_t <- clip(c_t, -cell_clip, cell_clip)        after the update, when cell_clip > 0
// The clipped value is the state: the output gate's peephole, tanh(c_t), h_t and the next step
// all see it. Backward: the gradient reaches the unclipped c_t only where the clip is inactive,
//   dc_raw = dc if -cell_clip < c_t < cell_clip else 0     (c_t the clipped value)
// so a value at the bound counts as clipped. NaN passes through both (torch.clamp's behaviour).
LSTM_HD inline float lstm_clamp(float x, float bound) {
  return x < -bound ? -bound : (x > bound ? bound : x);
}
LSTM_HD inline double lstm_clamp(double x, double bound) {
  return x < -bound ? -bound : (x > bound ? bound : x);
}
LSTM_HD inline float lstm_inside_or_zero(float grad, float x, float bound) {
  return x > -bound && x < bound ? grad : 0.0f;
}
LSTM_HD inline double lstm_inside_or_zero(double grad, double x, double bound) {
  return x > -bound && x < bound ? grad : 0.0;
}

template <typename V>
LSTM_HD inline V clip_state(V c, V bound) {
  return lstm_clamp(c, bound);
}

template <typename V>
LSTM_HD inline V clip_state_backward(V dc, V clipped_c, V bound) {
  return lstm_inside_or_zero(dc, clipped_c, bound);
}

// Zoneout (Krueger et al. 2016): a unit keeps its previous value with probability p,
//   s_t = m s_{t-1} + (1 - m) s~_t              for s = c (with m_c) and s = h (with m_h)
// where s~_t is the value the step computed (after the clips: the mix of two in-range values stays
// in range) and m the unit's "keep" value: a 0/1 Bernoulli(p) mask in training, the rate p itself
// in eval (the expectation). The gates and h~_t = o tanh(c~_t) of step t see the unzoned c~_t; the
// zoned s_t is the carried state and the output. Written as a sum of two products so that m = 1
// gives s_{t-1} exactly and m = 0 gives s~_t exactly. Backward, with ds_t the gradient of the
// zoned value:
//   ds~_t = (1 - m) ds_t           ds_{t-1} += m ds_t
template <typename V>
LSTM_HD inline V zoneout(V previous, V computed, V keep) {
  return keep * previous + (V(1) - keep) * computed;
}

// The gradient ds_t of a zoned value split between its two sources: returns the part of the
// computed value s~_t, (1 - m) ds_t, and sets `to_previous` to m ds_t (the part of s_{t-1}).
template <typename V>
LSTM_HD inline V zoneout_backward(V grad, V keep, V& to_previous) {
  to_previous = keep * grad;
  return (V(1) - keep) * grad;
}

// Layer normalisation of the gates (issue 22; TFLite's per-gate form, as Lingvo's
// LayerNormalizedLSTMCellSimple). For each gate k of one row, over its H units:
//   v_k   = W_ih,k x_t + W_hh,k h_{t-1} + p_k          pre-norm; p_k the gate's peephole term
//                                                      (p_i, p_f of c_{t-1}, p_o of the new c_t)
//   mean  = (1/H) sum_j v_kj,  var = (1/H) sum_j (v_kj - mean)^2     (biased variance)
//   rstd  = 1 / sqrt(var + eps)
//   x̂_kj  = (v_kj - mean) rstd
//   ẑ_kj  = γ_kj x̂_kj + b_kj     b = b_ih,k + b_hh,k, added AFTER the norm (it is its shift)
// ẑ then enters the gate activations above with no peephole term (p_k is inside v_k).
// Backward, from dẑ (the gradient of ẑ) of one gate of one row:
//   dγ_kj += dẑ_kj x̂_kj,   db_kj += dẑ_kj                      (summed over rows and steps)
//   a = (1/H) sum_j γ_kj dẑ_kj,   m = (1/H) sum_j γ_kj dẑ_kj x̂_kj
//   dv_kj = rstd (γ_kj dẑ_kj - a - x̂_kj m)
// The statistics are scalars per (row, gate), accumulated in the op-math type (float for
// half/bfloat16 storage); the per-element parts below take any V.
LSTM_HD inline float lstm_rsqrt(float x) { return 1.0f / sqrtf(x); }
LSTM_HD inline double lstm_rsqrt(double x) { return 1.0 / sqrt(x); }

template <typename T>
LSTM_HD inline T layer_norm_rstd(T sum_squares, T count, T eps) {
  return lstm_rsqrt(sum_squares / count + eps);
}

// x̂ = (v - mean) rstd
template <typename V>
LSTM_HD inline V layer_norm_normalize(V v, V mean, V rstd) {
  return (v - mean) * rstd;
}

// ẑ = γ x̂ + b
template <typename V>
LSTM_HD inline V layer_norm_affine(V normed, V gamma, V shift) {
  return gamma * normed + shift;
}

// dv = rstd (γ dẑ - a - x̂ m), with a and m the row means above.
template <typename V>
LSTM_HD inline V layer_norm_backward(V gamma_grad, V normed, V rstd, V mean_grad,
                                     V mean_grad_normed) {
  return rstd * (gamma_grad - mean_grad - normed * mean_grad_normed);
}

// --- GRU (issue 24): PyTorch's and cuDNN's form, gate blocks (r, z, n) --------------------------
// With a_k = W_ik x_t + b_ik (the input projection, one GEMM for all steps) and
//      b_k = W_hk h_{t-1} + b_hk (the step's recurrent GEMM, b_hh added by the kernel):
//   r = sigmoid(a_r + b_r),  z = sigmoid(a_z + b_z)
//   n = tanh(a_n + r b_n)                the reset gate multiplies AFTER W_hn h_{t-1} + b_hn
//   h_t = (1 - z) n + z h_{t-1}           (computed as n + z (h_{t-1} - n))
template <typename V>
struct GruGates {
  V r, z, n;
};

template <typename V>
LSTM_HD inline V gru_update(V a_r, V a_z, V a_n, V b_r, V b_z, V b_n, V h_prev,
                            GruGates<V>& gates) {
  gates.r = lstm_sigmoid(a_r + b_r);
  gates.z = lstm_sigmoid(a_z + b_z);
  gates.n = lstm_tanh(a_n + gates.r * b_n);
  return gates.n + gates.z * (h_prev - gates.n);
}

// Gradients of the GRU step. da_k is the gradient of a_k (the input projection's rows), db_k of
// b_k (the recurrent GEMM's rows); they differ only in the n block, db_n = r da_n.
template <typename V>
struct GruGrads {
  V da_r, da_z, da_n, db_n, dh_prev;
};

// Backward of gru_update, from dh (the total gradient of h_t):
//   dn = dh (1 - z),  dz = dh (h_{t-1} - n),  dh_{t-1} = dh z   (the driver's GEMM adds db W_hh)
//   da_n = dn (1 - n^2),  db_n = r da_n,  dr = b_n da_n
//   da_r = db_r = dr r (1 - r),  da_z = db_z = dz z (1 - z)
template <typename V>
LSTM_HD inline void gru_update_backward(V dh, V h_prev, V b_n, const GruGates<V>& gates,
                                        GruGrads<V>& grads) {
  const V dn = dh * (V(1) - gates.z);
  const V dz = dh * (h_prev - gates.n);
  grads.dh_prev = dh * gates.z;
  grads.da_n = dn * (V(1) - gates.n * gates.n);
  grads.db_n = gates.r * grads.da_n;
  grads.da_r = b_n * grads.da_n * gates.r * (V(1) - gates.r);
  grads.da_z = dz * gates.z * (V(1) - gates.z);
}

// --- zoneout's keep masks: a counter-based generator ------------------------------------------
// Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011; the generator of cuRAND and of torch's CUDA random ops): four 32-bit words from a
// 128-bit counter c and a 64-bit key k, ten rounds of
//   (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)),
//   k <- k + (W0, W1) between rounds,
// with M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85. Every word depends only
// on (counter, key): any thread, SIMD lane or device computes element i's word alone, so a mask
// is the same on every CPU build, on the GPU and for any thread count.
struct Philox4 {
  uint32_t word[4];
};
constexpr int kPhiloxRounds = 10;

// The high 32 bits of the 64-bit product a m (the low ones are a * m in uint32_t). U is
// uint32_t here; the CPU's SIMD build overloads it for registers of 32-bit lanes
// (cpu/pointwise_cpu_kernels.h), whose *, ^ and broadcast from uint32_t are the lanes'.
LSTM_HD inline uint32_t philox_mulhi(uint32_t a, uint32_t m) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * m) >> 32);
}

// One round on counter (c0, c1, c2, c3) with round key (k0, k1).
template <typename U>
LSTM_HD inline void philox_round(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  const U n0 = philox_mulhi(c2, kM1) ^ c1 ^ U(k0);
  const U n2 = philox_mulhi(c0, kM0) ^ c3 ^ U(k1);
  c1 = c2 * U(kM1), c3 = c0 * U(kM0), c0 = n0, c2 = n2;
}
// The key of round r + 1 from that of round r.
LSTM_HD inline void philox_next_key(uint32_t& k0, uint32_t& k1) {
  k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
}

// All ten rounds on a counter in place, from key (k0, k1): one counter (U = uint32_t) or a
// register of counters (the CPU's SIMD lanes).
template <typename U>
LSTM_HD inline void philox_rounds(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) philox_next_key(k0, k1);
    philox_round(c0, c1, c2, c3, k0, k1);
  }
}

LSTM_HD inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
  philox_rounds(c0, c1, c2, c3, k0, k1);
  return {{c0, c1, c2, c3}};
}

// A keep mask of n elements drawn with key `seed`: Q = ceil(n / 4) blocks, and element i is word
// i / Q of the block at counter (i % Q as two 32-bit halves, 0, 0), so each word fills a
// contiguous quarter of the mask; kept (1) when the word is below `threshold` = round(p 2^32),
// so P(keep) = p to within 2^-33.
LSTM_HD inline uint64_t keep_threshold(double p) {
  return static_cast<uint64_t>(p * 4294967296.0 + 0.5);
}
LSTM_HD inline int64_t keep_mask_blocks(int64_t numel) { return (numel + 3) / 4; }
LSTM_HD inline Philox4 keep_mask_block(uint64_t seed, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace LSTM_FUSED_ISA
}  // namespace lstm_fused
