"""State clipping (cell_clip, proj_clip; TensorFlow LSTMCell's semantics) for every variant: the
fused ops against the reference twin (float64 gradcheck, float32 forward and backward), the
clipped state being what everything sees, zero gradient where a clip is active, the CUDA
kernels on the host shim, double backward, inference, and bad values."""

import math

import pytest
import torch
from conftest import (
    VARIANTS,
    assert_close,
    grid,
    layer_op_args,
    leaf,
    make_params,
    module_input,
    variant_params,
)

import lstm_fused
from lstm_fused import functional, reference
from lstm_fused.ops import ops

T, B, I, H, PROJ = 5, 4, 3, 6, 2
LENGTHS = [5, 4, 4, 2]
# Small enough that many c_t (from states drawn from randn) and projected h_t are clipped, large
# enough that many are not: both branches of the clip are exercised (asserted below).
CELL_CLIP, PROJ_CLIP = 0.35, 0.2


def some_clipped(values, bound):
    """Some but not all |values| are at the bound (both branches of the clip taken)."""
    at_bound = values.abs() >= bound * (1 - 1e-6)
    return bool(at_bound.any()) and not bool(at_bound.all())


# --- float64 gradcheck: the cell here, the layers in test_layer.py's test_gradcheck_layers -----


@variant_params
@pytest.mark.parametrize("projected", [False, True])
def test_gradcheck_clipped_cell(variant, projected):
    peephole, coupled = variant
    g = torch.Generator().manual_seed(3)
    R = PROJ if projected else H
    x, h, c = (torch.randn(B, n, generator=g, dtype=torch.float64).requires_grad_()
               for n in (I, R, H))
    params = make_params(I, H, peephole=peephole, coupled=coupled, proj=PROJ if projected else 0,
                         requires_grad=True, generator=g, scale=1.0)
    present = [p for p in params if p is not None]
    clips = {"cell_clip": CELL_CLIP, "proj_clip": PROJ_CLIP if projected else None}

    def cell(x, h, c, *weights):
        it = iter(weights)
        full = [next(it) if p is not None else None for p in params]
        return functional.lstm_cell(x, h, c, *full, peephole=peephole, coupled=coupled, **clips)

    h1, c1 = cell(x, h, c, *present)
    assert some_clipped(c1, CELL_CLIP)
    if projected:
        assert some_clipped(h1, PROJ_CLIP)
    ref = reference.lstm_cell(x, h, c, *params, peephole=peephole, coupled=coupled, **clips)
    for a, b in zip((h1, c1), ref):
        assert_close(a, b, torch.float64, "cell vs reference")
    assert torch.autograd.gradcheck(cell, (x, h, c, *present))


# --- float32: fused vs reference, forward and backward ---------------------------------------


def make_input(mode, generator):
    """(module input, a function turning the module output into a padded tensor)."""
    return module_input(mode, generator, T, B, I, LENGTHS)


@variant_params
@grid(layout=["one-layer", "two-layer-bidirectional"], proj=[0, PROJ],
      mode=["padded", "packed", "unbatched"])
def test_clipped_lstm_matches_reference_float32(variant, layout, proj, mode):
    peephole, coupled = variant
    kwargs = {"peephole": peephole, "coupled": coupled, "proj_size": proj,
              "cell_clip": CELL_CLIP, "proj_clip": PROJ_CLIP if proj else None}
    if layout == "two-layer-bidirectional":
        kwargs.update(num_layers=2, bidirectional=True)
    torch.manual_seed(1)
    ours = lstm_fused.LSTM(I, H, **kwargs)
    with torch.no_grad():  # larger weights: states reach the clip
        for p in ours.parameters():
            p.mul_(4)
    ref = lstm_fused.LSTM(I, H, **kwargs)
    ref._layer_fn = reference.lstm_layer
    ref.load_state_dict(ours.state_dict())
    x, to_padded = make_input(mode, torch.Generator().manual_seed(2))

    outputs = []
    for module in (ours, ref):
        out, (h_n, c_n) = module(x)
        outputs.append([to_padded(out), h_n, c_n])
    (out, h_n, c_n), expected = outputs
    assert some_clipped(c_n, CELL_CLIP)
    if proj:
        assert some_clipped(out, PROJ_CLIP)
    for a, b, name in zip(outputs[0], expected, ("output", "h_n", "c_n")):
        assert_close(a, b, torch.float32, name)

    weights = torch.Generator().manual_seed(5)
    seeds = [torch.randn(t.shape, generator=weights) for t in outputs[0]]
    grads = []
    for module, outs in zip((ours, ref), outputs):
        loss = sum((o * s).sum() for o, s in zip(outs, seeds))
        grads.append(torch.autograd.grad(loss, [leaf(x), *module.parameters()]))
    for a, b in zip(*grads):
        assert_close(a, b, torch.float32, "gradient")


