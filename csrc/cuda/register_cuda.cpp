// CUDA kernels of the lstm_fused operators (built only when a CUDA toolkit is present). The
// drivers are the device-generic ones; only the pointwise kernel table differs. Every op runs
// inside an NVTX range named like its profiler label (lstm_fused::<op>), so Nsight Systems shows
// which op launched which GEMMs and pointwise kernels. NVTX 3 is header-only: with no tool
// attached a range costs a null function-pointer check.
#include <nvtx3/nvToolsExt.h>
#include <torch/library.h>

#include "../register.h"

namespace lstm_fused {

namespace {

class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

template <const char* kName, auto kOp>
struct WithNvtxRange;

template <const char* kName, typename R, typename... Args, R (*kOp)(Args...)>
struct WithNvtxRange<kName, kOp> {
  static R call(Args... args) {
    const NvtxRange range(kName);
    return kOp(args...);
  }
};

using Cuda = DeviceOps<cuda_kernels>;
constexpr char kCellForward[] = "lstm_fused::cell_forward";
constexpr char kCellBackward[] = "lstm_fused::cell_backward";
constexpr char kLayerForward[] = "lstm_fused::layer_forward";
constexpr char kLayerBackward[] = "lstm_fused::layer_backward";
constexpr char kCellStep[] = "lstm_fused::cell_step";
constexpr char kGruLayerForward[] = "lstm_fused::gru_layer_forward";
constexpr char kGruLayerBackward[] = "lstm_fused::gru_layer_backward";
constexpr char kGruCellStep[] = "lstm_fused::gru_cell_step";
constexpr char kKeepMask[] = "lstm_fused::keep_mask";

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("cell_forward", &WithNvtxRange<kCellForward, &Cuda::cell_forward>::call);
  m.impl("cell_backward", &WithNvtxRange<kCellBackward, &Cuda::cell_backward>::call);
  m.impl("layer_forward", &WithNvtxRange<kLayerForward, &Cuda::layer_forward>::call);
  m.impl("layer_backward", &WithNvtxRange<kLayerBackward, &Cuda::layer_backward>::call);
  m.impl("cell_step", &WithNvtxRange<kCellStep, &Cuda::cell_step>::call);
  m.impl("gru_layer_forward", &WithNvtxRange<kGruLayerForward, &Cuda::gru_layer_forward>::call);
  m.impl("gru_layer_backward",
         &WithNvtxRange<kGruLayerBackward, &Cuda::gru_layer_backward>::call);
  m.impl("gru_cell_step", &WithNvtxRange<kGruCellStep, &Cuda::gru_cell_step>::call);
  m.impl("keep_mask", &WithNvtxRange<kKeepMask, &Cuda::keep_mask>::call);
}

}  // namespace lstm_fused
