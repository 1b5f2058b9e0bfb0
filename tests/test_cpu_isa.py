"""The CPU kernels are compiled for several instruction sets (baseline, AVX2, AVX-512) and chosen
at run time like ATen's, but never beyond what the CPU reports (cpuid). Each check runs in a fresh
process with the CPU features capped, so that a machine with AVX-512 also catches what breaks on
one without:

- every build of our kernels against the reference (ATEN_CPU_CAPABILITY=default|avx2|avx512);
- forcing an ISA the CPU lacks (played with LSTM_FUSED_TEST_CPU_ISA, which lowers what cpuid
  reports) warns and runs the best kernels the CPU supports;
- half precision where oneDNN has no bfloat16/float16 (ONEDNN_MAX_CPU_ISA=AVX2, as on a CPU
  without AVX-512): bf16 and fp16 layers and cells of every variant at H = 256 (large enough for
  the oneDNN GEMM path), CPU autocast, and the half-precision and autocast tests.
"""

import json
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
import json
import warnings

import torch
import lstm_fused
from lstm_fused import reference

torch.manual_seed(0)
T, B, I, H = 6, 5, 7, 37            # H not a multiple of any SIMD width: tails are exercised


def compare(rows, input_size, peephole, coupled, dtype, tol):
    fused = lstm_fused.LSTM(input_size, H, peephole=peephole, coupled=coupled, dtype=dtype)
    ref = lstm_fused.LSTM(input_size, H, peephole=peephole, coupled=coupled, dtype=dtype)
    ref.load_state_dict(fused.state_dict())
    ref._layer_fn = reference.lstm_layer
    x = torch.randn(T, rows, input_size, dtype=dtype)
    results = []
    for m in (fused, ref):
        xi = x.clone().requires_grad_()
        out, (h, c) = m(xi)
        (out.square().sum() + h.sum() + c.sum()).backward()
        results.append([out, h, c, xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for peephole in (None, "diagonal", "full"):
        for coupled in (False, True):
            for dtype, tol in ((torch.float32, TOL32), (torch.float64, TOL64)):
                compare(B, I, peephole, coupled, dtype, tol)
    # Our GEMM kernels at every row count around their tiles (8 rows with AVX-512, 6 with AVX2;
    # then 4, 2, 1), and the out-row tiles of the weight and input gradients (4H = 148 rows).
    with lstm_fused.cpu_gemm.mode("simd"):
        for rows in [*range(1, 19), 22, 24, 31]:
            for peephole, coupled in ((None, False), ("diagonal", True)):
                compare(rows, 19, peephole, coupled, torch.float32, TOL32)
    kernels = torch.ops.lstm_fused.cpu_kernel_isa()
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(), "kernels": kernels,
                  "warnings": [str(w.message) for w in caught if "lstm_fused" in str(w.message)]}))
"""


def machine_level():
    return torch.backends.cpu.get_cpu_capability().lower()


def supports(level):
    machine = machine_level()
    return machine in LEVELS and LEVELS.index(level) <= LEVELS.index(machine)


def run_fresh(args, timeout=600, **env):
    """Runs `python args...` in a fresh process with `env` added; returns the CompletedProcess."""
    run = subprocess.run([sys.executable, *args], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), **env))
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def run_check(**env):
    tol = TOLERANCES["reference"]
    check = f"TOL32, TOL64 = {tol[torch.float32]!r}, {tol[torch.float64]!r}\n" + CHECK
    return json.loads(run_fresh(["-c", check], **env).stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_each_cpu_kernel_build_matches_reference(level):
    if not supports(level):
        pytest.skip(f"this CPU supports up to {machine_level()}, not {level}")
    result = run_check(ATEN_CPU_CAPABILITY=level)
    assert result == {"torch": level.upper(), "kernels": level.upper(), "warnings": []}



KEEP_MASK_CHECK = r"""
import hashlib
import json

import torch

import lstm_fused  # noqa: F401  (registers the ops)
masks = []
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    for size in ([7, 5, 9], [3, 1001], [64, 33]):
        for p in (0.1, 0.5):
            mask = torch.ops.lstm_fused.keep_mask(torch.tensor([-42], dtype=torch.int64), size, p,
                                                 torch.float32)
            masks.append(hashlib.sha256(mask.numpy().tobytes()).hexdigest())
