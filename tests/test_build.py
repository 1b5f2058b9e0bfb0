"""The build: CUDA kernels registered for every op where CUDA can be built, and a forced CPU-only
build that still builds and passes the CPU tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_fused import ops

ROOT = Path(__file__).resolve().parents[1]


def cuda_build_expected():
    return (os.environ.get("LSTM_FUSED_BUILD", "auto") != "cpu" and torch.version.cuda is not None
            and (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()))


def test_every_op_has_a_cpu_kernel_and_schema():
    for name in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{name}", "CPU"), name


@pytest.mark.skipif(not cuda_build_expected(), reason="no CUDA toolkit or CPU-only torch: CPU build")
def test_every_op_has_a_cuda_kernel():
    assert ops.BUILT_WITH_CUDA, "a CUDA toolkit is present but the extension was built CPU-only"
    for name in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{name}", "CUDA"), name


@pytest.mark.slow
def test_forced_cpu_only_build_passes_cpu_tests(tmp_path):
    """LSTM_FUSED_BUILD=cpu builds without nvcc and the CPU cell/shim tests pass against it."""
    for item in ("setup.py", "csrc", "lstm_fused", "tests", "pytest.ini"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, tmp_path / item,
                            ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            shutil.copy(src, tmp_path / item)
    env = dict(os.environ, LSTM_FUSED_BUILD="cpu", MAX_JOBS="2")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], check=False,
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "building the CPU operators only (LSTM_FUSED_BUILD=cpu)" in build.stdout
    assert "nvcc" not in build.stdout
    check = subprocess.run(
        [sys.executable, "-c", ("import lstm_fused, torch; from lstm_fused import ops; "
                                "assert not ops.BUILT_WITH_CUDA; "
                                "assert not torch._C._dispatch_has_kernel_for_dispatch_key("
                                "'lstm_fused::layer_forward', 'CUDA')")],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_cell.py", "tests/test_host_shim.py", "-k", "not compile"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout
