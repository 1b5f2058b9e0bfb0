// Turns on an instruction set for the rest of the including file (GCC): the target pragma, and the
// macros that a -m flag would define and that headers test (sleef.h picks its SIMD declarations by
// them; the pragma alone does not define them). Include it before anything else, after defining
// LSTM_FUSED_TARGET_AVX2 or LSTM_FUSED_TARGET_AVX512.
//
// Nothing this file compiles for AVX2 / AVX-512 may reach the baseline build through the linker,
// whatever the link order. Two rules see to that:
// - our inline math gets a namespace of its own (LSTM_FUSED_ISA below, ../isa_namespace.h);
// - the library headers that every build shares (the standard library, c10, ATen's dispatch and
//   parallel helpers, and ours: thread_team.h) are included here, BEFORE the target pragma: GCC compiles a function, and
//   every instantiation of a template, with the target in force where it is defined, so their
//   out-of-line copies in this object are baseline code, as in every other object, and the
//   linker may keep any of them. Inlined into our kernels they still use the new instructions.
//   Only at::vec (its own namespace per instruction set) and our headers come after the pragma.
//   tests/test_cpu_isa.py checks the objects: no externally visible function but the kernel
//   table uses AVX instructions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include "../thread_team.h"

// Two warnings that only these files trigger, both from headers, neither about our code: GCC 12's
// false -W(maybe-)uninitialized on its own `__m256i __Y = __Y;` idiom for undefined vectors, and
// -Wpsabi notes on ATen's vector-returning lambdas (inlined here, never an ABI boundary).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(LSTM_FUSED_TARGET_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define LSTM_FUSED_ISA avx512  // the namespace of the inline math (isa_namespace.h)
#elif defined(LSTM_FUSED_TARGET_AVX2)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define LSTM_FUSED_ISA avx2
#else
#error "define LSTM_FUSED_TARGET_AVX2 or LSTM_FUSED_TARGET_AVX512 before including target_isa.h"
#endif

#if defined(LSTM_FUSED_TARGET_AVX512)
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
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
