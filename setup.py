"""Builds lstm_fused._C: the C++ CPU operators always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present. The package metadata is in pyproject.toml; install with pip
(`pip install --no-build-isolation -e .`, what `make build` runs; see the README).

Environment switches:
  LSTM_FUSED_BUILD=auto|cpu|cuda   auto (default) builds CUDA when it can; cpu never; cuda must.
  TORCH_CUDA_ARCH_LIST             GPU architectures. Unset: Turing through Blackwell as PyTorch's
                                   wheels (7.5;8.0;8.6;9.0;10.0;12.0, those the installed nvcc can
                                   build) plus PTX for the newest, also on a GPU host; set e.g.
                                   "9.0" to build for one GPU family only (faster).
  MAX_JOBS                         parallel compile jobs (ninja).
  LSTM_FUSED_SANITIZE=1            ASan + UBSan build of the CPU operators (tests/asan/run_asan.sh).
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """A CUDA toolkit directory that really has the headers, or None.

    torch guesses CUDA_HOME as the parent of the `nvcc` on PATH; when that is a wrapper script
    (e.g. /usr/local/bin/nvcc) the guess has no include/ and the build fails late.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")):
            return os.path.realpath(path)
    return None


mode = os.environ.get("LSTM_FUSED_BUILD", "auto").lower()
if mode not in ("auto", "cpu", "cuda"):
    sys.exit(f"LSTM_FUSED_BUILD must be auto, cpu or cuda, got {mode!r}")
cuda_home = _find_cuda_home() if mode != "cpu" else None
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

import torch
from torch.utils import cpp_extension

with_cuda = mode != "cpu" and cuda_home is not None and torch.version.cuda is not None
if mode == "cuda" and not with_cuda:
    sys.exit(
        "LSTM_FUSED_BUILD=cuda but no CUDA build is possible: "
        f"CUDA toolkit {'found at ' + cuda_home if cuda_home else 'not found'}, "
        f"torch CUDA version {torch.version.cuda}"
    )
if not with_cuda:
    why = "LSTM_FUSED_BUILD=cpu" if mode == "cpu" else (
        "no CUDA toolkit found" if cuda_home is None else "torch is a CPU-only build")
    print(f"lstm_fused: building the CPU operators only ({why}).")


# --- CUDA architectures, headers and C++ standard (issue 18) --------------------------------
# As PyTorch's own CUDA 13 wheels (torch._C._cuda_getArchFlags() of 2.11 and 2.14: sm_75 to
# sm_120), Turing through Blackwell; a GPU of a listed major version runs the code of the highest
# listed minor below its own (8.9 runs 8.6's, 10.3 runs 10.0's, 12.1 runs 12.0's), and the newest
# also goes in as PTX, which the driver compiles for GPUs newer than any listed.
WHEEL_CUDA_ARCHS = ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0")


def _nvcc_gpu_codes(cuda_home):
    """The sm_XY codes the toolkit's nvcc can build (`nvcc --list-gpu-code`), or None if it
    cannot say (an nvcc older than 11)."""
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-code"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.strip() for line in out.splitlines() if line.strip().startswith("sm_")}


def default_cuda_arch_list(codes):
    """TORCH_CUDA_ARCH_LIST when the user sets none: WHEEL_CUDA_ARCHS that nvcc can build
    (`codes`: {"sm_75", ...}, None = all), "+PTX" on the newest. "7.5;...;12.0+PTX"."""
    archs = [a for a in WHEEL_CUDA_ARCHS if codes is None or "sm_" + a.replace(".", "") in codes]
    if not archs:
        raise SystemExit(f"lstm_fused: this nvcc builds none of {', '.join(WHEEL_CUDA_ARCHS)} "
                         f"(it lists {sorted(codes)}); set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


# Only the CUDA runtime and NVTX headers are needed (csrc/cuda includes c10/cuda, not ATen/cuda,
# whose cuBLAS/cuSPARSE/cuSOLVER headers a bare toolkit may lack): the toolkit's own include
# folder, which torch.utils.cpp_extension adds, is the only CUDA header folder. No -std flag:
# cpp_extension adds the standard the installed torch asks for (C++17 with torch 2.11, C++20 with
# 2.13 and 2.14); our sources are C++17, so both build.
# A register spill in our kernels fails the build: ptxas warns about it (-warn-spills) and its
# -Werror makes its warnings errors (ptxas's own flag: nvcc's and the host compiler's warnings
# are unaffected). tests/test_build.py checks that a spilling kernel fails with these flags.
CUDA_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", "-Xptxas=-Werror"]
# --- end of the CUDA architectures, headers and standard ------------------------------------


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# -Wno-unknown-pragmas: torch's vectorised headers carry `#pragma unroll` for other compilers.
cxx_flags = ["-O3", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
# at::parallel_for is a header template: without OpenMP at OUR compile time it runs every chunk on
# one thread. libgomp itself is the one torch already loaded (same soname).
openmp_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
cxx_flags += openmp_flags
# The link order of the CPU kernels does not matter: the AVX2 / AVX-512 builds keep their inline
# functions in namespaces of their own (csrc/cpu/target_isa.h), so the linker never merges them
# with the baseline copies. The host shim (csrc/host_shim/) is test-only: tests/conftest.py
# builds it as a library of its own.
sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = []
extra_compile_args = {"cxx": cxx_flags}

# --- sanitizer build (make test-asan): LSTM_FUSED_SANITIZE=1, CPU operators only ---------------
# ASan + UBSan, and explicit ASan checks on the masked SIMD loads/stores (csrc/cpu/asan_check.h).
sanitize_flags = []
if os.environ.get("LSTM_FUSED_SANITIZE") == "1":
    if with_cuda:
        sys.exit("LSTM_FUSED_SANITIZE=1 needs LSTM_FUSED_BUILD=cpu")
    sanitize_flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    cxx_flags += sanitize_flags + ["-O1", "-g"]
    define_macros.append(("LSTM_FUSED_ASAN_CHECKS", "1"))
# --- end of the sanitizer build -------------------------------------------------------------

if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # also on a GPU host: PTX for what comes
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(_nvcc_gpu_codes(cuda_home))
    print(f"lstm_fused: building CUDA kernels with {cuda_home} for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}.")
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    define_macros.append(("LSTM_FUSED_WITH_CUDA", "1"))
    extra_compile_args["nvcc"] = CUDA_NVCC_FLAGS
    Extension = cpp_extension.CUDAExtension
else:
    Extension = cpp_extension.CppExtension


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build, with its objects kept in build/ across builds: pip's editable and
    isolated builds pass a fresh temporary build_temp each time, so ninja would recompile every
    file."""

    def finalize_options(self):
        super().finalize_options()
        if sanitize_flags:  # the sanitizer build keeps its own objects (tests/asan/run_asan.sh)
            return
        platform = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = os.path.join(ROOT, "build", f"temp.{platform}")


setup(
    ext_modules=[
        Extension(
            name="lstm_fused._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=openmp_flags + sanitize_flags,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
