"""The build and what it promises a GPU user without needing a GPU: CUDA kernels registered for
every op where CUDA can be built, a forced CPU-only build that still passes the CPU tests, a plain
`import lstm_fused` that registers nothing of the tests, ptxas failing the build on a register
spill, kernel names and NVTX ranges in the binary, no host synchronisation in the sources of the
CUDA path, and the CUDA suite skipping visibly where there is no GPU."""

import ast
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_fused import _C, ops

ROOT = Path(__file__).resolve().parents[1]


needs_cuda_build = pytest.mark.skipif(not ops.BUILT_WITH_CUDA,
                                      reason="extension built without CUDA kernels")


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
    """LSTM_FUSED_BUILD=cpu builds without nvcc and the CPU cell tests pass against it."""
    for item in ("setup.py", "pyproject.toml", "README.md", "csrc", "lstm_fused", "tests"):
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
         "tests/test_cell.py", "-k", "not compile"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout


TOOL_MODULES = ("matplotlib", "unittest")  # what the benchmark and the tests use, not the library


def test_plain_import_registers_no_test_library_and_loads_no_tools():
    """`import lstm_fused` in a fresh process, from outside the checkout: the operators, and
    nothing of the tests (the host shim's torch.ops.lstm_fused_host_shim) or of the tools. (torch
    itself imports unittest, so the process can only show what lstm_fused adds.)"""
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"
            "import lstm_fused\n"
            "added = {name.split('.')[0] for name in set(sys.modules) - before}\n"
            "assert torch._C._dispatch_has_kernel_for_dispatch_key("
            "'lstm_fused::layer_forward', 'CPU')\n"
            "shim = [op for op in torch._C._dispatch_get_all_op_names()"
            " if op.startswith('lstm_fused_host_shim::')]\n"
            f"print(shim, sorted(added & set({TOOL_MODULES!r})))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[] []"


