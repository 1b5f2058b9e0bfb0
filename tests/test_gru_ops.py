"""The GRU's layer ops (torch.ops.lstm_fused.gru_layer_forward / gru_layer_backward) below the
modules: the CUDA kernels on the host shim against the CPU kernels, every storage dtype against
float64, the inference path, the op's own argument checks, opcheck, autocast, compile and export.
Module-level parity with torch.nn.GRU is in tests/test_gru.py."""

import pytest
import torch
from conftest import assert_close, assert_close_scaled, grid, host_shim_launches

from lstm_fused import functional
from lstm_fused._double_backward import gru_layer as recomputed_gru_layer
from lstm_fused.ops import ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def gru_op_args(dtype, packed, reverse, generator, *, batch=5, hidden=33, input_size=7,
                steps=4, bias=True):
    """(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, reverse) of
    gru_layer_forward: padded [T, B, I], or packed [N, I] with ragged batch sizes."""
    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.5).to(dtype)

    sizes = [batch, batch, batch - 2, 1][:steps] if packed else None
    x = rand(sum(sizes), input_size) if packed else rand(steps, batch, input_size)
    G = 3 * hidden
    biases = (rand(G), rand(G)) if bias else (None, None)
    return (x, rand(batch, hidden), rand(G, input_size), rand(G, hidden), *biases, sizes, reverse)


@grid(dtype=DTYPES, packed=[False, True], reverse=[False, True], bias=[True, False])
def test_gru_layer_with_cuda_kernels_matches_cpu(host_shim, dtype, packed, reverse, bias):
    g = torch.Generator().manual_seed(1)
    args = gru_op_args(dtype, packed, reverse, g, bias=bias)
    geometry = (3, 7)
    # The scalar activations of the CUDA kernels vs the CPU's SIMD ones (float32 tanh: a 3-ULP
    # rational form), their differences carried through the steps: the CUDA-vs-CPU tolerance.
    expected = ops.gru_layer_forward(*args)
    got = host_shim.gru_layer_forward(*args, *geometry)
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="devices")

    out, h_n, gates = expected
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (out, h_n)]
    backward_args = (*grads, *args[:6], out, gates, *args[6:], True)
    expected = ops.gru_layer_backward(*backward_args)
    got = host_shim.gru_layer_backward(*backward_args, *geometry)
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="devices")


def test_gru_layer_launches_one_pointwise_kernel_per_step(host_shim):
    g = torch.Generator().manual_seed(2)
    args = gru_op_args(torch.float32, False, False, g)
    steps = args[0].shape[0]
    host_shim_launches()
    out, _h_n, gates = host_shim.gru_layer_forward(*args, 3, 7)
    assert host_shim_launches() == [(3, 7, 21)] * steps
    host_shim.gru_layer_backward(torch.ones_like(out), None, *args[:6], out, gates, *args[6:],
                                 True, 3, 7)
    assert host_shim_launches() == [(3, 7, 21)] * steps


@grid(dtype=[torch.float16, torch.bfloat16], packed=[False, True])
def test_half_storage_follows_float64(dtype, packed):
    """fp32 math inside the kernels for fp16/bf16 storage: outputs and every gradient within a
    few roundings of the float64 result."""
    g = torch.Generator().manual_seed(3)
    args64 = gru_op_args(torch.float64, packed, False, g)
    tensors64 = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args64[:6]]
    tensors = [t.detach().to(dtype).requires_grad_() for t in tensors64]
    sizes = args64[6]
    out64, h64 = functional.gru_layer(*tensors64, batch_sizes=sizes)
    out, h = functional.gru_layer(*tensors, batch_sizes=sizes)
    assert out.dtype == dtype
    assert_close_scaled(out, out64, dtype, "output")
    assert_close_scaled(h, h64, dtype, "h_n")
    weights = torch.randn(out64.shape, dtype=torch.float64, generator=g)
    (out64 * weights).sum().backward()
    (out * weights.to(dtype)).float().sum().backward()
    for t, t64, name in zip(tensors, tensors64, ("input", "h0", "weight_ih", "weight_hh",
                                                 "bias_ih", "bias_hh")):
        assert_close_scaled(t.grad, t64.grad, dtype, name, kind="autocast_grad")


@grid(packed=[False, True], reverse=[False, True])
def test_inference_path_saves_nothing_and_matches_training(packed, reverse):
    g = torch.Generator().manual_seed(4)
    args = gru_op_args(torch.float32, packed, reverse, g)
    out, h_n, gates = ops.gru_layer_forward(*args, True)
    out_i, h_n_i, gates_i = ops.gru_layer_forward(*args, False)
    assert gates.shape[-1] == 4 * args[1].shape[-1] and gates_i.numel() == 0
    # The input projection may take another GEMM path (gemm_nt's measured one): same arithmetic,
    # another summation order.
    assert_close(out_i, out, torch.float32, "output", kind="kernels")
    assert_close(h_n_i, h_n, torch.float32, "h_n", kind="kernels")


