"""float16 / bfloat16 on the CPU: layers and cells (LSTM and GRU) with half storage against the
float32 reference (the kernels compute in float and cast back), the weight-gradient reductions
accumulating in float, and torch.autocast (every op has an autocast kernel; backward ops keep the
forward's dtype). The same checks on CUDA are in test_cuda.py."""

import pytest
import torch
from conftest import assert_close_scaled, grid, make_weight_ch, variant_params

import lstm_fused
from lstm_fused import reference
from lstm_fused.ops import OP_NAMES, ops

HALF_DTYPES = [torch.bfloat16, torch.float16]


def states(finals):
    """A module's final states as a tuple: (h_n, c_n) for an LSTM, (h_n,) for a GRU."""
    return (finals,) if isinstance(finals, torch.Tensor) else tuple(finals)


def outputs_and_grads(module, x, seed=5):
    out, finals = module(x)
    outputs = (out, *states(finals))
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g).to(t.dtype) for t in outputs]
    loss = sum((t.float() * w.float()).sum() for t, w in zip(outputs, weights))
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [*outputs, *grads]


@variant_params
@grid(dtype=HALF_DTYPES, bidirectional=[False, True], proj=[0, 3])
def test_half_layer_matches_float32_reference(variant, dtype, bidirectional, proj):
    peephole, coupled = variant
    torch.manual_seed(0)
    kwargs = {"num_layers": 2, "bidirectional": bidirectional, "proj_size": proj,
              "peephole": peephole, "coupled": coupled}
    half = lstm_fused.LSTM(6, 8, dtype=dtype, **kwargs)
    ref = lstm_fused.LSTM(6, 8, dtype=torch.float32, **kwargs)
    ref._layer_fn = reference.lstm_layer
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(7, 3, 6).to(dtype)
    got = outputs_and_grads(half, x.clone().requires_grad_())
    expected = outputs_and_grads(ref, x.float().requires_grad_())
    names = ["output", "h_n", "c_n", "grad input"] + [n for n, _ in half.named_parameters()]
    for a, b, name in zip(got, expected, names):
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_close_scaled(a, b, dtype, name)


@grid(dtype=HALF_DTYPES, bidirectional=[False, True], bias=[True, False])
def test_half_gru_matches_float32_reference(dtype, bidirectional, bias):
    torch.manual_seed(0)
    kwargs = {"num_layers": 2, "bidirectional": bidirectional, "bias": bias}
    half = lstm_fused.GRU(6, 8, dtype=dtype, **kwargs)
    ref = lstm_fused.GRU(6, 8, dtype=torch.float32, **kwargs)
    ref._layer_fn = reference.gru_layer
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(7, 3, 6).to(dtype)
    got = outputs_and_grads(half, x.clone().requires_grad_())
    expected = outputs_and_grads(ref, x.float().requires_grad_())
    names = ["output", "h_n", "grad input"] + [n for n, _ in half.named_parameters()]
    assert len(got) == len(expected) == len(names)
    for a, b, name in zip(got, expected, names):
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_close_scaled(a, b, dtype, name)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_packed_layer_matches_float32_reference(dtype):
    torch.manual_seed(1)
    half = lstm_fused.LSTM(4, 6, peephole="diagonal", bidirectional=True, dtype=dtype)
    ref = lstm_fused.LSTM(4, 6, peephole="diagonal", bidirectional=True)
    ref._layer_fn = reference.lstm_layer
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(5, 3, 4).to(dtype)

    def run(module, inputs):
        packed = torch.nn.utils.rnn.pack_padded_sequence(inputs, lengths, enforce_sorted=False)
        out, (h_n, c_n) = module(packed)
        return [out.data, h_n, c_n]

    for a, b, name in zip(run(half, x), run(ref, x.float()), ["output", "h_n", "c_n"]):
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_close_scaled(a, b, dtype, name)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_packed_gru_matches_float32_reference(dtype):
    torch.manual_seed(1)
    half = lstm_fused.GRU(4, 6, num_layers=2, bidirectional=True, dtype=dtype)
    ref = lstm_fused.GRU(4, 6, num_layers=2, bidirectional=True)
    ref._layer_fn = reference.gru_layer
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(5, 3, 4).to(dtype)

    def run(module, inputs):
        inputs = inputs.detach().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(inputs, lengths, enforce_sorted=False)
        out, h_n = module(packed)
        loss = (out.data.float() * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)
                ).sum() + h_n.float().sum()
        return [out.data, h_n, *torch.autograd.grad(loss, [inputs, *module.parameters()])]

    names = ["output", "h_n", "grad input"] + [n for n, _ in half.named_parameters()]
    for a, b, name in zip(run(half, x), run(ref, x.float()), names, strict=True):
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_close_scaled(a, b, dtype, name)


