#pragma once
#include <cstdint>
#include <vector>

namespace lstm_fused {
// While alive, the host shim launches every kernel with this grid (0 = the CUDA default).
struct ScopedHostShimGeometry {
  ScopedHostShimGeometry(int64_t blocks, int64_t threads);
  ~ScopedHostShimGeometry();
};

// The launches of this thread since the last call, as (blocks, threads, thread runs) triples, and
// forgets them: what the shim really ran, so tests can check the geometry they forced.
std::vector<int64_t> host_shim_take_launches();
}  // namespace lstm_fused
