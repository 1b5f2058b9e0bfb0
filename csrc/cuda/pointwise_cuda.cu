// The CUDA pointwise kernels, launched on PyTorch's current stream. No host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#define LSTM_KERNELS_NAMESPACE cuda
#define LSTM_GEOMETRY(elements) ::lstm_fused::pointwise_geometry(elements)
#define LSTM_LAUNCH(kernel, geometry, ...)                                          \
  do {                                                                              \
    kernel<<<static_cast<unsigned>((geometry).blocks),                              \
             static_cast<unsigned>((geometry).threads), 0,                          \
             at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);                      \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                 \
  } while (0)

#include "pointwise_kernels.cuh"

namespace lstm_fused {

const PointwiseKernels& cuda_kernels() {
  static const PointwiseKernels kernels{cuda::launch_pointwise_forward,
                                          cuda::launch_pointwise_backward};
  return kernels;
}

}  // namespace lstm_fused
