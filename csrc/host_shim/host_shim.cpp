// Runs the CUDA kernels of cuda/pointwise_kernels.cuh on the CPU, for tests on machines without
// a GPU: __global__ and __device__ become plain host code, and a launch walks every block and
// thread of the grid in order. The launch geometry can be forced, so tests cover several, and
// every launch is recorded, so tests see the geometry that really ran.
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#define LSTM_FUSED_HOST_SHIM 1
#define __host__
#define __device__
#define __global__

namespace lstm_fused::host_shim {
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
thread_local std::vector<int64_t> launch_log;  // (blocks, threads, thread runs) per launch
}  // namespace lstm_fused::host_shim

using lstm_fused::host_shim::blockDim;
using lstm_fused::host_shim::blockIdx;
using lstm_fused::host_shim::gridDim;
using lstm_fused::host_shim::threadIdx;

namespace lstm_fused {
struct LaunchGeometry;
LaunchGeometry host_shim_geometry(int64_t elements);
}  // namespace lstm_fused

#define LSTM_KERNELS_NAMESPACE host_shim
#define LSTM_GEOMETRY(elements) ::lstm_fused::host_shim_geometry(elements)
#define LSTM_LAUNCH(kernel, geometry, ...)                                   \
  do {                                                                       \
    using namespace ::lstm_fused::host_shim;                                 \
    gridDim = dim3{static_cast<unsigned>((geometry).blocks)};                \
    blockDim = dim3{static_cast<unsigned>((geometry).threads)};              \
    int64_t runs = 0;                                                        \
    for (unsigned b = 0; b < gridDim.x; ++b) {                               \
      for (unsigned t = 0; t < blockDim.x; ++t) {                            \
        blockIdx = dim3{b};                                                  \
        threadIdx = dim3{t};                                                 \
        kernel(__VA_ARGS__);                                                 \
        ++runs;                                                              \
      }                                                                      \
    }                                                                        \
    launch_log.insert(launch_log.end(), {gridDim.x, blockDim.x, runs});      \
  } while (0)

#include "../cuda/pointwise_kernels.cuh"
#include "../ops.h"
#include "host_shim.h"

namespace lstm_fused {

namespace {
thread_local std::optional<LaunchGeometry> forced_geometry;
}

LaunchGeometry host_shim_geometry(int64_t elements) {
  return forced_geometry ? *forced_geometry : pointwise_geometry(elements);
}

const PointwiseKernels& host_shim_kernels() {
  static const PointwiseKernels kernels{host_shim::launch_pointwise_forward,
                                          host_shim::launch_pointwise_backward,
                                          host_shim::launch_gru_forward, host_shim::launch_gru_backward,
                                          host_shim::launch_keep_mask};
  return kernels;
}

ScopedHostShimGeometry::ScopedHostShimGeometry(int64_t blocks, int64_t threads) {
  TORCH_CHECK_VALUE(blocks >= 0 && threads >= 0,
                    "host shim: blocks and threads must be non-negative, got ", blocks, " and ",
                    threads);
  if (blocks > 0 && threads > 0) forced_geometry = LaunchGeometry{blocks, threads};
}

ScopedHostShimGeometry::~ScopedHostShimGeometry() { forced_geometry.reset(); }

std::vector<int64_t> host_shim_take_launches() {
  std::vector<int64_t> launches;
  launches.swap(host_shim::launch_log);
  return launches;
}

}  // namespace lstm_fused

// The shim's ops take the same argument checks as lstm_fused's, before their kernel.
TORCH_LIBRARY_IMPL(lstm_fused_host_shim, BackendSelect, m) {
  lstm_fused::register_argument_checks(m);
}