@grid(packed=[False, True], reverse=[False, True])
def test_saved_gates_are_r_z_n_and_the_recurrent_n_preactivation(packed, reverse):
    """What the forward saves for the backward, computed from its definition at step 0."""
    g = torch.Generator().manual_seed(5)
    x, h0, w_ih, w_hh, b_ih, b_hh, sizes, reverse = gru_op_args(torch.float64, packed, reverse,
                                                                  g)
    _, _, gates = ops.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, sizes, reverse)
    first = (len(sizes) - 1 if packed else x.shape[0] - 1) if reverse else 0
    if packed:
        start = sum(sizes[:first])
        rows, x_t, saved = sizes[first], None, None
        x_t, saved = x[start:start + rows], gates[start:start + rows]
    else:
        x_t, saved = x[first], gates[first]
        rows = x_t.shape[0]
    a = x_t @ w_ih.T + b_ih
    b = h0[:rows] @ w_hh.T + b_hh
    H = h0.shape[-1]
    r = torch.sigmoid(a[:, :H] + b[:, :H])
    z = torch.sigmoid(a[:, H:2 * H] + b[:, H:2 * H])
    n = torch.tanh(a[:, 2 * H:] + r * b[:, 2 * H:])
    for k, expected in enumerate((r, z, n, b[:, 2 * H:])):
        torch.testing.assert_close(saved[:, k * H:(k + 1) * H], expected)


def test_empty_sequence_returns_h0():
    g = torch.Generator().manual_seed(6)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = gru_op_args(torch.float32, False, False, g)
    out, h_n, _ = ops.gru_layer_forward(x[:0], h0, w_ih, w_hh, b_ih, b_hh, None, False)
    assert out.shape == (0, *h0.shape)
    torch.testing.assert_close(h_n, h0, rtol=0, atol=0)


@pytest.mark.parametrize("case, message", [
    ("weight_ih", "weight_ih"), ("weight_hh", "weight_hh"), ("h0", "h0"),
    ("bias_hh", "bias_hh"), ("dtype", "weight_hh"), ("batch_sizes", "batch_sizes"),
    ("zoneout_h", "zoneout_h")])
def test_op_names_the_bad_argument(case, message):
    """Direct torch.ops callers get a clear error naming the argument, from the op's own check."""
    g = torch.Generator().manual_seed(7)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = gru_op_args(torch.float32, False, False, g)
    sizes = None
    if case == "weight_ih":
        w_ih = w_ih[:-1]
    elif case == "weight_hh":
        w_hh = w_hh[:, :-1]
    elif case == "h0":
        h0 = h0[:-1]
    elif case == "bias_hh":
        b_hh = b_hh[:-1]
    elif case == "dtype":
        w_hh = w_hh.double()
    elif case == "batch_sizes":
        x, sizes = x.reshape(-1, x.shape[-1]), [5, 5, 6, 4]
    keep_h = torch.zeros(*x.shape[:-1], h0.shape[-1] - 1) if case == "zoneout_h" else None
    with pytest.raises((ValueError, TypeError), match=message):
        ops.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, sizes, False, True, keep_h)


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed):
    g = torch.Generator().manual_seed(8)
    args = gru_op_args(torch.float64, packed, False, g, batch=3, hidden=4, input_size=3)
    torch.library.opcheck(ops.gru_layer_forward, args)
    grad_args = tuple(t.detach().requires_grad_() for t in args[:6]) + args[6:]
    torch.library.opcheck(ops.gru_layer_forward, grad_args)
    out, h_n, gates = ops.gru_layer_forward(*args)
    torch.library.opcheck(ops.gru_layer_backward, (torch.randn_like(out), torch.randn_like(h_n),
                                                   *args[:6], out, gates, *args[6:], True))


@grid(packed=[False, True], reverse=[False, True])
def test_double_backward(packed, reverse):
    g = torch.Generator().manual_seed(9)
    args = gru_op_args(torch.float64, packed, reverse, g, batch=3, hidden=3, input_size=2,
                       steps=3)
    tensors = [t.requires_grad_() for t in args[:6]]
    sizes = args[6] if not packed else [3, 2, 1]
    if packed:
        tensors[0] = torch.randn(6, 2, dtype=torch.float64, generator=g).requires_grad_()

    def layer(*t):
        return functional.gru_layer(*t, reverse=reverse, batch_sizes=sizes)

    assert torch.autograd.gradgradcheck(layer, tuple(tensors))


def test_double_backward_recomputation_is_the_op():
    """The recomputation double backward differentiates computes what the op computes."""
    g = torch.Generator().manual_seed(10)
    for packed in (False, True):
        args = gru_op_args(torch.float64, packed, True, g)
        out, h_n, _ = ops.gru_layer_forward(*args)
        out_r, h_r = recomputed_gru_layer(*args)
        assert_close(out_r, out, torch.float64)
        assert_close(h_r, h_n, torch.float64)


def test_autocast_runs_in_the_autocast_dtype_and_backward_in_the_forwards():
    g = torch.Generator().manual_seed(11)
    args = gru_op_args(torch.float32, False, False, g)
    tensors = [t.requires_grad_() for t in args[:6]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _h_n = functional.gru_layer(*tensors)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in tensors)
    expected, _ = functional.gru_layer(*[t.detach() for t in tensors])
    assert_close_scaled(out, expected, torch.bfloat16, "output", kind="autocast")