print(json.dumps({"kernels": torch.ops.lstm_fused.cpu_kernel_isa(), "masks": masks}))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_keep_mask_is_the_same_on_each_build(level):
    """Zoneout's keep masks from the baseline, AVX2 (8 lanes) and AVX-512 (16 lanes) Philox
    kernels, for 1, 2 and 3 threads, equal this process's (test_regularizers.py compares those
    with the twin bit for bit)."""
    if not supports(level):
        pytest.skip(f"this CPU supports up to {machine_level()}, not {level}")
    result = json.loads(run_fresh(["-c", KEEP_MASK_CHECK], ATEN_CPU_CAPABILITY=level)
                        .stdout.strip().splitlines()[-1])
    here = json.loads(run_fresh(["-c", KEEP_MASK_CHECK]).stdout.strip().splitlines()[-1])
    assert result["kernels"] == level.upper()
    assert result["masks"] == here["masks"]
    per_thread_count = len(here["masks"]) // 3  # the same 6 masks for 1, 2 and 3 threads
    assert here["masks"] == here["masks"][:per_thread_count] * 3
    assert len(set(here["masks"])) == per_thread_count


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


def _called_functions(path):
    """Demangled names of the functions an object calls through a relocation (not inlined)."""
    symbols = set()
    for line in _run("objdump", "-r", str(path)).splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] == "R_X86_64_PLT32":
            symbols.add(re.sub(r"[-+]0x[0-9a-f]+$", "", fields[2]))
    return _run("c++filt", *sorted(symbols)).splitlines() if symbols else []


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("objdump", "c++filt")),
                    reason="binutils (objdump, c++filt) not installed")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_isa_build_inlines_every_simd_helper(isa):
    """No at::vec function of the build's instruction set is called out of line. GCC gives the
    implicit constructor of a struct of vectors (Gates<V> g;) the baseline target, cannot inline
    Vectorized's constructor into it (target mismatch), and so called it through the PLT, four
    times per 16 units in the forward step, each call with a vzeroupper that spills every live
    register (4% of the forward's time at B=16). Structs of vectors are brace-initialised."""
    path = _cpu_object(f"pointwise_cpu_{isa}")
    if path is None:
        pytest.skip("no CPU kernel objects under build/ (built elsewhere)")
    called = _called_functions(path)
    assert called, f"{path.name} calls nothing: the check would see nothing"
    out_of_line = [name for name in called if name.startswith(ISA_OWN_NAMESPACES[isa][2])]
    assert not out_of_line, f"{len(out_of_line)} at::vec functions called: {out_of_line[:3]}"


# (what ATEN_CPU_CAPABILITY asks for, what the played CPU has)
FORCED = [("avx512", "avx2"), ("avx512", "default"), ("avx2", "default")]


@pytest.mark.parametrize("requested,cpu", FORCED, ids=[f"{r}-on-{c}" for r, c in FORCED])
def test_forcing_an_isa_the_cpu_lacks_warns_and_runs_the_best_supported(requested, cpu):
    """torch believes ATEN_CPU_CAPABILITY; our kernels ask cpuid, warn once, and fall back to the
    best build the CPU runs (still matching the reference) instead of dying with SIGILL."""
    if not supports(requested):
        pytest.skip(f"this CPU supports up to {machine_level()}: torch's own {requested} "
                    "kernels would not run")
    result = run_check(ATEN_CPU_CAPABILITY=requested, LSTM_FUSED_TEST_CPU_ISA=cpu)
    assert result["torch"] == requested.upper()
    assert result["kernels"] == cpu.upper()
    assert len(result["warnings"]) == 1, result["warnings"]
    warning = result["warnings"][0]
    assert f"CPU capability is {requested.upper()} (ATEN_CPU_CAPABILITY={requested})" in warning
    assert f"only supports {cpu.upper()}" in warning and f"its {cpu.upper()} kernels" in warning


def test_played_cpu_can_only_lower_what_cpuid_reports():
    """LSTM_FUSED_TEST_CPU_ISA above torch's level changes nothing (and never adds features)."""
    result = run_check(ATEN_CPU_CAPABILITY="default", LSTM_FUSED_TEST_CPU_ISA="avx512")
    assert result == {"torch": "DEFAULT", "kernels": "DEFAULT", "warnings": []}


