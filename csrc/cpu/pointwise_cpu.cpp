// The CPU kernel table: the baseline build of pointwise_cpu_kernels.h, or the AVX2 / AVX-512
// build. The choice follows torch's own (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY=default|avx2|avx512), so ours and ATen's kernels agree, but never beyond
// what the CPU itself reports (cpuid): torch believes ATEN_CPU_CAPABILITY=avx512 even on a CPU
// without AVX-512, where those kernels would die with SIGILL. Then the best build the CPU can run
// is used, with a warning.
//
// torch.ops.lstm_fused.cpu_kernel_isa() says which build runs ("DEFAULT", "AVX2", "AVX512").
// Tests play a smaller CPU with LSTM_FUSED_TEST_CPU_ISA=default|avx2 (read once, at the first
// kernel call): the hardware then reports at most that level, never more than cpuid says.
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include <ATen/Version.h>
#include <torch/library.h>

#include "isa.h"

// GCC's -Wpsabi note on the vector-valued inline functions of lstm_math.h (never an ABI boundary),
// as in target_isa.h for the other builds.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY DEFAULT
#include "pointwise_cpu_kernels.h"
#include "small_gemm_kernels.h"

namespace lstm_fused {

#if LSTM_FUSED_CPU_DISPATCH
namespace AVX2 {
const PointwiseKernels& kernels();
const CpuGemmKernels& gemm_kernels();
}
namespace AVX512 {
const PointwiseKernels& kernels();
const CpuGemmKernels& gemm_kernels();
}
#endif

namespace {

// The kernel builds, in increasing order of what they need.
enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };
constexpr const char* kIsaNames[] = {"DEFAULT", "AVX2", "AVX512"};

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

// Parses torch's capability names ("DEFAULT", "AVX2", "AVX512") and the lower-case values of
// ATEN_CPU_CAPABILITY; anything else (e.g. torch's "ZVECTOR" elsewhere) is the baseline.
Isa parse_isa(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) {
    return static_cast<char>(std::toupper(ch));
  });
  if (name == "AVX512") return Isa::Avx512;
  if (name == "AVX2") return Isa::Avx2;
  return Isa::Default;
}

// What the CPU (and the OS, which must save the wide registers) can run, asked with cpuid: the
// exact feature lists that target_isa.h compiles each build for.
Isa hardware_isa() {
#if LSTM_FUSED_CPU_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  Isa isa = avx512 ? Isa::Avx512 : avx2 ? Isa::Avx2 : Isa::Default;
  // Tests only: play a CPU with fewer features. It can only lower the answer.
  if (const char* simulated = std::getenv("LSTM_FUSED_TEST_CPU_ISA")) {
    isa = std::min(isa, parse_isa(simulated));
  }
  return isa;
#else
  return Isa::Default;
#endif
}

struct Choice {
  Isa isa;
  const PointwiseKernels* kernels;
  const CpuGemmKernels* gemm;
};

const Choice& choice() {
  static const Choice chosen = [] {
    const Isa requested = parse_isa(at::get_cpu_capability());
    const Isa available = hardware_isa();
    const Isa isa = std::min(requested, available);
    if (isa != requested) {
      const char* env = std::getenv("ATEN_CPU_CAPABILITY");
      TORCH_WARN_ONCE("lstm_fused: torch's CPU capability is ", isa_name(requested),
                      env ? " (ATEN_CPU_CAPABILITY=" + std::string(env) + ")" : std::string(),
                      " but this CPU only supports ", isa_name(available),
                      " instructions (cpuid); lstm_fused uses its ", isa_name(isa),
                      " kernels instead.");
    }
#if LSTM_FUSED_CPU_DISPATCH
    if (isa == Isa::Avx512) return Choice{isa, &AVX512::kernels(), &AVX512::gemm_kernels()};
    if (isa == Isa::Avx2) return Choice{isa, &AVX2::kernels(), &AVX2::gemm_kernels()};
#endif
    return Choice{isa, &DEFAULT::kernels(), &DEFAULT::gemm_kernels()};
  }();
  return chosen;
}

std::string cpu_kernel_isa() { return isa_name(choice().isa); }

}  // namespace

const PointwiseKernels& cpu_kernels() { return *choice().kernels; }
// The few-row GEMM kernels of the same build, for gemm.cpp (small_gemm.h).
const bool gemm_kernels_provided =
    provide_cpu_gemm_kernels([]() -> const CpuGemmKernels& { return *choice().gemm; });

// Which build of the CPU kernels runs: "DEFAULT", "AVX2" or "AVX512".
TORCH_LIBRARY_FRAGMENT(lstm_fused, m) { m.def("cpu_kernel_isa() -> str", &cpu_kernel_isa); }

}  // namespace lstm_fused
