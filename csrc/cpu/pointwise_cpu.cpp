// The CPU kernel table: the baseline build of pointwise_cpu_kernels.h, or the AVX2 / AVX-512
// build when the CPU has them. The choice follows torch's own (at::get_cpu_capability(), which
// honours ATEN_CPU_CAPABILITY=default|avx2|avx512), so ours and ATen's kernels agree.
#include <string>

#include <ATen/Version.h>

#include "isa.h"

#define CPU_CAPABILITY DEFAULT
#include "pointwise_cpu_kernels.h"

namespace lstm_fused {

#if LSTM_FUSED_CPU_DISPATCH
namespace AVX2 {
const PointwiseKernels& kernels();
}
namespace AVX512 {
const PointwiseKernels& kernels();
}
#endif

const PointwiseKernels& cpu_kernels() {
  static const PointwiseKernels& chosen = []() -> const PointwiseKernels& {
#if LSTM_FUSED_CPU_DISPATCH
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return AVX512::kernels();
    if (capability == "AVX2") return AVX2::kernels();
#endif
    return DEFAULT::kernels();
  }();
  return chosen;
}

}  // namespace lstm_fused
