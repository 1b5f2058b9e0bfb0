// Explicit AddressSanitizer checks for the SIMD loads and stores of the CPU kernels, compiled only
// in the sanitizer build (LSTM_FUSED_SANITIZE=1 defines LSTM_FUSED_ASAN_CHECKS; `make test-asan`).
// GCC instruments plain loads and stores, but not the masked ones (_mm512_mask_storeu_ps and
// friends, which AVX-512 uses for the tail of a row): an out-of-bounds lane there would go
// unnoticed. LSTM_FUSED_ASAN_CHECK(p, n, is_write) reports any poisoned byte in the n elements
// at p as a regular ASan error (and aborts); elsewhere it compiles to nothing.
#pragma once

#if defined(LSTM_FUSED_ASAN_CHECKS)
#include <cstddef>

#include <sanitizer/asan_interface.h>

namespace lstm_fused {
namespace {
[[gnu::noinline]] void asan_check_region(const void* p, std::size_t bytes, bool is_write) {
  void* bad = __asan_region_is_poisoned(const_cast<void*>(p), bytes);
  if (bad != nullptr) {
    __asan_report_error(__builtin_return_address(0), __builtin_frame_address(0),
                        __builtin_frame_address(0), bad, is_write ? 1 : 0, bytes);
  }
}
}  // namespace
}  // namespace lstm_fused

#define LSTM_FUSED_ASAN_CHECK(p, n, is_write) \
  ::lstm_fused::asan_check_region((p), static_cast<std::size_t>(n) * sizeof(*(p)), (is_write))
#else
#define LSTM_FUSED_ASAN_CHECK(p, n, is_write) ((void)0)
#endif
