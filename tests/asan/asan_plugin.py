"""pytest plugin of tests/asan/run_asan.sh: fails the session at once unless the lstm_fused._C
imported is the sanitized build of $LSTM_FUSED_ASAN_PKG (not the repository's in-place one) and
the ASan runtime is loaded."""

import os
from pathlib import Path


def check_sanitized_build():
    import lstm_fused._C

    expected = Path(os.environ["LSTM_FUSED_ASAN_PKG"]).resolve()
    loaded = Path(lstm_fused._C.__file__).resolve()
    assert loaded.is_relative_to(expected), f"imported {loaded}, not the sanitized build in {expected}"
    maps = Path("/proc/self/maps").read_text()
    assert "libasan" in maps, "the ASan runtime is not loaded (LD_PRELOAD)"
    print(f"asan: using {loaded}")


def pytest_sessionstart(session):
    check_sanitized_build()
