"""The fused cell op (one time step) against the reference and torch.nn.LSTMCell."""

import pytest
import torch
from conftest import (
    VARIANTS,
    assert_close,
    assert_close_scaled,
    gradcheck_fused_cell,
    grid,
    make_params,
    make_weight_ch,
    variant_params,
)

import lstm_fused
from lstm_fused import functional, reference
from lstm_fused.ops import ops


def cell_inputs(B, I, H, dtype, generator, requires_grad=False, proj=0):
    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(
            requires_grad)
    return rand(B, I), rand(B, proj or H), rand(B, H)


@variant_params
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_cell(variant, bias):
    assert gradcheck_fused_cell(*variant, bias=bias)


@variant_params
@grid(H=[1, 3, 33, 257], B=[1, 5])
def test_cell_matches_reference_float32(variant, H, B):
    peephole, coupled = variant
    g = torch.Generator().manual_seed(H * 10 + B)
    I = 7
    x, h, c = cell_inputs(B, I, H, torch.float32, g, requires_grad=True)
    params = make_params(I, H, peephole=peephole, coupled=coupled, dtype=torch.float32,
                         requires_grad=True, generator=g)
    inputs = [x, h, c] + [p for p in params if p is not None]

    def run(fn):
        h1, c1 = fn(x, h, c, *params, peephole=peephole, coupled=coupled)
        # Weighted sum so every output element has a distinct gradient.
        w_h = torch.linspace(-1, 1, h1.numel()).view_as(h1)
        w_c = torch.linspace(1, -0.5, c1.numel()).view_as(c1)
        grads = torch.autograd.grad((h1 * w_h).sum() + (c1 * w_c).sum(), inputs)
        return (h1, c1), grads

    (out, grads), (ref_out, ref_grads) = run(functional.lstm_cell), run(reference.lstm_cell)
    for a, b, name in zip(out, ref_out, ("h", "c")):
        assert_close(a, b, torch.float32, name)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, torch.float32, "grad")


@variant_params
def test_cell_non_contiguous_inputs(variant):
    peephole, coupled = variant
    g = torch.Generator().manual_seed(1)
    B, I, H = 5, 6, 9
    x = torch.randn(B, 2 * I, generator=g)[:, ::2]
    h = torch.randn(H, B, generator=g).t()
    c = torch.randn(B, H, 2, generator=g)[..., 0]
    params = make_params(I, H, peephole=peephole, coupled=coupled, dtype=torch.float32,
                         generator=g)
    assert not (x.is_contiguous() or h.is_contiguous() or c.is_contiguous())
    out = functional.lstm_cell(x, h, c, *params, peephole=peephole, coupled=coupled)
    ref = reference.lstm_cell(x, h, c, *params, peephole=peephole, coupled=coupled)
    for a, b in zip(out, ref):
        assert_close(a, b, torch.float32, "non-contiguous")
    # Non-contiguous (even broadcast) cell state straight into the op.
    gates = torch.randn(B, (3 if coupled else 4) * H, generator=g)
    c_b = torch.randn(1, H, generator=g).expand(B, H)
    weight_ch = params[4]
    got = ops.cell_forward(gates, c_b, weight_ch, peephole or "none", coupled)
    want = ops.cell_forward(gates, c_b.contiguous(), weight_ch, peephole or "none", coupled)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vanilla_cell_matches_torch_lstmcell(bias, dtype):
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(6, 11, bias=bias, dtype=dtype)
    ours = lstm_fused.LSTMCell(6, 11, bias=bias, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    hx = (torch.randn(4, 11, dtype=dtype), torch.randn(4, 11, dtype=dtype))
    a, b = ours(x, hx), theirs(x, hx)
    for u, v in zip(a, b):
        assert_close(u, v, dtype, "output")
    (a[0].sum() + a[1].pow(2).sum()).backward()
    gx = x.grad.clone()
    x.grad = None
    (b[0].sum() + b[1].pow(2).sum()).backward()
    assert_close(gx, x.grad, dtype, "grad input")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, dtype, name)