HALF_CHECK = r"""
import torch
import lstm_fused
from lstm_fused import reference

assert not torch.ops.mkldnn._is_mkldnn_bf16_supported(), "oneDNN is not capped"
VARIANTS = [(None, False), ("diagonal", False), ("full", False),
            (None, True), ("diagonal", True), ("full", True)]
TOL = {torch.bfloat16: 4e-2, torch.float16: 8e-3}   # as tests/test_half_precision.py
T, B, H = 5, 3, 256


def assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().clamp(min=1.0)
    error = (actual.float() - expected.float()).abs().max()
    assert error <= TOL[dtype] * scale, f"{what}: max error {error:.3g}, scale {scale:.3g}"


torch.manual_seed(0)
for peephole, coupled in VARIANTS:
    for dtype in (torch.bfloat16, torch.float16):
        what = f"{peephole}/{'coupled' if coupled else 'standard'}/{dtype}"
        half = lstm_fused.LSTM(H, H, peephole=peephole, coupled=coupled, dtype=dtype)
        ref = lstm_fused.LSTM(H, H, peephole=peephole, coupled=coupled)
        ref._layer_fn = reference.lstm_layer
        ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
        x = torch.randn(T, B, H).to(dtype)
        got, expected = [], []
        for module, inputs, results in ((half, x, got), (ref, x.float(), expected)):
            inputs = inputs.clone().requires_grad_()
            out, (h_n, c_n) = module(inputs)
            (out.float().sum() + h_n.float().square().sum()).backward()
            results += [out, h_n, c_n, inputs.grad, *(p.grad for p in module.parameters())]
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a.dtype == dtype, f"{what} layer result {i}: {a.dtype}"
            assert_close(a, b, dtype, f"{what} layer result {i}")

        cell = lstm_fused.LSTMCell(H, H, peephole=peephole, coupled=coupled, dtype=dtype)
        xc, hc, cc = (torch.randn(B, H) for _ in range(3))
        params = [p.float() if p is not None else None for p in cell._parameters_for("")]
        want = reference.lstm_cell(xc, hc, cc, *params, peephole=peephole, coupled=coupled)
        have = cell(xc.to(dtype), (hc.to(dtype), cc.to(dtype)))
        for a, b, name in zip(have, want, ("h", "c")):
            assert_close(a, b, dtype, f"{what} cell {name}")

    # CPU autocast (bfloat16) of a float32 model: bf16 outputs, float32 gradients.
    model = lstm_fused.LSTM(H, H, peephole=peephole, coupled=coupled)
    x = torch.randn(T, B, H, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(x)
    assert out.dtype == torch.bfloat16, out.dtype
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert_close(out, model(x)[0], torch.bfloat16, f"{peephole}/{coupled} autocast")
print("ok")
"""

# ATEN_CPU_CAPABILITY values played together with oneDNN capped to AVX2 (no bf16/fp16 there).
CAPPED = ["default", "avx2"]


@pytest.mark.slow
@pytest.mark.parametrize("level", CAPPED)
def test_half_precision_h256_and_autocast_without_onednn_bf16(level):
    """bf16/fp16 layers and cells of every variant at H = 256, and CPU autocast, on a CPU played
    without AVX-512 (where oneDNN cannot create a bf16 inner product)."""
    run = run_fresh(["-c", HALF_CHECK], ATEN_CPU_CAPABILITY=level, ONEDNN_MAX_CPU_ISA="AVX2")
    assert run.stdout.strip().endswith("ok")


@pytest.mark.slow
@pytest.mark.parametrize("level", CAPPED)
def test_half_precision_suite_without_onednn_bf16(level):
    """tests/test_half_precision.py and the CPU autocast tests in a fresh process with the CPU
    capped."""
    run_fresh(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "half or autocast",
               "tests/test_half_precision.py"],
              ATEN_CPU_CAPABILITY=level, ONEDNN_MAX_CPU_ISA="AVX2")


# --- the SIMD activations: accurate to a few ULP on every build ---------------------------------