@variant_params
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_cell_matches_float32_reference(variant, dtype):
    peephole, coupled = variant
    torch.manual_seed(2)
    half = lstm_fused.LSTMCell(5, 16, peephole=peephole, coupled=coupled, dtype=dtype)
    x, h, c = torch.randn(4, 5), torch.randn(4, 16), torch.randn(4, 16)
    params = [p.float() if p is not None else None for p in half._parameters_for("")]
    expected = reference.lstm_cell(x, h, c, *params, peephole=peephole, coupled=coupled)
    got = half(x.to(dtype), (h.to(dtype), c.to(dtype)))
    for a, b, name in zip(got, expected, ("h", "c")):
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_close_scaled(a, b, dtype, name)


@grid(dtype=HALF_DTYPES, bias=[True, False], batched=[True, False])
def test_half_gru_cell_matches_float32_reference(dtype, bias, batched):
    torch.manual_seed(2)
    half = lstm_fused.GRUCell(5, 16, bias=bias, dtype=dtype)
    x, h = torch.randn(4, 5), torch.randn(4, 16)
    if not batched:
        x, h = x[0], h[0]
    params = [p.float() if p is not None else None
              for p in (half.weight_ih, half.weight_hh, half.bias_ih, half.bias_hh)]
    expected = reference.gru_cell(x.view(-1, 5), h.view(-1, 16), *params).view(h.shape)
    got = half(x.to(dtype), h.to(dtype))
    assert got.dtype == dtype and got.shape == h.shape
    assert_close_scaled(got, expected, dtype, "h")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_diagonal_peephole_gradient_accumulates_in_float(dtype):
    """grad_weight_ch sums dz * c over every row. Computed in float and rounded once it is within
    one unit in the last place of the exact sum; multiplying in half precision first (rounding
    every product) is off by tens of units over 4096 rows."""
    g = torch.Generator().manual_seed(0)
    B, H = 4096, 64
    gates = torch.randn(B, 4 * H, generator=g).to(dtype)
    c_prev = torch.randn(B, H, generator=g).to(dtype)
    weight_ch = (torch.randn(3, H, generator=g) * 0.5).to(dtype)
    _, c, gates_out = ops.cell_forward(gates, c_prev, weight_ch, "diagonal", False)
    grad_h = torch.randn(B, H, generator=g).to(dtype)
    grad_z, _, grad_weight_ch = ops.cell_backward(grad_h, None, gates_out, c_prev, c, weight_ch,
                                                  "diagonal", False)
    dz = grad_z.double()
    exact = torch.cat([(dz[:, :2 * H].view(B, 2, H) * c_prev.double().unsqueeze(1)).sum(0),
                       (dz[:, 3 * H:] * c.double()).sum(0, keepdim=True)])
    relative = ((grad_weight_ch.double() - exact).abs() / exact.abs()).max()
    assert relative <= torch.finfo(dtype).eps, f"{relative / torch.finfo(dtype).eps:.1f} ulp"


# --- autocast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
def test_every_op_has_an_autocast_kernel(key):
    for name in (*OP_NAMES, "cell_step", "gru_cell_step"):  # and the cells' one-op steps
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{name}", key), name


