"""The CPU kernels are compiled for several instruction sets (baseline, AVX2, AVX-512) and chosen
at run time like ATen's, so each build is checked on its own: a fresh process with
ATEN_CPU_CAPABILITY set runs every variant's layer forward and backward against the reference."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["default", "avx2", "avx512"]

CHECK = r"""
import torch
import lstm_fused
from lstm_fused import reference

assert torch.backends.cpu.get_cpu_capability() == {expected!r}, torch.backends.cpu.get_cpu_capability()
torch.manual_seed(0)
T, B, I, H = 6, 5, 7, 37            # H not a multiple of any SIMD width: tails are exercised
for peephole in (None, "diagonal", "full"):
    for coupled in (False, True):
        for dtype, tol in ((torch.float32, {tol32!r}), (torch.float64, {tol64!r})):
            fused = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, dtype=dtype)
            ref = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, dtype=dtype)
            ref.load_state_dict(fused.state_dict())
            ref._layer_fn = reference.lstm_layer
            x = torch.randn(T, B, I, dtype=dtype)
            results = []
            for m in (fused, ref):
                xi = x.clone().requires_grad_()
                out, (h, c) = m(xi)
                (out.square().sum() + h.sum() + c.sum()).backward()
                results.append([out, h, c, xi.grad] + [p.grad for p in m.parameters()])
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
print("ok")
"""


def capability_order(name):
    return LEVELS.index(name.lower())


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_each_cpu_kernel_build_matches_reference(level):
    machine = torch.backends.cpu.get_cpu_capability().lower()
    if machine not in LEVELS or capability_order(level) > capability_order(machine):
        pytest.skip(f"this CPU supports up to {machine}, not {level}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level, PYTHONPATH=str(ROOT))
    tol = TOLERANCES["reference"]
    check = CHECK.format(expected=level.upper(), tol32=tol[torch.float32], tol64=tol[torch.float64])
    run = subprocess.run([sys.executable, "-c", check], check=False, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


# --- link order: no AVX code can stand in for baseline code -----------------------------------

# What each instruction-set build may define with AVX instructions: names that exist only in it.
ISA_OWN_NAMESPACES = {"avx2": ("lstm_fused::avx2::", "lstm_fused::AVX2::", "at::vec::AVX2::"),
                      "avx512": ("lstm_fused::avx512::", "lstm_fused::AVX512::",
                                 "at::vec::AVX512::")}
VEX_INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\s+v[a-z0-9]+\s")  # AT&T: every AVX/AVX-512 mnemonic


def _cpu_object(stem):
    """The CPU kernel object of the last build (setup.py keeps them in build/temp.*), or None."""
    paths = sorted(ROOT.glob(f"build/temp.*/csrc/cpu/{stem}.o"), key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None


def _run(*command):
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _functions_using_avx(path):
    """Mangled names of the functions in an object with at least one VEX/EVEX instruction."""
    found, current = set(), None
    for line in _run("objdump", "-d", "--no-show-raw-insn", str(path)).splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            current = header.group(1)
        elif current and VEX_INSTRUCTION.match(line):
            found.add(current)
    return found


def _external_functions(path):
    """Mangled names of the functions an object defines with external linkage (strong or
    weak/COMDAT): the ones the linker may merge with another object's copy."""
    rows = (line.split() for line in _run("nm", "--defined-only", "--extern-only",
                                          str(path)).splitlines())
    return {row[2] for row in rows if len(row) == 3 and row[1] in "TWu"}


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("nm", "objdump", "c++filt")),
                    reason="binutils (nm, objdump, c++filt) not installed")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_isa_build_exports_no_avx_code_under_a_shared_name(isa):
    """Every function that the AVX2 / AVX-512 object defines under a name other objects may also
    define (inline functions, template instantiations) is baseline code, so whichever copy the
    linker keeps runs on any x86-64 CPU: the link order does not matter. AVX code is only under
    names of that build's own (csrc/cpu/target_isa.h)."""
    path = _cpu_object(f"pointwise_cpu_{isa}")
    if path is None:
        pytest.skip("no CPU kernel objects under build/ (built elsewhere)")
    using_avx = _functions_using_avx(path)
    assert using_avx, f"{path.name} has no AVX instruction: the check would see nothing"
    shared = sorted(_external_functions(path) & using_avx)
    names = _run("c++filt", *shared).splitlines() if shared else []
    foreign = [name for name in names if not name.startswith(ISA_OWN_NAMESPACES[isa])]
    assert not foreign, f"{len(foreign)} shared functions compiled with {isa}: {foreign[:3]}"
