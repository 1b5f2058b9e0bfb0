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

template <typename scalar_t, bool kCoupled, bool kDiagonal, Part kPart>
__global__ void lstm_pointwise_forward_kernel(const ForwardStep p) {
  const int64_t total = p.rows * p.hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    forward_chunk<ScalarIO<scalar_t>, kCoupled, kDiagonal, kPart>(p, idx / p.hidden,
                                                               idx % p.hidden, 1);
  }
}

template <typename scalar_t, bool kCoupled, bool kDiagonal, Part kPart>
__global__ void lstm_pointwise_backward_kernel(const BackwardStep p) {
  const int64_t total = p.rows * p.hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    backward_chunk<ScalarIO<scalar_t>, kCoupled, kDiagonal, kPart>(p, idx / p.hidden,
                                                               idx % p.hidden, 1);
  }
}

inline void launch_pointwise_forward(const ForwardStep& p) {
  const int64_t elements = p.rows * p.hidden;
  if (elements == 0) return;
  const LaunchGeometry geometry = LSTM_GEOMETRY(elements);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_pointwise_forward", [&] {
    variant_switch(p, [&](auto coupled, auto diagonal, auto part) {
      auto* kernel = &lstm_pointwise_forward_kernel<scalar_t, decltype(coupled)::value,
                                                      decltype(diagonal)::value, decltype(part)::value>;
      LSTM_LAUNCH(kernel, geometry, p);
    });
  });
}

inline void launch_pointwise_backward(const BackwardStep& p) {
  const int64_t elements = p.rows * p.hidden;
  if (elements == 0) return;
  const LaunchGeometry geometry = LSTM_GEOMETRY(elements);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "lstm_pointwise_backward", [&] {
    variant_switch(p, [&](auto coupled, auto diagonal, auto part) {
      auto* kernel = &lstm_pointwise_backward_kernel<scalar_t, decltype(coupled)::value,
                                                      decltype(diagonal)::value, decltype(part)::value>;
      LSTM_LAUNCH(kernel, geometry, p);
    });
  });
}

}  // namespace LSTM_KERNELS_NAMESPACE
}  // namespace lstm_fused
