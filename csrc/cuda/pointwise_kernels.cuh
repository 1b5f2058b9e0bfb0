// CUDA pointwise kernels and their launchers. This file is compiled twice: by nvcc for the GPU
// (pointwise_cuda.cu) and by the host compiler for the test shim (host_shim/host_shim.cpp),
// which defines __global__/__device__ away and runs every block and thread in a loop. The
// including file defines LSTM_LAUNCH(kernel, geometry, args...), LSTM_GEOMETRY(elements) and
// LSTM_KERNELS_NAMESPACE: the kernels and launchers of the two builds live in different namespaces
// (lstm_fused::cuda, lstm_fused::host_shim), so the linker can never mistake one for the other.
//
// Kernels are grid-stride loops over rows * hidden elements with no block-level barriers, so any
// launch geometry is correct and the shim can run them thread by thread.
#pragma once

#include <algorithm>

#include <ATen/Dispatch.h>

#include "../pointwise.h"

namespace lstm_fused {

struct LaunchGeometry {
  int64_t blocks;
  int64_t threads;
};

inline LaunchGeometry pointwise_geometry(int64_t elements) {
  constexpr int64_t kThreads = 256;
  constexpr int64_t kMaxBlocks = 65535;
  const int64_t blocks = std::min<int64_t>((elements + kThreads - 1) / kThreads, kMaxBlocks);
  return {std::max<int64_t>(blocks, 1), kThreads};
}

namespace LSTM_KERNELS_NAMESPACE {

// The variant a kernel is instantiated for, as a named type: profilers (Nsight Systems/Compute,
// torch.profiler) show template arguments, and `lstm_fused_pointwise_forward<c10::Half,
// coupled_diagonal_peephole>` says what runs where `<c10::Half, true, true, (Part)0>` would not.
template <bool kCoupled, bool kDiagonal, Part kPart>
struct NamedVariant;

#define LSTM_FUSED_NAMED_VARIANT(name, coupled, diagonal, part)  \
  struct name {                                                  \
    static constexpr bool kCoupled = coupled;                    \
    static constexpr bool kDiagonal = diagonal;                  \
    static constexpr Part kPart = part;                          \
  };                                                             \
  template <>                                                    \
  struct NamedVariant<coupled, diagonal, part> {                 \
    using type = name;                                           \
  }

// Full peepholes run each step as two kernels around a GEMM (see Part in pointwise.h).
LSTM_FUSED_NAMED_VARIANT(standard, false, false, Part::All);
LSTM_FUSED_NAMED_VARIANT(standard_diagonal_peephole, false, true, Part::All);
LSTM_FUSED_NAMED_VARIANT(standard_full_peephole_update, false, false, Part::Update);
LSTM_FUSED_NAMED_VARIANT(standard_full_peephole_output, false, false, Part::Output);
LSTM_FUSED_NAMED_VARIANT(coupled, true, false, Part::All);
LSTM_FUSED_NAMED_VARIANT(coupled_diagonal_peephole, true, true, Part::All);
LSTM_FUSED_NAMED_VARIANT(coupled_full_peephole_update, true, false, Part::Update);
LSTM_FUSED_NAMED_VARIANT(coupled_full_peephole_output, true, false, Part::Output);
#undef LSTM_FUSED_NAMED_VARIANT

// One time step of the fused LSTM pointwise math for `rows` x `hidden` elements: activations,
// peepholes, cell update and output (forward); their gradients (backward).
template <typename scalar_t, typename Variant>
__global__ void lstm_fused_pointwise_forward(const ForwardStep p) {
  const int64_t total = p.rows * p.hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    forward_chunk<ScalarIO<scalar_t>, Variant::kCoupled, Variant::kDiagonal, Variant::kPart>(
        p, idx / p.hidden, idx % p.hidden, 1);
  }
}

template <typename scalar_t, typename Variant>
__global__ void lstm_fused_pointwise_backward(const BackwardStep p) {
  const int64_t total = p.rows * p.hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    backward_chunk<ScalarIO<scalar_t>, Variant::kCoupled, Variant::kDiagonal, Variant::kPart>(
        p, idx / p.hidden, idx % p.hidden, 1);
  }
}

// Layer norm: one thread per row (the norm reduces over each gate's H units of the row), a
// grid-stride loop over rows; correct for any geometry, not tuned (a warp per row and gate would
// use the GPU better).
template <typename scalar_t, typename Variant>
__global__ void lstm_fused_layer_norm_forward(const ForwardStep p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows;
       row += stride) {
    layer_norm_forward_row<ScalarIO<scalar_t>, Variant::kCoupled, Variant::kDiagonal,
                           Variant::kPart>(p, row);
  }
}