@variant_params
def test_clipped_cell_module_matches_reference_float32(variant):
    peephole, coupled = variant
    torch.manual_seed(4)
    cell = lstm_fused.LSTMCell(I, H, peephole=peephole, coupled=coupled, cell_clip=CELL_CLIP)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, I, generator=g, requires_grad=True)
    h0, c0 = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g) * 2
    h1, c1 = cell(x, (h0, c0))
    params = [getattr(cell, n, None) for n in
              ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch")]
    h2, c2 = reference.lstm_cell(x, h0, c0, *params, peephole=peephole, coupled=coupled,
                                 cell_clip=CELL_CLIP)
    assert some_clipped(c1, CELL_CLIP)
    assert_close(h1, h2, torch.float32, "h")
    assert_close(c1, c2, torch.float32, "c")
    grads = [torch.autograd.grad((h * 1.5 + c).sum(), [x, *cell.parameters()])
             for h, c in ((h1, c1), (h2, c2))]
    for a, b in zip(*grads):
        assert_close(a, b, torch.float32, "gradient")
    with torch.no_grad():  # the latency path (cell_step) clips too
        h3, c3 = cell(x, (h0, c0))
    assert_close(h3, h1, torch.float32, "inference h")
    assert_close(c3, c1, torch.float32, "inference c")


# --- the semantics, one at a time -------------------------------------------------------------


@variant_params
def test_off_is_bit_for_bit_the_unclipped_layer(variant):
    """None, 0 and a bound no state reaches give exactly the unclipped results (outputs and
    gradients): the clip adds nothing to the arithmetic."""
    peephole, coupled = variant
    results = []
    for clips in ({}, {"cell_clip": None, "proj_clip": None}, {"cell_clip": 0, "proj_clip": 0.0},
                  {"cell_clip": 1e30, "proj_clip": 1e30}):
        torch.manual_seed(0)
        lstm = lstm_fused.LSTM(I, H, proj_size=PROJ, peephole=peephole, coupled=coupled, **clips)
        x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out, (h_n, c_n) = lstm(x)
        grads = torch.autograd.grad(out.sum() + c_n.sum(), [x, *lstm.parameters()])
        results.append([out, h_n, c_n, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("peephole", [None, "diagonal", "full"])
def test_clipped_state_is_what_the_output_gate_and_next_step_see(peephole):
    """One cell step by hand: c is clamped after the update, the output gate's peephole and
    tanh see the clamped c, and the returned state is the clamped c."""
    g = torch.Generator().manual_seed(8)
    G = 4
    gates = torch.randn(B, G * H, generator=g, dtype=torch.float64) * 2
    c_prev = torch.randn(B, H, generator=g, dtype=torch.float64) * 2
    w = {"diagonal": torch.randn(3, H, generator=g, dtype=torch.float64),
         "full": torch.randn(3 * H, H, generator=g, dtype=torch.float64)}.get(peephole)
    h, c, _ = ops.cell_forward(gates, c_prev, w, peephole or "none", False, CELL_CLIP)
    z_i, z_f, z_g, z_o = gates.chunk(4, 1)
    peep = {None: lambda k, s: 0, "diagonal": lambda k, s: w[k] * s,
            "full": lambda k, s: s @ w[k * H:(k + 1) * H].T}[peephole]
    raw = (torch.sigmoid(z_f + peep(1, c_prev)) * c_prev
           + torch.sigmoid(z_i + peep(0, c_prev)) * torch.tanh(z_g))
    clipped = raw.clamp(-CELL_CLIP, CELL_CLIP)
    assert some_clipped(clipped, CELL_CLIP)
    torch.testing.assert_close(c, clipped, rtol=1e-12, atol=1e-12)
    o = torch.sigmoid(z_o + peep(2, clipped))
    torch.testing.assert_close(h, o * torch.tanh(clipped), rtol=1e-12, atol=1e-12)


@variant_params
def test_no_gradient_through_an_active_clip(variant):
    """Where |c| reached the bound, nothing flows back from c to the gate pre-activations or
    c_prev; where it did not, the gradient is the unclipped one."""
    peephole, coupled = variant
    kind = peephole or "none"
    g = torch.Generator().manual_seed(9)
    G = 3 if coupled else 4
    gates = torch.randn(B, G * H, generator=g, dtype=torch.float64) * 2
    c_prev = torch.randn(B, H, generator=g, dtype=torch.float64) * 2
    P = 2 if coupled else 3
    w = {"diagonal": torch.randn(P, H, generator=g, dtype=torch.float64),
         "full": torch.randn(P * H, H, generator=g, dtype=torch.float64)}.get(peephole)
    _, c, gates_out = ops.cell_forward(gates, c_prev, w, kind, coupled, CELL_CLIP)
    _, c_raw, gates_raw = ops.cell_forward(gates, c_prev, w, kind, coupled)
    active = c.abs() >= CELL_CLIP
    assert active.any() and not active.all()
    grad_c = torch.randn(B, H, generator=g, dtype=torch.float64)
    # Only a gradient on c (none on h): the update's gradients vanish where the clip is active.
    clipped = ops.cell_backward(None, grad_c, gates_out, c_prev, c, w, kind, coupled, CELL_CLIP)
    unclipped = ops.cell_backward(None, grad_c * ~active, gates_raw, c_prev, c_raw, w, kind,
                                  coupled)
    if peephole != "full":  # full: the output gate's W_co c path mixes units
        for a, b in zip(clipped, unclipped):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grad_c_prev = clipped[1]
    if peephole is None:
        assert (grad_c_prev[active] == 0).all() and (grad_c_prev[~active] != 0).all()


# --- CUDA kernels (host shim), double backward, inference, half precision ---------------------


@variant_params
@grid(dtype=[torch.float32, torch.float64, torch.bfloat16], packed=[False, True],
      proj=[0, 2])
def test_clipped_layer_with_cuda_kernels_matches_cpu(host_shim, variant, dtype, packed, proj):
    g = torch.Generator().manual_seed(1)
    args = layer_op_args(variant, dtype, packed, False, proj, g)
    args = (args[0] * 3, *args[1:])
    clips = (CELL_CLIP, PROJ_CLIP if proj else 0.0)
    expected = ops.layer_forward(*args, True, *clips)
    got = host_shim.layer_forward(*args, 3, 7, *clips)
    assert some_clipped(expected[4], CELL_CLIP)
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="kernels")
    out, h_n, c_n, gates, cells = expected
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (out, h_n, c_n)]
    backward_args = (*grads, *args[:9], out, gates, cells, *args[9:], True)
    expected = ops.layer_backward(*backward_args, *clips)
    got = host_shim.layer_backward(*backward_args, 3, 7, *clips)
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="kernels")


