"""The CUDA kernels (csrc/cuda/pointwise_kernels.cuh), compiled for the host and run block by block
and thread by thread on the CPU, against the CPU kernels: the same launch code, indexing and
dtype dispatch that a GPU runs, at several launch geometries."""

import pytest
import torch
from conftest import VARIANTS, grid, layer_op_args, make_weight_ch, variant_params

from lstm_fused.ops import ops

shim = torch.ops.lstm_fused_host_shim

# (blocks, threads): (0, 0) is the geometry the CUDA launcher picks; the others force fewer
# threads than elements (grid-stride loop), odd sizes, and more threads than elements.
GEOMETRIES = [(0, 0), (1, 32), (3, 7), (64, 256)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


@variant_params
@grid(dtype=DTYPES, geometry=GEOMETRIES)
def test_cell_kernels_match_cpu(variant, dtype, geometry):
    peephole, coupled = variant
    kind = peephole or "none"
    g = torch.Generator().manual_seed(0)
    B, H = 5, 33
    G = 3 if coupled else 4
    gates = torch.randn(B, G * H, generator=g).to(dtype)
    c_prev = torch.randn(B, H, generator=g).to(dtype)
    weight_ch = make_weight_ch(peephole, coupled, H, g, dtype)

    expected = ops.cell_forward(gates, c_prev, weight_ch, kind, coupled)
    got = shim.cell_forward(gates, c_prev, weight_ch, kind, coupled, *geometry)
    for a, b in zip(got, expected):
        close(a, b, dtype)

    _, c, gates_out = expected
    grad_h = torch.randn(B, H, generator=g).to(dtype)
    grad_c = torch.randn(B, H, generator=g).to(dtype)
    for gh, gc in [(grad_h, grad_c), (None, grad_c), (grad_h, None)]:
        expected = ops.cell_backward(gh, gc, gates_out, c_prev, c, weight_ch, kind, coupled)
        got = shim.cell_backward(gh, gc, gates_out, c_prev, c, weight_ch, kind, coupled, *geometry)
        for a, b in zip(got, expected):
            close(a, b, dtype)


@variant_params
@grid(dtype=DTYPES, packed=[False, True], reverse=[False, True], proj=[0, 2])
def test_layer_with_cuda_kernels_matches_cpu(variant, dtype, packed, reverse, proj):
    g = torch.Generator().manual_seed(1)
    args = layer_op_args(variant, dtype, packed, reverse, proj, g)
    geometry = (3, 7)
    expected = ops.layer_forward(*args)
    got = shim.layer_forward(*args, *geometry)
    for a, b in zip(got, expected):
        close(a, b, dtype)

    out, h_n, c_n, gates, cells = expected
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (out, h_n, c_n)]
    backward_args = (*grads, *args[:9], out, gates, cells, *args[9:], True)
    expected = ops.layer_backward(*backward_args)
    got = shim.layer_backward(*backward_args, *geometry)
    for a, b in zip(got, expected):
        close(a, b, dtype)


def test_shim_covers_every_op():
    for name in ("cell_forward", "cell_backward", "layer_forward", "layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused_host_shim::{name}",
                                                              "CPU")


@pytest.mark.parametrize("variant", VARIANTS[:1])
def test_shim_geometry_is_really_forced(variant):
    """A grid smaller than the work must still cover every element (grid-stride loop); this
    fails if the forced geometry were ignored and the kernel indexed only threadIdx."""
    g = torch.Generator().manual_seed(0)
    gates = torch.randn(7, 4 * 50, generator=g)
    c_prev = torch.randn(7, 50, generator=g)
    expected = ops.cell_forward(gates, c_prev, None, "none", False)
    for geometry in [(1, 1), (2, 3), (1000, 1024)]:
        got = shim.cell_forward(gates, c_prev, None, "none", False, *geometry)
        for a, b in zip(got, expected):
            close(a, b, torch.float32)