ACTIVATIONS = r"""
import json, math
import torch
import lstm_fused  # noqa: F401  (registers the ops)

H = 4099                           # not a multiple of any SIMD width: the tails run too
x = torch.cat([torch.linspace(-12, 12, H - 13), torch.tensor(
    [0.0, -0.0, 1e-30, -3e-4, -88.5, -80.0, -30.0, 30.0, 87.5, 100.0, float("inf"),
     float("-inf"), float("nan")])])
gates = torch.zeros(1, 4, H)
gates[0, 1] = 40.0                 # forget gate 1, c_prev 0: c = i * g
gates[0, 0] = x                    # i = sigmoid(x)
gates[0, 2] = x                    # g = tanh(x)
h, c, out = torch.ops.lstm_fused.cell_forward(gates.view(1, -1), torch.zeros(1, H), None,
                                              "none", False)
out = out.view(4, H).double()
xd = x.double()
def worst(got, want):
    finite = want.isfinite() & got.isfinite()
    rel = ((got - want).abs() / want.abs().clamp_min(1e-30))[finite]
    same_nan = bool((got.isnan() == want.isnan()).all())
    return rel.max().item(), same_nan, bool((got[~finite] == want[~finite]).all() if
                                            (~finite & ~want.isnan()).any() else True)
print(json.dumps({"tanh": worst(out[2], torch.tanh(xd)),
                  "sigmoid": worst(out[0], torch.sigmoid(xd)),
                  "kernels": torch.ops.lstm_fused.cpu_kernel_isa()}))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_simd_activations_are_accurate_on_each_build(level):
    """tanh (rational approximation) within 4 ULP and sigmoid (1 / (1 + exp(-x)), our exp:
    1.6 ULP on the Zen 4 with AVX2 and AVX-512) within 4 ULP of float64, also where exp(-x)
    over- or underflows (|x| up to 100 and inf), NaN kept, tanh(+-inf) = +-1, in each kernel
    build."""
    if not supports(level):
        pytest.skip(f"this CPU supports up to {machine_level()}, not {level}")
    run = run_fresh(["-c", ACTIVATIONS], ATEN_CPU_CAPABILITY=level)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    eps = torch.finfo(torch.float32).eps
    assert result["kernels"] == level.upper()
    tanh_rel, tanh_nan, tanh_inf = result["tanh"]
    assert tanh_rel < 4 * eps and tanh_nan and tanh_inf, result
    sigmoid_rel, sigmoid_nan, _ = result["sigmoid"]
    assert sigmoid_rel < 4 * eps and sigmoid_nan, result


# --- the simd GEMM kernels in each build ----------------------------------------------------------

SIMD_GEMM = r"""
import json
import torch
import lstm_fused
from lstm_fused import reference

torch.manual_seed(0)
worst = 0.0
for peephole in (None, "diagonal", "full"):
    # partial tiles, K tails, every row block (dot: 4, 2, 1; panels: 8, 4, 2, 1), 5 * 30 input
    # rows for the row-split panel GEMM
    for B, I, H in ((1, 21, 37), (5, 64, 16), (16, 7, 70), (7, 19, 23), (31, 33, 17),
                    (13, 9, 41), (30, 10, 25)):
        fused = lstm_fused.LSTM(I, H, peephole=peephole, proj_size=0)
        ref = lstm_fused.LSTM(I, H, peephole=peephole)
        ref.load_state_dict(fused.state_dict())
        ref._layer_fn = reference.lstm_layer
        x = torch.randn(5, B, I)
        with torch.no_grad():
            for a, b in zip(torch.utils._pytree.tree_leaves(fused(x)),
                            torch.utils._pytree.tree_leaves(ref(x))):
                worst = max(worst, (a - b).abs().max().item())
        cell = lstm_fused.LSTMCell(I, H, peephole=peephole)
        with torch.inference_mode():
            got = cell(x[0])
        expected = reference.lstm_cell(x[0], torch.zeros(B, H), torch.zeros(B, H),
                                       *cell._parameters_for(""), peephole=peephole)
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(got, expected)))
print(json.dumps({"kernels": torch.ops.lstm_fused.cpu_kernel_isa(), "worst": worst,
                  "mode": lstm_fused.cpu_gemm.get_mode()}))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_simd_gemm_kernels_match_the_reference_on_each_build(level):
    """The few-row GEMM kernels (and the fused forward step) of each instruction-set build, forced
    with LSTM_FUSED_CPU_GEMM=simd, against the reference: layer and cell, 1 to 31 rows in a
    step, up to 150 in the input projection."""
    if not supports(level):
        pytest.skip(f"this CPU supports up to {machine_level()}, not {level}")
    run = run_fresh(["-c", SIMD_GEMM], ATEN_CPU_CAPABILITY=level, LSTM_FUSED_CPU_GEMM="simd")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["kernels"] == level.upper() and result["mode"] == "simd"
    assert result["worst"] < TOLERANCES["reference"][torch.float32], result