@variant_params
def test_cell_step_under_cpu_autocast_runs_in_bfloat16(variant):
    """torch.ops.lstm_fused.cell_step's autocast kernel: float32 arguments are cast to bfloat16
    (CPU autocast's default) and the op runs in it, as if called on bfloat16 tensors."""
    peephole, coupled = variant
    g = torch.Generator().manual_seed(5)
    G, H = (3 if coupled else 4), 16
    args = [torch.randn(*shape, generator=g) * 0.5
            for shape in ((3, 8), (3, H), (3, H), (G * H, 8), (G * H, H), (G * H,), (G * H,))]
    weight_ch = make_weight_ch(peephole, coupled, H, g)
    rest = (peephole or "none", coupled)
    with torch.autocast("cpu"):
        h, c = ops.cell_step(*args, weight_ch, *rest)
    assert h.dtype == c.dtype == torch.bfloat16
    bf16 = [a.bfloat16() for a in args]
    expected = ops.cell_step(*bf16, None if weight_ch is None else weight_ch.bfloat16(), *rest)
    assert torch.equal(h, expected[0]) and torch.equal(c, expected[1])


@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_step_under_cpu_autocast_runs_in_bfloat16(bias):
    """torch.ops.lstm_fused.gru_cell_step's autocast kernel, as cell_step's: float32 arguments
    are cast to bfloat16 and the op runs in it, as if called on bfloat16 tensors."""
    g = torch.Generator().manual_seed(6)
    H = 16
    shapes = [(3, 8), (3, H), (3 * H, 8), (3 * H, H)] + ([(3 * H,), (3 * H,)] if bias else [])
    args = [torch.randn(*shape, generator=g) * 0.5 for shape in shapes]
    args += [] if bias else [None, None]
    with torch.autocast("cpu"):
        h = ops.gru_cell_step(*args)
    assert h.dtype == torch.bfloat16
    expected = ops.gru_cell_step(*[a.bfloat16() if a is not None else None for a in args])
    assert torch.equal(h, expected)


@variant_params
def test_cpu_autocast_runs_layers_in_bfloat16(variant):
    peephole, coupled = variant
    torch.manual_seed(0)
    module = lstm_fused.LSTM(6, 8, num_layers=2, peephole=peephole, coupled=coupled)
    x = torch.randn(7, 3, 6, requires_grad=True)
    expected = module(x)
    expected_grads = torch.autograd.grad(expected[0].sum(), [x, *module.parameters()])
    with torch.autocast("cpu"):  # bfloat16 is CPU autocast's default
        out, (h_n, c_n) = module(x)
    for got, want in zip((out, h_n, c_n), (expected[0], *expected[1])):
        assert got.dtype == torch.bfloat16
        assert_close_scaled(got, want, torch.bfloat16, "output", kind="autocast")
    # Gradients flow back through autocast's casts to the float32 leaves, in float32.
    grads = torch.autograd.grad(out.float().sum(), [x, *module.parameters()])
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        assert_close_scaled(got, want, torch.bfloat16, "grad", kind="autocast_grad")


