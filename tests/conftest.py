"""Shared helpers: the variants, random parameters for them, the comparison tolerances (one
table) and the test-only host shim (torch.ops.lstm_fused_host_shim)."""

import functools
import itertools
import sys
from pathlib import Path

import pytest
import torch

# The benchmark and the demo live beside the package (benchmarks/, examples/), not in it: the
# tests import them as scripts.
ROOT = Path(__file__).resolve().parents[1]
for _tools in ("benchmarks", "examples"):
    if str(ROOT / _tools) not in sys.path:
        sys.path.insert(0, str(ROOT / _tools))

# (peephole, coupled): every variant the fused ops implement.
VARIANTS = [(None, False), ("diagonal", False), ("full", False),
            (None, True), ("diagonal", True), ("full", True)]


def variant_id(variant):
    peephole, coupled = variant
    return f"{peephole or 'nopeep'}-{'coupled' if coupled else 'standard'}"


variant_params = pytest.mark.parametrize("variant", VARIANTS, ids=[variant_id(v) for v in VARIANTS])


def make_weight_ch(peephole, coupled, hidden, generator, dtype=torch.float32):
    """Random weight_ch for a variant: [P, H] diagonal, [P*H, H] full, None otherwise."""
    P = 2 if coupled else 3
    shape = {"diagonal": (P, hidden), "full": (P * hidden, hidden)}.get(peephole)
    return None if shape is None else torch.randn(*shape, generator=generator).to(dtype)


