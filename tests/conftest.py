"""Shared helpers: the variants, random parameters for them, and comparison tolerances."""

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


def assert_close(actual, expected, dtype, what=""):
    """float64: 1e-10; float32: 1e-5 relative (with a small absolute floor); half types: loose."""
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
           torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


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