@pytest.mark.parametrize("peephole", [None, "diagonal", "full"])
def test_coupled_cell_equals_standard_with_negated_forget_weights(peephole):
    """sigma(-z) = 1 - sigma(z): coupled == standard whose i-gate parameters are -f's."""
    torch.manual_seed(0)
    H = 5
    coupled = lstm_fused.LSTMCell(3, H, peephole=peephole, coupled=True, dtype=torch.float64)
    standard = lstm_fused.LSTMCell(3, H, peephole=peephole, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            w = getattr(coupled, name)  # blocks (f, g, o)
            getattr(standard, name).copy_(torch.cat([-w[:H], w]))
        if peephole:
            w = coupled.weight_ch  # rows (diagonal) or blocks of H rows (full): (f, o)
            f, o = w.chunk(2)
            standard.weight_ch.copy_(torch.cat([-f, f, o]))
    x = torch.randn(4, 3, dtype=torch.float64)
    hx = (torch.randn(4, H, dtype=torch.float64), torch.randn(4, H, dtype=torch.float64))
    for a, b in zip(coupled(x, hx), standard(x, hx)):
        assert_close(a, b, torch.float64, "coupled vs standard")
    # Sanity: the coupled cell also has a quarter fewer gate parameters.
    assert coupled.weight_ih.shape[0] * 4 == standard.weight_ih.shape[0] * 3


@variant_params
def test_cell_module_conventions(variant):
    peephole, coupled = variant
    cell = lstm_fused.LSTMCell(3, 4, peephole=peephole, coupled=coupled)
    # Optional state defaults to zeros.
    x = torch.randn(2, 3)
    zeros = torch.zeros(2, 4)
    for a, b in zip(cell(x), cell(x, (zeros, zeros))):
        torch.testing.assert_close(a, b)
    # Unbatched input.
    h, c = cell(x[0], (zeros[0], zeros[0]))
    assert h.shape == (4,) and c.shape == (4,)
    torch.testing.assert_close(h, cell(x)[0][0])
    # Parameter names and shapes.
    names = dict(cell.named_parameters())
    assert names["weight_ih"].shape == ((3 if coupled else 4) * 4, 3)
    assert ("weight_ch" in names) == (peephole is not None)
    text = repr(cell)
    assert "LSTMCell(3, 4" in text and ((f"peephole='{peephole}'" in text) == (peephole is not None))
    assert ("coupled=True" in text) == coupled


def test_cell_presets_and_factory_kwargs():
    cell = lstm_fused.PeepholeLSTMCell(3, 4, dtype=torch.float64)
    assert cell.peephole == "diagonal" and cell.weight_ch.dtype == torch.float64
    assert lstm_fused.CoupledLSTMCell(3, 4).coupled
    assert lstm_fused.LSTMCell(3, 4, peephole=True).peephole == "diagonal"
    for p in lstm_fused.LSTMCell(3, 16, peephole=True).parameters():
        assert 0 < p.abs().max() <= 1 / 16 ** 0.5


@variant_params
def test_opcheck_cell_ops(variant):
    peephole, coupled = variant
    kind = peephole or "none"
    g = torch.Generator().manual_seed(0)
    B, H = 3, 5
    G = 3 if coupled else 4
    weight_ch = make_weight_ch(peephole, coupled, H, g)
    gates = torch.randn(B, G * H, generator=g)
    c_prev = torch.randn(B, H, generator=g)
    torch.library.opcheck(ops.cell_forward, (gates, c_prev, weight_ch, kind, coupled))
    torch.library.opcheck(ops.cell_forward, (gates.requires_grad_(), c_prev.requires_grad_(),
                                             weight_ch, kind, coupled))
    _h, c, gates_out = ops.cell_forward(gates.detach(), c_prev.detach(), weight_ch, kind, coupled)
    torch.library.opcheck(ops.cell_backward, (torch.randn(B, H), torch.randn(B, H), gates_out,
                                              c_prev.detach(), c, weight_ch, kind, coupled))
    torch.library.opcheck(ops.cell_backward, (None, torch.randn(B, H), gates_out,
                                              c_prev.detach(), c, weight_ch, kind, coupled))


@variant_params
def test_cell_under_torch_compile_fullgraph(variant):
    peephole, coupled = variant
    torch.manual_seed(0)
    cell = lstm_fused.LSTMCell(4, 6, peephole=peephole, coupled=coupled)
    x = torch.randn(3, 4, requires_grad=True)
    hx = (torch.randn(3, 6), torch.randn(3, 6))

    def step(x, h, c):
        h1, c1 = cell(x, (h, c))
        return cell(x, (h1, c1))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, *hx), step(x, *hx)):
        torch.testing.assert_close(a, b)
    grad_compiled = torch.autograd.grad(compiled(x, *hx)[0].sum(), x)[0]
    grad_eager = torch.autograd.grad(step(x, *hx)[0].sum(), x)[0]
    torch.testing.assert_close(grad_compiled, grad_eager)