def test_compile_fullgraph_and_export():
    g = torch.Generator().manual_seed(12)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = gru_op_args(torch.float32, False, False, g)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterList([w_ih, w_hh, b_ih, b_hh])

        def forward(self, x, h0):
            return functional.gru_layer(x, h0, *self.w)

    layer = Layer()
    expected = layer(x, h0)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x, h0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    got[0].sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    exported = torch.export.export(layer, (x, h0))
    for a, b in zip(exported.module()(x, h0), expected):
        torch.testing.assert_close(a, b)


@grid(dtype=DTYPES, batch=[1, 5], bias=[True, False])
def test_gru_cell_step_with_cuda_kernels_matches_cpu_and_the_layer_op(host_shim, dtype, batch,
                                                                      bias):
    """GRUCell's latency op (both GEMMs and the fused kernel, nothing saved) on the host shim and
    the CPU kernels, and the same step through the layer op."""
    g = torch.Generator().manual_seed(13)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = gru_op_args(dtype, False, False, g, batch=batch,
                                                      steps=1, bias=bias)
    expected = ops.gru_cell_step(x[0], h0, w_ih, w_hh, b_ih, b_hh)
    assert_close(host_shim.gru_cell_step(x[0], h0, w_ih, w_hh, b_ih, b_hh, 3, 7), expected,
                 dtype, kind="devices")
    _, h_n, _ = ops.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, False, False)
    assert_close(expected, h_n, dtype, kind="devices")


def test_gru_cell_step_names_the_bad_argument():
    g = torch.Generator().manual_seed(14)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = gru_op_args(torch.float32, False, False, g, steps=1)
    with pytest.raises(ValueError, match="weight_hh"):
        ops.gru_cell_step(x[0], h0, w_ih, w_hh[:, :-1], b_ih, b_hh)
    with pytest.raises(ValueError, match="hx"):
        ops.gru_cell_step(x[0], h0[:-1], w_ih, w_hh, b_ih, b_hh)


def test_gru_cell_under_no_grad_takes_the_one_op_step_and_matches_autograd():
    import lstm_fused

    cell = lstm_fused.GRUCell(7, 33)
    x, h = torch.randn(4, 7), torch.randn(4, 33)
    expected = cell(x, h)
    with torch.profiler.profile() as prof, torch.no_grad():
        got = cell(x, h)
    names = {e.name for e in prof.events()}
    assert "lstm_fused::gru_cell_step" in names and "lstm_fused::gru_layer_forward" not in names
    assert_close(got, expected, torch.float32, kind="devices")


@grid(dtype=[torch.float32, torch.float64], packed=[False, True], keep=["mask", "rate"])
def test_gru_layer_zoneout_with_cuda_kernels_matches_cpu(host_shim, dtype, packed, keep):
    g = torch.Generator().manual_seed(15)
    args = gru_op_args(dtype, packed, True, g)
    x, h0 = args[0], args[1]
    if keep == "mask":
        keep_h = torch.bernoulli(torch.full((*x.shape[:-1], h0.shape[-1]), 0.4), generator=g)
    else:  # eval: one row of rates, expanded (row stride 0)
        keep_h = torch.full((h0.shape[-1],), 0.3).expand(*x.shape[:-1], h0.shape[-1])
    keep_h = keep_h.to(dtype)
    expected = ops.gru_layer_forward(*args, True, keep_h)
    got = host_shim.gru_layer_forward(*args, 3, 7, keep_h)
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="devices")
    out, h_n, gates = expected
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (out, h_n)]
    backward_args = (*grads, *args[:6], out, gates, *args[6:], True)
    expected = ops.gru_layer_backward(*backward_args, keep_h)
    got = host_shim.gru_layer_backward(*backward_args, 3, 7, keep_h)
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="devices")


@pytest.mark.parametrize("op", ["gru_cell_step", "cell_step"])
def test_step_ops_check_layouts_and_devices_before_dispatch(op):
    """The forward-only step ops get the BackendSelect checks of the other ops: a sparse or meta
    argument is refused by name, not dispatched to a missing or wrong kernel."""
    g = torch.Generator().manual_seed(16)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = gru_op_args(torch.float32, False, False, g, steps=1)
    if op == "gru_cell_step":
        args = [x[0], h0, w_ih, w_hh, b_ih, b_hh]
    else:
        H = h0.shape[-1]
        args = [x[0], h0, h0.clone(), torch.randn(4 * H, x.shape[-1]), torch.randn(4 * H, H),
                None, None, None, "none", False]
    function = getattr(ops, op)
    sparse = list(args)
    weight_hh = 3 if op == "gru_cell_step" else 4  # its position
    sparse[weight_hh] = sparse[weight_hh].to_sparse()
    with pytest.raises(TypeError, match="weight_hh"):
        function(*sparse)
    meta = list(args)
    meta[1] = meta[1].to("meta")
    with pytest.raises(RuntimeError, match="hx"):
        function(*meta)