template <typename scalar_t, typename Variant>
__global__ void lstm_fused_layer_norm_backward(const BackwardStep p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows;
       row += stride) {
    layer_norm_backward_row<ScalarIO<scalar_t>, Variant::kCoupled, Variant::kDiagonal,
                            Variant::kPart>(p, row);
  }
}

// One GRU time step (lstm_math.h gru_update), one element per thread like the LSTM's.
template <typename scalar_t>
__global__ void lstm_fused_gru_forward(const GruForwardStep p) {
  const int64_t total = p.rows * p.hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    gru_forward_chunk<ScalarIO<scalar_t>>(p, idx / p.hidden, idx % p.hidden, 1);
  }
}

template <typename scalar_t>
__global__ void lstm_fused_gru_backward(const GruBackwardStep p) {
  const int64_t total = p.rows * p.hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    gru_backward_chunk<ScalarIO<scalar_t>>(p, idx / p.hidden, idx % p.hidden, 1);
  }
}

inline void launch_gru_forward(const GruForwardStep& p) {
  const int64_t elements = p.rows * p.hidden;
  if (elements == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_gru_forward", [&] {
    auto* kernel = &lstm_fused_gru_forward<scalar_t>;
    LSTM_LAUNCH(kernel, LSTM_GEOMETRY(elements), p);
  });
}

inline void launch_gru_backward(const GruBackwardStep& p) {
  const int64_t elements = p.rows * p.hidden;
  if (elements == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_gru_backward", [&] {
    auto* kernel = &lstm_fused_gru_backward<scalar_t>;
    LSTM_LAUNCH(kernel, LSTM_GEOMETRY(elements), p);
  });
}

// Zoneout's keep mask, one Philox block (four elements) per thread; the key read on the device.
template <typename scalar_t>
__global__ void lstm_fused_keep_mask(const KeepMask p) {
  const int64_t blocks = keep_mask_blocks(p.numel);
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       block < blocks; block += stride) {
    keep_mask_store<scalar_t>(p, seed, block);
  }
}

inline void launch_keep_mask(const KeepMask& p) {
  const int64_t blocks = keep_mask_blocks(p.numel);
  if (blocks == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_fused_keep_mask", [&] {
    auto* kernel = &lstm_fused_keep_mask<scalar_t>;
    LSTM_LAUNCH(kernel, LSTM_GEOMETRY(blocks), p);
  });
}

// The named variant of variant_switch's integral_constant arguments.
template <typename Coupled, typename Diagonal, typename PartOf>
using VariantOf = typename NamedVariant<Coupled::value, Diagonal::value, PartOf::value>::type;

inline void launch_pointwise_forward(const ForwardStep& p) {
  const int64_t elements = p.rows * p.hidden;
  if (elements == 0) return;
  const LaunchGeometry geometry = LSTM_GEOMETRY(elements);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_pointwise_forward", [&] {
    variant_switch(p, [&](auto is_coupled, auto is_diagonal, auto part) {
      using Variant = VariantOf<decltype(is_coupled), decltype(is_diagonal), decltype(part)>;
      if (p.layer_norm) {
        auto* kernel = &lstm_fused_layer_norm_forward<scalar_t, Variant>;
        LSTM_LAUNCH(kernel, LSTM_GEOMETRY(p.rows), p);
        return;
      }
      auto* kernel = &lstm_fused_pointwise_forward<scalar_t, Variant>;
      LSTM_LAUNCH(kernel, geometry, p);
    });
  });
}

inline void launch_pointwise_backward(const BackwardStep& p) {
  const int64_t elements = p.rows * p.hidden;
  if (elements == 0) return;
  const LaunchGeometry geometry = LSTM_GEOMETRY(elements);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_pointwise_backward", [&] {
    variant_switch(p, [&](auto is_coupled, auto is_diagonal, auto part) {
      using Variant = VariantOf<decltype(is_coupled), decltype(is_diagonal), decltype(part)>;
      if (p.layer_norm) {
        auto* kernel = &lstm_fused_layer_norm_backward<scalar_t, Variant>;
        LSTM_LAUNCH(kernel, LSTM_GEOMETRY(p.rows), p);
        return;
      }
      auto* kernel = &lstm_fused_pointwise_backward<scalar_t, Variant>;
      LSTM_LAUNCH(kernel, geometry, p);
    });
  });
}

}  // namespace LSTM_KERNELS_NAMESPACE
}  // namespace lstm_fused
