#pragma once
#include <cstdint>

namespace lstm_fused {
// While alive, the host shim launches every kernel with this grid (0 = the CUDA default).
struct ScopedHostShimGeometry {
  ScopedHostShimGeometry(int64_t blocks, int64_t threads);
  ~ScopedHostShimGeometry();
};
}  // namespace lstm_fused
