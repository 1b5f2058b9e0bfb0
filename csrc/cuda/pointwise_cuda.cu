// The CUDA pointwise kernels, launched on PyTorch's current stream. No host synchronisation.
// c10/cuda, not ATen/cuda/CUDAContext.h: the stream is all we need, and ATen/cuda pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers, which a bare CUDA toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#define LSTM_KERNELS_NAMESPACE cuda
#define LSTM_GEOMETRY(elements) ::lstm_fused::pointwise_geometry(elements)
#define LSTM_LAUNCH(kernel, geometry, ...)                                          \
  do {                                                                              \
    kernel<<<static_cast<unsigned>((geometry).blocks),                              \
             static_cast<unsigned>((geometry).threads), 0,                          \
             c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);                     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                 \
  } while (0)

#include "pointwise_kernels.cuh"

namespace lstm_fused {

const PointwiseKernels& cuda_kernels() {
  static const PointwiseKernels kernels{cuda::launch_pointwise_forward,
                                          cuda::launch_pointwise_backward,
                                          cuda::launch_gru_forward, cuda::launch_gru_backward,
                                          cuda::launch_keep_mask};
  return kernels;
}

}  // namespace lstm_fused
