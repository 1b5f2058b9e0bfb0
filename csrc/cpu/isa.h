// Which extra instruction sets the CPU kernels are compiled for. GCC on x86-64 builds AVX2 and
// AVX-512 copies (pointwise_cpu_avx2.cpp, pointwise_cpu_avx512.cpp) next to the baseline one;
// other compilers and architectures build the baseline only.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LSTM_FUSED_CPU_DISPATCH 1
#else
#define LSTM_FUSED_CPU_DISPATCH 0
#endif
