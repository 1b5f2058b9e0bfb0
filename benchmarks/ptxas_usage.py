"""Records ptxas's resource usage (registers, stack, spills) of the CUDA pointwise kernels.

    .venv/bin/python benchmarks/ptxas_usage.py            # rewrite docs/ptxas/pointwise_sm{80,90}.txt
    .venv/bin/python benchmarks/ptxas_usage.py --check    # exit 1 if the recorded files are stale

Compiles csrc/cuda/pointwise_cuda.cu for the device only (`nvcc --cubin`, no host pass, so no
GPU and no full build needed) with the flags setup.py gives nvcc plus `-Xptxas -v`, once per
architecture, and writes one table per architecture: every kernel instantiation (demangled),
its registers, stack frame and spill bytes. tests/test_gpu_readiness.py asserts the tables show
no spills and cover every kernel, and (marked slow) that they are current.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "pointwise_cuda.cu"
ARCHS = ("80", "90")  # setup.py's default TORCH_CUDA_ARCH_LIST, 8.0 (A100) and 9.0 (H100)
HEADER = "kernel  registers  stack_bytes  spill_store_bytes  spill_load_bytes"


def recorded_path(arch: str) -> Path:
    return ROOT / "docs" / "ptxas" / f"pointwise_sm{arch}.txt"


@dataclass(frozen=True, order=True)
class KernelUsage:
    kernel: str  # demangled, without the return type and parameter list
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    def row(self) -> str:
        return (f"{self.kernel}  {self.registers}  {self.stack_bytes}  {self.spill_store_bytes}  "
                f"{self.spill_load_bytes}")


# setup.py's own nvcc flags (extra_compile_args["nvcc"]); torch adds COMMON_NVCC_FLAGS.
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]


def cuda_home() -> Path:
    """A CUDA toolkit that really has its headers, found as setup.py finds it (a `nvcc` on PATH
    may be a wrapper script whose parent directory is not the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc := shutil.which("nvcc"):
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for path in filter(None, candidates):
        if (Path(path) / "include" / "cuda_runtime.h").exists():
            return Path(path).resolve()
    raise SystemExit("ptxas_usage: no CUDA toolkit found (set CUDA_HOME)")


def find_nvcc() -> str:
    return str(cuda_home() / "bin" / "nvcc")


def nvidia_wheel_includes() -> list[str]:
    """Headers of torch's nvidia-* wheels (cuBLAS, cuSPARSE...), as setup.py adds them."""
    found = set()
    for site in sys.path:
        for pattern in ("nvidia/*/include", "nvidia/*/*/include"):
            found.update(str(p.resolve()) for p in Path(site or ".").glob(pattern) if p.is_dir())
    return sorted(found)


def nvcc_command(arch: str, output: Path) -> list[str]:
    """The device-side compile of the pointwise kernels, with setup.py's nvcc flags."""
    os.environ.setdefault("CUDA_HOME", str(cuda_home()))  # read by cpp_extension at import
    from torch.utils import cpp_extension

    includes = [str(ROOT / "csrc"), *cpp_extension.include_paths(device_type="cuda"),
                *nvidia_wheel_includes()]
    return [find_nvcc(), "--cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            *NVCC_FLAGS, *cpp_extension.COMMON_NVCC_FLAGS, "-Xptxas=-v",
            "-DLSTM_FUSED_WITH_CUDA=1", *[f"-I{p}" for p in includes],
            str(SOURCE), "-o", str(output)]


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()


def short_name(demangled: str) -> str:
    """'void lstm_fused::cuda::lstm_fused_pointwise_forward<float, lstm_fused::cuda::standard>
    (lstm_fused::ForwardStep)' -> 'lstm_fused_pointwise_forward<float, standard>'."""
    name = demangled.removeprefix("void ")
    name = name[: name.rfind("(")] if name.endswith(")") else name
    return name.replace("lstm_fused::cuda::", "")


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> list[KernelUsage]:
    """The -Xptxas -v report: per entry function its stack/spill line and its register line."""
    mangled, rows, current, frame = [], [], None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current, frame = m.group(1), None
        elif current and (m := _FRAME.search(line)):
            frame = tuple(int(v) for v in m.groups())
        elif current and frame and (m := _REGS.search(line)):
            mangled.append(current)
            rows.append((int(m.group(1)), *frame))
            current = None
    names = [short_name(n) for n in demangle(mangled)]
    return sorted(KernelUsage(n, *r) for n, r in zip(names, rows))


def compile_and_measure(arch: str, workdir: Path) -> tuple[list[KernelUsage], str]:
    result = subprocess.run(nvcc_command(arch, workdir / f"pointwise_sm{arch}.cubin"),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"nvcc failed for sm_{arch}:\n{result.stderr[-4000:]}")
    version = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True,
                             check=True).stdout
    release = next((line.strip() for line in version.splitlines() if "release" in line), "?")
    return parse_ptxas_log(result.stdout + result.stderr), release


def render(arch: str, usages: list[KernelUsage], release: str) -> str:
    lines = [f"# ptxas resource usage of csrc/cuda/pointwise_cuda.cu for sm_{arch}",
             f"# nvcc: {release}",
             "# regenerate: .venv/bin/python benchmarks/ptxas_usage.py (checked by tests)",
             f"# {len(usages)} kernels; registers per thread, bytes per thread",
             HEADER]
    lines += [u.row() for u in usages]
    return "\n".join(lines) + "\n"


def parse_recorded(text: str) -> list[KernelUsage]:
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rows and rows[0] == HEADER, f"unexpected header {rows[:1]}"
    usages = []
    for row in rows[1:]:
        # The kernel name has spaces ("<float, standard>"); the four numbers are the last fields.
        name, *numbers = row.rsplit("  ", 4)
        usages.append(KernelUsage(name, *(int(n) for n in numbers)))
    return usages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the recorded files instead of writing them")
    parser.add_argument("--arch", action="append", choices=ARCHS,
                        help="only this architecture (repeatable); default all")
    args = parser.parse_args(argv)
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ARCHS:
            usages, release = compile_and_measure(arch, Path(tmp))
            path = recorded_path(arch)
            if args.check:
                if not path.exists() or parse_recorded(path.read_text()) != usages:
                    stale.append(str(path.relative_to(ROOT)))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(arch, usages, release))
            spills = sum(u.spill_store_bytes + u.spill_load_bytes for u in usages)
            print(f"sm_{arch}: {len(usages)} kernels, registers "
                  f"{min(u.registers for u in usages)}-{max(u.registers for u in usages)}, "
                  f"spill bytes {spills} -> {path.relative_to(ROOT)}")
    if stale:
        print("stale (rerun benchmarks/ptxas_usage.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
