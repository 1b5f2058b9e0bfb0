// The inline namespace of the per-element math (lstm_math.h, pointwise.h): one per instruction
// set the including file is compiled for.
//
// Those headers are made of inline functions, and the CPU kernels compile them three times, into
// objects with different instructions enabled (cpu/pointwise_cpu*.cpp). Inline functions with the
// same mangled name are merged by the linker, which keeps whichever copy comes first: an AVX-512
// copy of, say, lstm_sigmoid<float> could then serve the baseline kernels on a CPU without
// AVX-512. cpu/target_isa.h names the namespace after the instruction set (avx2, avx512), so each
// build's copies have names of their own; every other file (the baseline kernels, the drivers,
// CUDA, the host shim) uses `portable`. (The library headers those builds share are handled in
// cpu/target_isa.h.)
#pragma once

#ifndef LSTM_FUSED_ISA
#define LSTM_FUSED_ISA portable
#endif