@variant_params
def test_clipped_cell_with_cuda_kernels_matches_cpu(host_shim, variant):
    peephole, coupled = variant
    kind = peephole or "none"
    g = torch.Generator().manual_seed(2)
    G, P = (3, 2) if coupled else (4, 3)
    gates = torch.randn(B, G * H, generator=g) * 2
    c_prev = torch.randn(B, H, generator=g) * 2
    w = {"diagonal": torch.randn(P, H, generator=g),
         "full": torch.randn(P * H, H, generator=g)}.get(peephole)
    expected = ops.cell_forward(gates, c_prev, w, kind, coupled, CELL_CLIP)
    got = host_shim.cell_forward(gates, c_prev, w, kind, coupled, 1, 32, CELL_CLIP)
    for a, b in zip(got, expected):
        assert_close(a, b, torch.float32, kind="kernels")
    _, c, gates_out = expected
    grad_h, grad_c = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    expected = ops.cell_backward(grad_h, grad_c, gates_out, c_prev, c, w, kind, coupled,
                                 CELL_CLIP)
    got = host_shim.cell_backward(grad_h, grad_c, gates_out, c_prev, c, w, kind, coupled, 1, 32,
                                  CELL_CLIP)
    for a, b in zip(got, expected):
        assert_close(a, b, torch.float32, kind="kernels")


@pytest.mark.parametrize("variant", [("diagonal", False), ("full", True)],
                         ids=["diagonal-standard", "full-coupled"])
