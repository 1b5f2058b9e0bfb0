// The CPU kernels built for AVX-512 (F, BW, VL, DQ), chosen at run time by pointwise_cpu.cpp.
// As in pointwise_cpu_avx2.cpp, target_isa.h comes before every other include.
#include "isa.h"
#if LSTM_FUSED_CPU_DISPATCH
#define LSTM_FUSED_TARGET_AVX512
#include "target_isa.h"
#include "pointwise_cpu_kernels.h"
#include "small_gemm_kernels.h"
#endif
