"""The CUDA kernels (csrc/cuda/pointwise_kernels.cuh), compiled for the host and run block by block
and thread by thread on the CPU, against the CPU kernels: the same launch code, indexing and
dtype dispatch that a GPU runs, at several launch geometries. The shim is a test-only library
(conftest.load_host_shim); the installed package does not register it."""

import pytest
import torch
from conftest import (
    assert_close,
    grid,
    host_shim_launches,
    layer_op_args,
    make_weight_ch,
    variant_params,
)

from lstm_fused.ops import OP_NAMES, ops

# (blocks, threads): (0, 0) is the geometry the CUDA launcher picks; the others force fewer
# threads than elements (grid-stride loop), odd sizes, and more threads than elements.
GEOMETRIES = [(0, 0), (1, 32), (3, 7), (64, 256)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def close(a, b, dtype):
    assert_close(a, b, dtype, kind="kernels")


def cuda_default_geometry(elements):
    """The grid csrc/cuda/pointwise_kernels.cuh's pointwise_geometry picks: 256-thread blocks."""
    return (min(-(-elements // 256), 65535), 256)


@variant_params
@grid(dtype=DTYPES, geometry=GEOMETRIES)
def test_cell_kernels_match_cpu(host_shim, variant, dtype, geometry):
    peephole, coupled = variant
    kind = peephole or "none"
    g = torch.Generator().manual_seed(0)
    B, H = 5, 33
    G = 3 if coupled else 4
    gates = torch.randn(B, G * H, generator=g).to(dtype)
    c_prev = torch.randn(B, H, generator=g).to(dtype)
    weight_ch = make_weight_ch(peephole, coupled, H, g, dtype)

    expected = ops.cell_forward(gates, c_prev, weight_ch, kind, coupled)
    got = host_shim.cell_forward(gates, c_prev, weight_ch, kind, coupled, *geometry)
    for a, b in zip(got, expected):
        close(a, b, dtype)

    _, c, gates_out = expected
    grad_h = torch.randn(B, H, generator=g).to(dtype)
    grad_c = torch.randn(B, H, generator=g).to(dtype)
    for gh, gc in [(grad_h, grad_c), (None, grad_c), (grad_h, None)]:
        expected = ops.cell_backward(gh, gc, gates_out, c_prev, c, weight_ch, kind, coupled)
        got = host_shim.cell_backward(gh, gc, gates_out, c_prev, c, weight_ch, kind, coupled,
                                      *geometry)
        for a, b in zip(got, expected):
            close(a, b, dtype)


@variant_params
@grid(dtype=DTYPES, packed=[False, True], reverse=[False, True], proj=[0, 2])
def test_layer_with_cuda_kernels_matches_cpu(host_shim, variant, dtype, packed, reverse, proj):
    g = torch.Generator().manual_seed(1)
    args = layer_op_args(variant, dtype, packed, reverse, proj, g)
    geometry = (3, 7)
    expected = ops.layer_forward(*args)
    got = host_shim.layer_forward(*args, *geometry)
    for a, b in zip(got, expected):
        close(a, b, dtype)

    out, h_n, c_n, gates, cells = expected
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (out, h_n, c_n)]
    backward_args = (*grads, *args[:9], out, gates, cells, *args[9:], True)
    expected = ops.layer_backward(*backward_args)
    got = host_shim.layer_backward(*backward_args, *geometry)
    for a, b in zip(got, expected):
        close(a, b, dtype)


@pytest.mark.parametrize("geometry", [(1, 1), (2, 3), (0, 0)], ids=str)
def test_keep_mask_cuda_kernel_equals_the_cpu_kernel_bit_for_bit(host_shim, geometry):
    """Zoneout's keep masks (the Philox kernel, one block of four elements per thread, the key
    read on the device) are the CPU kernel's, element for element, in every dtype: the same
    seed gives the same mask on the GPU and the CPU. (0, 0): the CUDA default grid."""
    for size in ([0], [1], [5], [7, 5, 9], [3, 129]):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            seed = torch.tensor([-987654321987], dtype=torch.int64)
            expected = ops.keep_mask(seed, size, 0.3, dtype)
            got = host_shim.keep_mask(seed, size, 0.3, dtype, *geometry)
            assert got.dtype == dtype and torch.equal(got, expected), (size, dtype)


def test_shim_covers_every_op(host_shim):
    for name in (*OP_NAMES, "cell_step", "gru_cell_step", "keep_mask"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused_host_shim::{name}",
                                                              "CPU")


@pytest.mark.parametrize("geometry", [(1, 1), (2, 3), (1000, 1024)])
def test_forced_geometry_is_the_geometry_that_runs(host_shim, geometry):
    """The shim runs exactly the forced grid (every block, every thread), and a grid smaller than
    the work still covers every element (grid-stride loop)."""
    g = torch.Generator().manual_seed(0)
    gates = torch.randn(7, 4 * 50, generator=g)
    c_prev = torch.randn(7, 50, generator=g)
    expected = ops.cell_forward(gates, c_prev, None, "none", False)
    host_shim_launches()  # forget earlier launches
    got = host_shim.cell_forward(gates, c_prev, None, "none", False, *geometry)
    blocks, threads = geometry
    assert host_shim_launches() == [(blocks, threads, blocks * threads)]
    for a, b in zip(got, expected):
        close(a, b, torch.float32)


@pytest.mark.parametrize("rows, hidden", [(7, 50), (3, 1000)])
def test_default_geometry_is_the_cuda_launchers(host_shim, rows, hidden):
    gates = torch.randn(rows, 4 * hidden)
    c_prev = torch.randn(rows, hidden)
    host_shim_launches()
    host_shim.cell_forward(gates, c_prev, None, "none", False, 0, 0)
    blocks, threads = cuda_default_geometry(rows * hidden)
    assert host_shim_launches() == [(blocks, threads, blocks * threads)]


@variant_params
def test_layer_launches_one_pointwise_kernel_per_step(host_shim, variant):
    """Forward and backward: one fused kernel per time step, two (around the W_co GEMM) for full
    peepholes, all at the forced grid."""
    peephole, _ = variant
    g = torch.Generator().manual_seed(2)
    args = layer_op_args(variant, torch.float32, False, False, 0, g)
    steps = args[0].shape[0]
    per_step = 2 if peephole == "full" else 1
    host_shim_launches()
    out, _, _, gates, cells = host_shim.layer_forward(*args, 3, 7)
    assert host_shim_launches() == [(3, 7, 21)] * (steps * per_step)
    backward_args = (torch.ones_like(out), None, None, *args[:9], out, gates, cells, *args[9:],
                     True)
    host_shim.layer_backward(*backward_args, 3, 7)
    assert host_shim_launches() == [(3, 7, 21)] * (steps * per_step)


def cell_step_args(variant, dtype, batch, generator, input_size=7, hidden=33, bias=True):
    """(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, peephole, coupled) of
    torch.ops.lstm_fused.cell_step."""
    peephole, coupled = variant
    G = 3 if coupled else 4

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.5).to(dtype)

    biases = (rand(G * hidden), rand(G * hidden)) if bias else (None, None)
    return (rand(batch, input_size), rand(batch, hidden), rand(batch, hidden),
            rand(G * hidden, input_size), rand(G * hidden, hidden), *biases,
            make_weight_ch(peephole, coupled, hidden, generator, dtype), peephole or "none",
            coupled)


@variant_params
@grid(dtype=DTYPES, batch=[1, 5], bias=[True, False])
def test_cell_step_with_cuda_kernels_matches_cpu(host_shim, variant, dtype, batch, bias):
    """The whole LSTMCell step (both GEMMs and the fused kernel, one op) with the CUDA kernels:
    the CPU kernel's (h, c), and the CUDA kernel ran (one launch, two for full peepholes' two
    parts), never the CPU-only simd step."""
    g = torch.Generator().manual_seed(3)
    args = cell_step_args(variant, dtype, batch, g, bias=bias)
    expected = ops.cell_step(*args)
    host_shim_launches()
    got = host_shim.cell_step(*args, 3, 7)
    assert host_shim_launches() == [(3, 7, 21)] * (2 if variant[0] == "full" else 1)
    for a, b in zip(got, expected):
        close(a, b, dtype)


@pytest.mark.parametrize("op", ["layer", "cell_step"])
def test_forced_simd_gemm_still_runs_the_cuda_kernels(host_shim, op):
    """The CPU-only fused simd step (GEMM and pointwise in one CPU kernel) belongs to the CPU kernel
    table: with the simd GEMM path forced, the shim still launches the CUDA kernel every step."""
    from lstm_fused import cpu_gemm

    g = torch.Generator().manual_seed(4)
    variant = (None, False)
    with cpu_gemm.mode("simd"):
        if op == "layer":
            args = layer_op_args(variant, torch.float32, False, False, 0, g)
            expected = ops.layer_forward(*args)
            host_shim_launches()
            got = host_shim.layer_forward(*args, 3, 7)
            launches = args[0].shape[0]
        else:
            args = cell_step_args(variant, torch.float32, 1, g)
            expected = ops.cell_step(*args)
            host_shim_launches()
            got = host_shim.cell_step(*args, 3, 7)
            launches = 1
    assert host_shim_launches() == [(3, 7, 21)] * launches
    for a, b in zip(got, expected):
        if a.numel():
            close(a, b, torch.float32)


@variant_params
@grid(dtype=[torch.float32, torch.float64], packed=[False, True], proj=[0, 2],
      keep=["masks", "rates"], layer_norm=[False, True])
def test_layer_zoneout_with_cuda_kernels_matches_cpu(host_shim, variant, dtype, packed, proj,
                                                     keep, layer_norm):
    """Zoneout's keep values (0/1 masks, or eval's rates as one expanded row) through the CUDA
    kernels, forward and backward, with a cell clip, without and with layer norm's rows."""
    g = torch.Generator().manual_seed(3)
    args = layer_op_args(variant, dtype, packed, False, proj, g)
    lead, R, H = args[0].shape[:-1], args[1].shape[-1], args[2].shape[-1]
    if keep == "masks":
        keeps = tuple((torch.rand(*lead, width, generator=g) < 0.5).to(dtype) for width in (R, H))
    else:
        keeps = tuple(torch.full((width,), rate, dtype=dtype).expand(*lead, width)
                      for width, rate in ((R, 0.3), (H, 0.6)))
    clips = (0.4, 0.0)
    gates = 3 if variant[1] else 4
    norm = ((1 + 0.2 * torch.randn(gates, H, generator=g)).to(dtype),) if layer_norm else ()
    expected = ops.layer_forward(*args, True, *clips, *keeps, *norm)
    got = host_shim.layer_forward(*args, 3, 7, *clips, *keeps, *norm)
    for a, b in zip(got, expected):
        close(a, b, dtype)

    out, h_n, c_n, gates, cells = expected
    assert cells.shape[-1] == 2 * H  # the computed and the zoned c
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (out, h_n, c_n)]
    backward_args = (*grads, *args[:9], out, gates, cells, *args[9:], True)
    expected = ops.layer_backward(*backward_args, *clips, *keeps, *norm)
    got = host_shim.layer_backward(*backward_args, 3, 7, *clips, *keeps, *norm)
    for a, b in zip(got, expected):
        close(a, b, dtype)
