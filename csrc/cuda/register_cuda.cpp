// CUDA kernels of the lstm_fused operators (built only when a CUDA toolkit is present). The
// drivers are the device-generic ones; only the pointwise kernel table differs.
#include <torch/library.h>

#include "../register.h"

namespace lstm_fused {
TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) { LSTM_FUSED_IMPL_ALL(m, DeviceOps<cuda_kernels>); }
}  // namespace lstm_fused