def test_double_backward_of_a_clipped_layer(variant):
    peephole, coupled = variant
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(2, 3, proj_size=2, peephole=peephole, coupled=coupled,
                           dtype=torch.float64, cell_clip=CELL_CLIP, proj_clip=PROJ_CLIP)
    names = [n for n, _ in lstm.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True) * 2

    def f(x, *ps):
        out, (_, c_n) = torch.func.functional_call(lstm, dict(zip(names, ps)), (x,))
        return out, c_n

    assert torch.autograd.gradgradcheck(f, (x.detach().requires_grad_(), *params))


def test_inference_path_clips_like_training():
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, num_layers=2, proj_size=PROJ, peephole="diagonal",
                           cell_clip=CELL_CLIP, proj_clip=PROJ_CLIP)
    x = torch.randn(T, B, I) * 3
    out, (h_n, c_n) = lstm(x)
    with torch.inference_mode():
        out2, (h_n2, c_n2) = lstm(x)
    for a, b in ((out, out2), (h_n, h_n2), (c_n, c_n2)):
        assert torch.equal(a, b)
    assert some_clipped(c_n, CELL_CLIP) and out.abs().max() <= PROJ_CLIP


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_clipped_layer_close_to_float32(dtype):
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, peephole="diagonal", coupled=True, cell_clip=CELL_CLIP)
    x = torch.randn(T, B, I) * 3
    expected = lstm(x)[1][1]
    got = lstm.to(dtype)(x.to(dtype))[1][1]
    assert got.abs().max() <= CELL_CLIP
    torch.testing.assert_close(got.float(), expected, atol=4e-2 if dtype == torch.bfloat16
                               else 1e-2, rtol=0)


# --- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cell_clip", "proj_clip"])
@pytest.mark.parametrize("value, error", [(-0.5, ValueError), (math.nan, ValueError),
                                          (math.inf, ValueError), ("1", TypeError),
                                          (True, TypeError)])
def test_bad_clip_values_are_refused_by_name(name, value, error):
    with pytest.raises(error, match=name):
        lstm_fused.LSTM(I, H, proj_size=PROJ, **{name: value})
    x, h, c = torch.randn(B, I), torch.randn(B, PROJ), torch.randn(B, H)
    params = make_params(I, H, proj=PROJ, dtype=torch.float32)
    with pytest.raises(error, match=name):
        functional.lstm_cell(x, h, c, *params, **{name: value})
    with pytest.raises(error, match=name):
        reference.lstm_layer(x[None], h, c, *params, **{name: value})


def test_proj_clip_needs_a_projection():
    with pytest.raises(ValueError, match="proj_clip.*projection"):
        lstm_fused.LSTM(I, H, proj_clip=0.5)
    with pytest.raises(TypeError):
        lstm_fused.LSTMCell(I, H, proj_clip=0.5)
    args = layer_op_args(VARIANTS[0], torch.float32, False, False, 0, torch.Generator())
    with pytest.raises(ValueError, match="proj_clip"):
        ops.layer_forward(*args, True, 0.0, 0.5)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_ops_refuse_bad_clips_by_name(value):
    g = torch.Generator().manual_seed(0)
    args = layer_op_args(VARIANTS[0], torch.float32, False, False, 2, g)
    with pytest.raises(ValueError, match="cell_clip"):
        ops.layer_forward(*args, True, value, 0.0)
    with pytest.raises(ValueError, match="proj_clip"):
        ops.layer_forward(*args, True, 0.0, value)
    gates, c_prev = torch.randn(2, 4 * H), torch.randn(2, H)
    with pytest.raises(ValueError, match="cell_clip"):
        ops.cell_forward(gates, c_prev, None, "none", False, value)


def test_repr_and_to_torch_with_clips():
    lstm = lstm_fused.LSTM(I, H, proj_size=PROJ, cell_clip=3, proj_clip=0.5)
    assert "cell_clip=3.0" in repr(lstm) and "proj_clip=0.5" in repr(lstm)
    assert lstm.cell_clip == 3.0 and lstm_fused.LSTM(I, H, cell_clip=0).cell_clip is None
    with pytest.raises(ValueError, match="clipping"):
        lstm.to_torch()
    assert "cell_clip=0.25" in repr(lstm_fused.PeepholeLSTMCell(I, H, cell_clip=0.25))