def test_cell_bfloat16_cpu():
    g = torch.Generator().manual_seed(0)
    for peephole, coupled in VARIANTS:
        x, h, c = cell_inputs(4, 5, 16, torch.float32, g)
        params = make_params(5, 16, peephole=peephole, coupled=coupled, dtype=torch.float32,
                             generator=g)
        bf = [p.bfloat16() if p is not None else None for p in params]
        out = functional.lstm_cell(x.bfloat16(), h.bfloat16(), c.bfloat16(), *bf,
                                   peephole=peephole, coupled=coupled)
        ref = reference.lstm_cell(x, h, c, *params, peephole=peephole, coupled=coupled)
        for a, b in zip(out, ref):
            assert a.dtype == torch.bfloat16
            assert_close_scaled(a, b, torch.bfloat16, "bf16 cell")


@pytest.mark.parametrize("coupled", [False, True])
def test_full_peephole_with_diagonal_blocks_equals_diagonal(coupled):
    """Full peepholes whose [H, H] blocks are diagonal matrices are the diagonal variant,
    forward and backward (the gradient of the full blocks' diagonals is the diagonal gradient)."""
    g = torch.Generator().manual_seed(3)
    B, I, H = 4, 3, 6
    x, h, c = cell_inputs(B, I, H, torch.float64, g, requires_grad=True)
    w_ih, w_hh, b_ih, b_hh, w_diag, _ = make_params(I, H, peephole="diagonal", coupled=coupled,
                                                    generator=g, requires_grad=True)
    w_full = torch.cat([torch.diag(row) for row in w_diag.detach()]).requires_grad_()
    diag = functional.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_diag, peephole="diagonal",
                                coupled=coupled)
    full = functional.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_full, peephole="full",
                                coupled=coupled)
    for a, b in zip(full, diag):
        assert_close(a, b, torch.float64, "forward")
    loss = lambda out: (out[0] * torch.linspace(-1, 1, out[0].numel()).view_as(out[0])).sum() + out[1].sum()
    g_diag = torch.autograd.grad(loss(diag), [x, h, c, w_diag])
    g_full = torch.autograd.grad(loss(full), [x, h, c, w_full])
    for a, b in zip(g_full[:3], g_diag[:3]):
        assert_close(a, b, torch.float64, "backward")
    P = w_diag.shape[0]
    diagonals = torch.stack([blk.diagonal() for blk in g_full[3].view(P, H, H)])
    assert_close(diagonals, g_diag[3], torch.float64, "peephole weight gradient")


@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diagonal_peephole_gradient_is_exact_sum_independent_of_threads(coupled, dtype):
    """The CPU sum over rows of dz * c_prev (i, f) and dz_o * c: close to float64, accumulated in
    float for bfloat16, and the same bits for any thread count (threads split the columns)."""
    g = torch.Generator().manual_seed(5)
    B, H = 300, 100
    G = 3 if coupled else 4
    gates = torch.rand(B, G * H, generator=g).to(dtype)
    c_prev, c = torch.randn(B, H, generator=g).to(dtype), torch.randn(B, H, generator=g).to(dtype)
    grad_h, grad_c = torch.randn(B, H, generator=g).to(dtype), torch.randn(B, H, generator=g).to(dtype)
    w = torch.randn(2 if coupled else 3, H, generator=g).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.lstm_fused.cell_backward(grad_h, grad_c, gates, c_prev, c, w,
                                                              "diagonal", coupled))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[2], results[0][2])
    grad_z = results[0][0].double()
    o = (2 if coupled else 3) * H
    blocks = [grad_z[:, b * H:(b + 1) * H] * c_prev.double() for b in range(1 if coupled else 2)]
    expected = torch.stack([x.sum(0) for x in blocks] + [(grad_z[:, o:o + H] * c.double()).sum(0)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results[0][2].double(), expected, rtol=tol, atol=tol * B ** 0.5)
