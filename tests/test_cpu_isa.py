"""The CPU kernels are compiled for several instruction sets (baseline, AVX2, AVX-512) and chosen
at run time like ATen's, so each build is checked on its own: a fresh process with
ATEN_CPU_CAPABILITY set runs every variant's layer forward and backward against the reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
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


@pytest.mark.parametrize("level", LEVELS)
def test_each_cpu_kernel_build_matches_reference(level):
    machine = torch.backends.cpu.get_cpu_capability().lower()
    if machine not in LEVELS or capability_order(level) > capability_order(machine):
        pytest.skip(f"this CPU supports up to {machine}, not {level}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", CHECK.format(expected=level.upper())],
                         check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
