"""Builds lstm_fused._C: the C++ CPU operators always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present.

Environment switches:
  LSTM_FUSED_BUILD=auto|cpu|cuda   auto (default) builds CUDA when it can; cpu never; cuda must.
  TORCH_CUDA_ARCH_LIST             GPU architectures; defaults to "8.0;9.0" when unset and no
                                   GPU is visible (set e.g. "8.0;8.6;8.9;9.0" to widen it).
  MAX_JOBS                         parallel compile jobs (ninja).
  LSTM_FUSED_SANITIZE=1            ASan + UBSan build of the CPU operators (tests/asan/run_asan.sh).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


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


def _nvidia_wheel_includes():
    """Header folders of torch's nvidia-* wheels (cuBLAS, cuSPARSE, cuDNN...), which torch's
    CUDA headers include but a bare CUDA toolkit may not have."""
    found = []
    for site in sys.path:
        for pattern in ("nvidia/*/include", "nvidia/*/*/include"):
            found += glob.glob(os.path.join(site, pattern))
    return sorted({os.path.realpath(p) for p in found if os.path.isdir(p)})


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# -Wno-unknown-pragmas: torch's vectorised headers carry `#pragma unroll` for other compilers.
cxx_flags = ["-O3", "-std=c++20", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
# at::parallel_for is a header template: without OpenMP at OUR compile time it runs every chunk on
# one thread. libgomp itself is the one torch already loaded (same soname).
openmp_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
cxx_flags += openmp_flags
# Order matters for the CPU kernels: the baseline pointwise_cpu.cpp links before its AVX2 and
# AVX-512 twins, so any inline function the linker shares between them is the baseline copy.
sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/host_shim/*.cpp")
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
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    print(f"lstm_fused: building CUDA kernels with {cuda_home} for "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected GPUs)')}.")
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    include_dirs += _nvidia_wheel_includes()
    define_macros.append(("LSTM_FUSED_WITH_CUDA", "1"))
    extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                                  "-Xptxas=-warn-spills"]
    Extension = cpp_extension.CUDAExtension
else:
    Extension = cpp_extension.CppExtension

setup(
    name="lstm_fused",
    version="0.1.0",
    description="Fused peephole and coupled-gate LSTM operators for PyTorch (CPU and CUDA)",
    packages=["lstm_fused"],
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
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
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