def make_params(input_size, hidden, *, peephole=None, coupled=False, bias=True, proj=0,
                dtype=torch.float64, device="cpu", requires_grad=False, generator=None, scale=0.5):
    """(weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr) for one cell/direction."""
    G, P = (3, 2) if coupled else (4, 3)
    R = proj or hidden

    def rand(*shape):
        t = (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale
        return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    weight_ch = None
    if peephole == "diagonal":
        weight_ch = rand(P, hidden)
    elif peephole == "full":
        weight_ch = rand(P * hidden, hidden)
    return (rand(G * hidden, input_size), rand(G * hidden, R),
            rand(G * hidden) if bias else None, rand(G * hidden) if bias else None,
            weight_ch, rand(R, hidden) if proj else None)


def layer_op_args(variant, dtype, packed, reverse, proj, generator, device="cpu"):
    """Arguments of torch.ops.lstm_fused.layer_forward for a small layer (T=4, B=3, I=5, H=6),
    padded or packed (batch sizes 3, 3, 2, 1)."""
    peephole, coupled = variant
    T, B, I, H = 4, 3, 5, 6
    params = make_params(I, H, peephole=peephole, coupled=coupled, proj=proj, dtype=dtype,
                         device=device, generator=generator)
    R = proj or H

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    batch_sizes = [3, 3, 2, 1] if packed else None
    x = rand(sum(batch_sizes), I) if packed else rand(T, B, I)
    return (x, rand(B, R), rand(B, H), *params, batch_sizes, reverse, peephole or "none", coupled)


# Every tolerance of the suite, by what is compared (row) and the dtype computed in (column).
TOLERANCES = {
    # The same arithmetic by other code: the CUDA kernels on the host shim vs the CPU kernels
    # (scalar vs SIMD exp/tanh), a build for another instruction set.
    "kernels": {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3,
                torch.bfloat16: 1e-2},
    # The fused ops vs the plain-PyTorch reference or torch.nn.LSTM: other GEMMs, other order.
    "reference": {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3,
                  torch.bfloat16: 2e-2},
    # Half-precision storage vs the float32 reference, relative to the largest value: a few
    # steps of 8-bit (bf16) / 11-bit (fp16) storage.
    "half_storage": {torch.float16: 8e-3, torch.bfloat16: 4e-2},
    # Under torch.autocast vs the float32 module, relative: outputs, then gradients (which pass
    # through more rounded steps).
    "autocast": {torch.float16: 1e-2, torch.bfloat16: 4e-2},
    "autocast_grad": {torch.float16: 5e-2, torch.bfloat16: 5e-2},
    # CUDA vs CPU: the same kernels' math, another GEMM summation order; relative.
    "devices": {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2,
                torch.bfloat16: 4e-2},
}


def assert_close(actual, expected, dtype, what="", kind="reference", equal_nan=False):
    """Elementwise, rtol = atol = TOLERANCES[kind][dtype]."""
    tol = TOLERANCES[kind][dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def assert_close_scaled(actual, expected, dtype, what="", kind="half_storage"):
    """max |actual - expected| <= TOLERANCES[kind][dtype] * max(1, max |expected|), computed in
    float64: for results rounded to a short storage type, whose error grows with the values."""
    assert actual.shape == expected.shape, f"{what}: {actual.shape} vs {expected.shape}"
    if expected.numel() == 0:
        return
    expected = expected.to(actual.device, torch.float64)
    scale = expected.abs().max().clamp(min=1.0)
    error = (actual.double() - expected).abs().max()
    tol = TOLERANCES[kind][dtype]
    assert error <= tol * scale, f"{what}: max error {error:.3g} (scale {scale:.3g}, tol {tol})"


def module_input(mode, generator, T, B, I, lengths):
    """(an LSTM module's input, a function turning the module's output into a padded tensor):
    x [T, B, I] (randn * 2, requiring grad) as it is ("padded"), its first sequence [T, I]
    ("unbatched") or packed with `lengths` ("packed", sorted)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    x = (torch.randn(T, B, I, generator=generator) * 2).requires_grad_()
    if mode == "unbatched":
        return x[:, 0].detach().requires_grad_(), lambda out: out
    if mode == "padded":
        return x, lambda out: out
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
    return packed, lambda out: pad_packed_sequence(out)[0]


def leaf(x):
    """The tensor a module input's gradient is taken of (a PackedSequence's data)."""
    return x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x


def grid(*, where=None, **axes):
    """Cartesian product of keyword axes, as pytest params with readable ids; `where(**combo)`
    keeps only the combinations that make sense."""
    names = list(axes)
    combos = [c for c in itertools.product(*axes.values())
              if where is None or where(**dict(zip(names, c)))]
    ids = ["-".join(f"{n}={v}" for n, v in zip(names, c)) for c in combos]
    return pytest.mark.parametrize(",".join(names), combos, ids=ids)


def gradcheck_fused_cell(peephole, coupled, *, bias=True, device="cpu"):
    """float64 gradcheck of the fused cell (functional.lstm_cell) with respect to the input, both
    states and every parameter present, B = 3, I = 4, H = 5."""
    from lstm_fused import functional

    g = torch.Generator().manual_seed(0)
    x, h, c = (torch.randn(3, n, generator=g, dtype=torch.float64).to(device).requires_grad_()
               for n in (4, 5, 5))
    params = make_params(4, 5, peephole=peephole, coupled=coupled, bias=bias, device=device,
                         requires_grad=True, generator=g)
    present = [p for p in params if p is not None]

    def cell(x, h, c, *weights):
        it = iter(weights)
        full = [next(it) if p is not None else None for p in params]
        return functional.lstm_cell(x, h, c, *full, peephole=peephole, coupled=coupled)

    return torch.autograd.gradcheck(cell, (x, h, c, *present))


# --- the host shim: the CUDA kernels run on the CPU (csrc/host_shim/) -------------------------

CSRC = ROOT / "csrc"
# csrc/*.cpp that register torch.ops.lstm_fused itself: the shim library leaves them out (the
# namespace can be registered once per process); the others are the device-generic drivers.
REGISTERS_LSTM_FUSED = {"register.cpp", "autocast.cpp"}


@functools.cache
def load_host_shim():
    """torch.ops.lstm_fused_host_shim: a test-only operator library (the CUDA kernels compiled for
    the host, plus the drivers), built on first use into build/host_shim/ with ninja, so later
    sessions only recompile what changed. The installed package never contains it."""
    from torch.utils import cpp_extension

    sources = sorted(p for p in CSRC.glob("*.cpp") if p.name not in REGISTERS_LSTM_FUSED)
    sources += sorted((CSRC / "host_shim").glob("*.cpp"))
    build = ROOT / "build" / "host_shim"
    build.mkdir(parents=True, exist_ok=True)
    # Hidden visibility: this library's copies of the drivers never stand in for lstm_fused._C's.
    cpp_extension.load(
        name="lstm_fused_host_shim", sources=[str(p) for p in sources],
        extra_include_paths=[str(CSRC)], build_directory=str(build), is_python_module=False,
        extra_cflags=["-O2", "-std=c++20", "-fopenmp", "-fvisibility=hidden", "-Wall",
                      "-Wno-unused-function", "-Wno-unknown-pragmas"],
        extra_ldflags=["-fopenmp"])
    return torch.ops.lstm_fused_host_shim


@pytest.fixture(scope="session")
def host_shim():
    return load_host_shim()


def host_shim_launches():
    """(blocks, threads, thread runs) of every host-shim kernel launch since the last call."""
    flat = load_host_shim().launches()
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