@grid(bidirectional=[False, True], packed=[False, True])
def test_cpu_autocast_runs_gru_in_bfloat16(bidirectional, packed):
    torch.manual_seed(0)
    module = lstm_fused.GRU(6, 8, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(7, 3, 6, requires_grad=True)
    lengths = torch.tensor([7, 3, 5])

    def run():
        inp = (torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
               if packed else x)
        out, h_n = module(inp)
        return (out.data if packed else out), h_n

    expected = run()
    expected_grads = torch.autograd.grad(expected[0].sum(), [x, *module.parameters()])
    with torch.autocast("cpu"):  # bfloat16 is CPU autocast's default
        out, h_n = run()
    for got, want, name in zip((out, h_n), expected, ("output", "h_n")):
        assert got.dtype == torch.bfloat16, name
        assert_close_scaled(got, want, torch.bfloat16, name, kind="autocast")
    grads = torch.autograd.grad(out.float().sum(), [x, *module.parameters()])
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == torch.float32
        assert_close_scaled(got, want, torch.bfloat16, "grad", kind="autocast_grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_autocast_follows_the_requested_dtype(dtype):
    module = lstm_fused.LSTM(4, 5, peephole="full")
    with torch.autocast("cpu", dtype=dtype):
        out, (h_n, c_n) = module(torch.randn(3, 2, 4))
    assert out.dtype == h_n.dtype == c_n.dtype == dtype
    gru, cell = lstm_fused.GRU(4, 5), lstm_fused.GRUCell(4, 5)
    with torch.autocast("cpu", dtype=dtype):
        out, h_n = gru(torch.randn(3, 2, 4))
        h = cell(torch.randn(2, 4))
    assert out.dtype == h_n.dtype == h.dtype == dtype


@variant_params
def test_cpu_autocast_cell_with_float32_state(variant):
    """Under autocast the gate GEMMs (F.linear) return bf16 while a user's state stays fp32;
    without an autocast kernel the fused op would reject the mixed dtypes."""
    peephole, coupled = variant
    torch.manual_seed(1)
    cell = lstm_fused.LSTMCell(5, 16, peephole=peephole, coupled=coupled)
    x, hx = torch.randn(4, 5), (torch.randn(4, 16), torch.randn(4, 16))
    expected = cell(x, hx)
    with torch.autocast("cpu"):
        got = cell(x, hx)
    for a, b in zip(got, expected):
        assert a.dtype == torch.bfloat16
        assert_close_scaled(a, b, torch.bfloat16, "cell", kind="autocast")


def test_cpu_autocast_gru_cell_with_float32_state():
    """GRUCell under autocast with a float32 hx: the op's autocast kernel casts the state too."""
    torch.manual_seed(1)
    cell = lstm_fused.GRUCell(5, 16)
    x, h = torch.randn(4, 5, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    expected = cell(x, h)
    expected_grads = torch.autograd.grad(expected.sum(), [x, h, *cell.parameters()])
    with torch.autocast("cpu"):
        got = cell(x, h)
    assert got.dtype == torch.bfloat16
    assert_close_scaled(got, expected, torch.bfloat16, "cell", kind="autocast")
    grads = torch.autograd.grad(got.float().sum(), [x, h, *cell.parameters()])
    for a, b in zip(grads, expected_grads, strict=True):
        assert a.dtype == torch.float32
        assert_close_scaled(a, b, torch.bfloat16, "grad", kind="autocast_grad")


@pytest.mark.parametrize("make", [lambda: lstm_fused.LSTM(4, 6, peephole="diagonal"),
                                  lambda: lstm_fused.GRU(4, 6, bidirectional=True)],
                         ids=["lstm-diagonal", "gru-bidirectional"])
def test_cpu_autocast_under_torch_compile(make):
    torch.manual_seed(2)
    module = make()
    x = torch.randn(5, 2, 4)

    def run(x):
        with torch.autocast("cpu"):
            return module(x)[0]

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    got, expected = compiled(x), run(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _cell_backward_case(dtype):
    g = torch.Generator().manual_seed(3)
    gates, c_prev = torch.randn(3, 4 * 5, generator=g), torch.randn(3, 5, generator=g)
    weight_ch = torch.randn(3, 5, generator=g)
    _, c, gates_out = ops.cell_forward(gates, c_prev, weight_ch, "diagonal", False)
    grad_h = torch.randn(3, 5, generator=g).to(dtype)
    return grad_h, None, gates_out, c_prev, c, weight_ch, "diagonal", False


def test_backward_ops_keep_the_forward_dtype_under_autocast():
    """A float32 forward's backward stays float32 inside an autocast region, and a gradient
    arriving in bf16 is brought to the forward's dtype instead of failing the dtype check."""
    float32_case = _cell_backward_case(torch.float32)
    bf16_grad_case = _cell_backward_case(torch.bfloat16)  # same tensors, grad_h rounded to bf16
    expected = ops.cell_backward(*float32_case)
    expected_mixed = ops.cell_backward(bf16_grad_case[0].float(), *bf16_grad_case[1:])
    with torch.autocast("cpu"):
        got = ops.cell_backward(*float32_case)
        got_mixed = ops.cell_backward(*bf16_grad_case)
    for a, b in zip((*got, *got_mixed), (*expected, *expected_mixed)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: lstm_fused.LSTM(3, 4, peephole="diagonal", proj_size=2),
                                  lambda: lstm_fused.GRU(3, 4, num_layers=2)],
                         ids=["lstm", "gru"])
def test_layer_backward_keeps_the_forward_dtype_under_autocast(make):
    torch.manual_seed(4)
    module = make()
    x = torch.randn(5, 2, 3, requires_grad=True)
    out = module(x)[0]
    expected = torch.autograd.grad(out.sum(), [x, *module.parameters()], retain_graph=True)
    with torch.autocast("cpu"):
        got = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
