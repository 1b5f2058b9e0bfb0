// The CPU kernels built for AVX2 + FMA (chosen at run time by pointwise_cpu.cpp). target_isa.h
// comes before every other include, so all code of this file may use these instructions; the
// kernels have internal linkage, the inline math they use lives in lstm_fused::avx2
// (isa_namespace.h), and what this object shares with others is baseline code (target_isa.h), so
// the link order does not matter.
#include "isa.h"
#if LSTM_FUSED_CPU_DISPATCH
#define LSTM_FUSED_TARGET_AVX2
#include "target_isa.h"
#include "pointwise_cpu_kernels.h"
#include "small_gemm_kernels.h"
#endif
