// The CPU kernels built for AVX2 + FMA (chosen at run time by pointwise_cpu.cpp). The target
// pragma comes before every include, so all code of this file may use these instructions; the
// kernels have internal linkage, and this file links after the baseline one (see setup.py).
#include "isa.h"
#if LSTM_FUSED_CPU_DISPATCH
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
// The pragma enables the instructions but not the macros that headers (sleef.h) test for them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "pointwise_cpu_kernels.h"
#endif