def test_package_sources_import_no_tools():
    for path in sorted((ROOT / "lstm_fused").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in TOOL_MODULES, f"{path.name} imports {name}"


# --- ptxas: a register spill fails the build ---------------------------------------------------


def setup_nvcc_flags():
    """CUDA_NVCC_FLAGS as setup.py writes them."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["CUDA_NVCC_FLAGS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no CUDA_NVCC_FLAGS")


# 32 doubles (64 registers) updated in place from each other, all live through every round: more
# than 24 registers (the least ptxas accepts on sm_80) can hold, fewer than its default limit.
MANY_LIVE_VALUES = """
__global__ void many_live_values(double* out) {
  double v[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) v[i] = out[i * 1024 + threadIdx.x];
#pragma unroll
  for (int round = 0; round < 4; ++round) {
#pragma unroll
    for (int i = 0; i < 32; ++i) v[i] = v[i] * v[(i + 1) % 32] + v[(i + 7) % 32];
  }
#pragma unroll
  for (int i = 0; i < 32; ++i) out[i * 1024 + threadIdx.x] = v[i];
}
"""


@pytest.mark.slow
@pytest.mark.skipif(not cuda_build_expected(), reason="no nvcc or a CPU-only torch")
@pytest.mark.parametrize("max_registers, fails", [(None, False), (24, True)])
def test_nvcc_flags_make_a_register_spill_an_error(tmp_path, max_registers, fails):
    """The flags setup.py gives nvcc compile a kernel that fits its registers, and refuse the
    same kernel when a register limit makes ptxas spill."""
    source = tmp_path / "kernel.cu"
    source.write_text(MANY_LIVE_VALUES)
    limit = [f"-maxrregcount={max_registers}"] if max_registers else []
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    run = subprocess.run([nvcc, *setup_nvcc_flags(), *limit, "-arch=sm_80", "-c", str(source),
                          "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True,
                         check=False, timeout=300)
    if fails:
        assert run.returncode != 0 and "spill" in run.stderr, run.stderr[-2000:]
    else:
        assert run.returncode == 0, run.stderr[-2000:]


# --- kernel names and NVTX ranges in the binary ------------------------------------------------

DTYPE_NAMES = ["float", "double", "c10::Half", "c10::BFloat16"]
VARIANT_NAMES = ["standard", "coupled"]
VARIANT_NAMES += [f"{g}_{p}" for g in ("standard", "coupled")
                  for p in ("diagonal_peephole", "full_peephole_update", "full_peephole_output")]


def expected_kernel_names():
    return {f"lstm_fused_pointwise_{direction}<{dtype}, {variant}>"
            for direction, dtype, variant in itertools.product(("forward", "backward"),
                                                               DTYPE_NAMES, VARIANT_NAMES)}


def kernel_short_name(demangled: str) -> str:
    """'void lstm_fused::cuda::lstm_fused_pointwise_forward<float, lstm_fused::cuda::standard>
    (lstm_fused::ForwardStep)' -> 'lstm_fused_pointwise_forward<float, standard>'."""
    name = demangled.removeprefix("void ")
    name = name[: name.rfind("(")] if name.endswith(")") else name
    return name.replace("lstm_fused::cuda::", "")


def _defined_symbols():
    if not shutil.which("nm"):
        pytest.skip("nm (binutils) not installed")
    result = subprocess.run(["nm", "-C", "--defined-only", _C.__file__], capture_output=True,
                            text=True, check=True)
    return result.stdout.splitlines()


@needs_cuda_build
def test_cuda_kernels_have_descriptive_names():
    """Every kernel instantiation is lstm_fused_pointwise_<direction><dtype, named variant>."""
    kernels = {kernel_short_name(line.split(" ", 2)[2]) for line in _defined_symbols()
               if "lstm_fused::cuda::lstm_fused_pointwise_" in line and "[clone" not in line}
    assert kernels == expected_kernel_names()


@needs_cuda_build
def test_every_cuda_op_runs_inside_an_nvtx_range():
    symbols = "\n".join(_defined_symbols())
    assert "InitializeInjectionNvtx2" in symbols  # nvtx3's loader for Nsight's injection library
    for name in ops.OP_NAMES:
        constant = "k" + "".join(part.title() for part in name.split("_"))
        wrapper = (f"WithNvtxRange<&lstm_fused::(anonymous namespace)::{constant}, "
                   f"&lstm_fused::DeviceOps<&lstm_fused::cuda_kernels>::{name}>::call")
        assert wrapper in symbols, f"{name} is registered for CUDA without an NVTX range"


# --- no host synchronisation on the CUDA path ------------------------------------------------

# Calls that wait for the GPU, or copy between host and device (pageable host memory makes a
# host-to-device copy synchronous, and CUDA graph capture rejects it).
HOST_SYNC = re.compile(r"\.item\s*[<(]|\.cpu\s*\(|\bkCPU\b|cudaDeviceSynchronize|"
                       r"cudaStreamSynchronize|stream_synchronize|\.synchronize\s*\(|"
                       r"cudaMemcpy\s*\(|_local_scalar_dense|\.tolist\s*\(|\bat::tensor\s*\(|"
                       r"\.nonzero\s*\(|\.is_nonzero\s*\(|\.equal\s*\(")
# (file, code) pairs known to match, each with the reason it is accepted.
KNOWN_HOST_TRANSFERS = {
    ("lstm_fused/_checks.py", "return batch_sizes.tolist()"):
        "PackedSequence.batch_sizes is a CPU tensor by PyTorch's contract: no device involved",
}
# Sources of the CUDA path: the device-generic drivers, CUDA code and the Python op layer
# (with the argument checks, _checks.py). csrc/cpu/ and csrc/host_shim/ never run with CUDA
# tensors.
CUDA_PATH_SOURCES = ["csrc/*.h", "csrc/*.cpp", "csrc/cuda/*", "lstm_fused/ops.py",
                     "lstm_fused/functional.py", "lstm_fused/modules.py", "lstm_fused/_checks.py",
                     "lstm_fused/_double_backward.py"]


def _code_lines(path):
    comment = "#" if path.suffix == ".py" else "//"
    for line in path.read_text().splitlines():
        code = line.split(comment, 1)[0].strip()
        if code:
            yield code


def _host_sync_matches():
    for pattern in CUDA_PATH_SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            for code in _code_lines(path):
                if HOST_SYNC.search(code):
                    yield str(path.relative_to(ROOT)), code


def test_no_host_synchronisation_in_cuda_path_sources():
    unexpected = [m for m in _host_sync_matches() if m not in KNOWN_HOST_TRANSFERS]
    assert not unexpected, unexpected


def test_known_host_transfers_are_still_there():
    """Keeps the list above honest: an entry whose code was fixed must be removed."""
    stale = set(KNOWN_HOST_TRANSFERS) - set(_host_sync_matches())
    assert not stale, stale


@pytest.mark.parametrize("code", ["x.item()", "t.item<float>()", "a.cpu()", "at::kCPU",
                                  "cudaStreamSynchronize(s)", "b.tolist()",
                                  "at::tensor(v).to(d)", "stream.synchronize()"])
def test_host_sync_pattern_catches(code):
    assert HOST_SYNC.search(code)


# --- the CUDA suite without a GPU --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make test-gpu runs it")
def test_cuda_suite_skips_visibly_without_a_gpu():
    """`make test-gpu` (pytest -m cuda) exits 0 here and reports every CUDA test as skipped
    with the reason; it must not exit 5 (nothing collected) or fail."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rs",
         "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ skipped, \d+ deselected in .*", summary), summary
    assert "no CUDA device" in result.stdout
    assert int(summary.split(" skipped")[0].split()[-1]) >= 20


# --- every op on every device: read from the dispatcher ----------------------------------------


def ops_with_tensor_arguments() -> list[str]:
    """Every operator of the lstm_fused namespace (from the dispatcher, not a list of ours) that
    takes a Tensor argument (cpu_kernel_isa takes none)."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lstm_fused::")]
    result = []
    for name in sorted(names):
        schema = getattr(torch.ops.lstm_fused, name.split("::")[1]).default._schema
        if any(str(a.type).startswith("Tensor") for a in schema.arguments):
            result.append(name)
    return result


def test_the_dispatcher_lists_every_op():
    found = ops_with_tensor_arguments()
    assert {f"lstm_fused::{n}" for n in (*ops.OP_NAMES, "cell_step", "gru_cell_step")} <= set(found), found


@pytest.mark.parametrize("key", ["CPU", "AutocastCPU", "AutocastCUDA"])
def test_every_op_has_a_kernel_for(key):
    """CPU and both autocast kernels are registered in every build (the autocast ones are
    device-independent C++)."""
    missing = [n for n in ops_with_tensor_arguments()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]
    assert not missing, f"no {key} kernel: {missing}"


@needs_cuda_build
def test_every_op_has_a_cuda_kernel_from_the_dispatcher():
    missing = [n for n in ops_with_tensor_arguments()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    assert not missing, f"no CUDA kernel: {missing}"
