"""Layer normalisation of the gates (layer_norm=True; issue 22, TFLite's per-gate form) for
every variant: the fused ops against the reference twin (float64 gradcheck of cell and layer,
float32 forward and backward), the CUDA kernels on the host shim, the saved statistics, double
backward, inference, half precision and autocast, the external TFLite/NNAPI vectors, the module
API and bad input."""

import math

import pytest
import torch
from conftest import (
    VARIANTS,
    assert_close,
    assert_close_scaled,
    grid,
    layer_op_args,
    leaf,
    make_params,
    module_input,
    variant_id,
    variant_params,
)

import lstm_fused
from lstm_fused import functional, reference
from lstm_fused.ops import ops

T, B, I, H, PROJ = 4, 3, 3, 5, 2
LENGTHS = [4, 3, 1]
CELL_CLIP, PROJ_CLIP = 0.4, 0.15


def make_weight_ln(coupled, hidden, generator, dtype=torch.float64, requires_grad=False):
    """γ [G, H] near 1 but not 1 (a planted dγ error must show), G = 3 coupled else 4."""
    G = 3 if coupled else 4
    w = 1 + 0.5 * (torch.rand(G, hidden, generator=generator, dtype=torch.float64) * 2 - 1)
    return w.to(dtype).requires_grad_(requires_grad)


def strip_none(params):
    return [p for p in params if p is not None]


def refill(params, present):
    """params with its non-None entries replaced, in order, by `present`."""
    it = iter(present)
    return [next(it) if p is not None else None for p in params]


# The combinations of Must show 1: peephole x coupled x cell_clip x projection (+ proj_clip).
COMBOS = [(v, clip, proj) for v in VARIANTS for clip in (False, True) for proj in (False, True)]
COMBO_IDS = [f"{variant_id(v)}-{'clip' if c else 'noclip'}-{'proj' if p else 'noproj'}"
             for v, c, p in COMBOS]
combo_params = pytest.mark.parametrize("variant, clipped, projected", COMBOS, ids=COMBO_IDS)


def clip_kwargs(clipped, projected):
    return {"cell_clip": CELL_CLIP if clipped else None,
            "proj_clip": PROJ_CLIP if clipped and projected else None}


# --- float64 gradcheck: cell and layer ---------------------------------------------------------


@combo_params
def test_gradcheck_layer_norm_cell(variant, clipped, projected):
    peephole, coupled = variant
    g = torch.Generator().manual_seed(3)
    R = PROJ if projected else H
    x, h, c = (torch.randn(B, n, generator=g, dtype=torch.float64).requires_grad_()
               for n in (I, R, H))
    params = make_params(I, H, peephole=peephole, coupled=coupled, proj=PROJ if projected else 0,
                         requires_grad=True, generator=g, scale=1.0)
    params = [*params, make_weight_ln(coupled, H, g, requires_grad=True)]
    kwargs = clip_kwargs(clipped, projected)

    def cell(x, h, c, *weights):
        *full, weight_ln = refill(params, weights)
        return functional.lstm_cell(x, h, c, *full, peephole=peephole, coupled=coupled,
                                    weight_ln=weight_ln, **kwargs)

    got = cell(x, h, c, *strip_none(params))
    expected = reference.lstm_cell(x, h, c, *params[:-1], peephole=peephole, coupled=coupled,
                                   weight_ln=params[-1], **kwargs)
    for a, b in zip(got, expected):
        assert_close(a, b, torch.float64, "cell vs reference")
    if clipped:
        at_bound = got[1].abs() >= CELL_CLIP
        assert at_bound.any() and not at_bound.all(), "both sides of the clip are exercised"
    assert torch.autograd.gradcheck(cell, (x, h, c, *strip_none(params)))


@combo_params
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_gradcheck_layer_norm_layer(variant, clipped, projected, mode):
    peephole, coupled = variant
    g = torch.Generator().manual_seed(4)
    R = PROJ if projected else H
    packed = mode == "packed"
    batch_sizes = [3, 2, 2, 1] if packed else None
    x = torch.randn(sum(batch_sizes) if packed else T, *(() if packed else (B,)), I,
                    generator=g, dtype=torch.float64).requires_grad_()
    h, c = (torch.randn(B, n, generator=g, dtype=torch.float64).requires_grad_() for n in (R, H))
    params = make_params(I, H, peephole=peephole, coupled=coupled, proj=PROJ if projected else 0,
                         requires_grad=True, generator=g, scale=1.0)
    params = [*params, make_weight_ln(coupled, H, g, requires_grad=True)]
    kwargs = clip_kwargs(clipped, projected)

    def layer(reverse):
        def run(x, h, c, *weights):
            *full, weight_ln = refill(params, weights)
            out, (h_n, c_n) = functional.lstm_layer(
                x, h, c, *full, peephole=peephole, coupled=coupled, reverse=reverse,
                batch_sizes=batch_sizes, weight_ln=weight_ln, **kwargs)
            return out, h_n, c_n
        return run

    for reverse in (False, True):
        got = layer(reverse)(x, h, c, *strip_none(params))
        out, (h_n, c_n) = reference.lstm_layer(
            x, h, c, *params[:-1], peephole=peephole, coupled=coupled, reverse=reverse,
            batch_sizes=batch_sizes, weight_ln=params[-1], **kwargs)
        for a, b in zip(got, (out, h_n, c_n)):
            assert_close(a, b, torch.float64, "layer vs reference")
    assert torch.autograd.gradcheck(layer(packed), (x, h, c, *strip_none(params)))


# --- float32: fused modules vs the reference, forward and backward ----------------------------


def make_input(mode, generator):
    """(module input, a function turning the module output into a padded tensor)."""
    return module_input(mode, generator, T, B, I, LENGTHS)


def randomize_weight_ln(module, seed):
    """γ away from its initial ones, so that the tests see dγ and γ's place in the equations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("weight_ln"):
                p.copy_(make_weight_ln(module.coupled, module.hidden_size, g, p.dtype))


@variant_params
@grid(layout=["one-layer", "two-layer-bidirectional"], proj=[0, PROJ],
      mode=["padded", "packed", "unbatched"])
def test_layer_norm_lstm_matches_reference_float32(variant, layout, proj, mode):
    peephole, coupled = variant
    kwargs = {"peephole": peephole, "coupled": coupled, "proj_size": proj, "layer_norm": True,
              "cell_clip": CELL_CLIP * 3}
    if layout == "two-layer-bidirectional":
        kwargs.update(num_layers=2, bidirectional=True)
    torch.manual_seed(1)
    ours = lstm_fused.LSTM(I, H, **kwargs)
    randomize_weight_ln(ours, 2)
    ref = lstm_fused.LSTM(I, H, **kwargs)
    ref._layer_fn = reference.lstm_layer
    ref.load_state_dict(ours.state_dict())
    x, to_padded = make_input(mode, torch.Generator().manual_seed(2))

    outputs = []
    for module in (ours, ref):
        out, (h_n, c_n) = module(x)
        outputs.append([to_padded(out), h_n, c_n])
    for a, b, name in zip(*outputs, ("output", "h_n", "c_n")):
        assert_close(a, b, torch.float32, name)

    seeds = torch.Generator().manual_seed(5)
    weights = [torch.randn(t.shape, generator=seeds) for t in outputs[0]]
    grads = []
    for module, outs in zip((ours, ref), outputs):
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        grads.append(torch.autograd.grad(loss, [leaf(x), *module.parameters()]))
    # The norm multiplies every gradient by rstd = 1/std over H = 5 units, which amplifies float32
    # rounding (two layers, both directions, back through T steps): 1e-4 here, still far below
    # what a wrong sign or a missing term gives (0.01 and more; the float64 gradchecks above
    # hold the exact math).
    names = ["input", *(n for n, _ in ours.named_parameters())]
    for a, b, name in zip(*grads, names):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@variant_params
@pytest.mark.parametrize("batched", [True, False])
def test_layer_norm_cell_module_matches_reference_float32(variant, batched):
    peephole, coupled = variant
    torch.manual_seed(4)
    cell = lstm_fused.LSTMCell(I, H, peephole=peephole, coupled=coupled, layer_norm=True,
                               cell_clip=CELL_CLIP * 3)
    randomize_weight_ln(cell, 3)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, I, generator=g, requires_grad=True)
    h0, c0 = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g) * 2
    if not batched:
        x, h0, c0 = x[0].detach().requires_grad_(), h0[0], c0[0]
    h1, c1 = cell(x, (h0, c0))
    params = [getattr(cell, n, None) for n in
              ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch")]
    lift = (lambda t: t) if batched else (lambda t: t.unsqueeze(0))
    h2, c2 = reference.lstm_cell(lift(x), lift(h0), lift(c0), *params, peephole=peephole,
                                 coupled=coupled, weight_ln=cell.weight_ln,
                                 cell_clip=CELL_CLIP * 3)
    if not batched:
        h2, c2 = h2[0], c2[0]
    assert h1.shape == h2.shape and c1.shape == c2.shape
    assert_close(h1, h2, torch.float32, "h")
    assert_close(c1, c2, torch.float32, "c")
    grads = [torch.autograd.grad((h * 1.5 + c).sum(), [x, *cell.parameters()])
             for h, c in ((h1, c1), (h2, c2))]
    for a, b in zip(*grads):
        assert_close(a, b, torch.float32, "gradient")
    with torch.no_grad():  # inference takes the same layer-norm kernels
        h3, c3 = cell(x, (h0, c0))
    assert_close(h3, h1, torch.float32, "inference h", kind="kernels")
    assert_close(c3, c1, torch.float32, "inference c", kind="kernels")


# --- the semantics, one at a time -------------------------------------------------------------


@pytest.mark.parametrize("peephole", ["diagonal", "full"])
def test_the_output_gate_norm_sees_the_new_clipped_cell_state(peephole):
    """One step by hand with the layer op: o = sigmoid(γ_o N(W_o x + W_o h + peep_o(c_t)) + b_o)
    with c_t the new, clipped state; the input and forget gates' norms see c_{t-1}; biases after
    the norm; the saved statistics are those of each gate's v."""
    g = torch.Generator().manual_seed(8)
    params = make_params(I, H, peephole=peephole, generator=g, scale=1.0)
    w_ih, w_hh, b_ih, b_hh, w_ch, _ = params
    w_ln = make_weight_ln(False, H, g)
    x = torch.randn(1, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64) * 2
    out, _, c_n, saved, _ = ops.layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_ch, None, None,
                                              False, peephole, False, True, CELL_CLIP, 0.0, None,
                                              None, w_ln, 1e-5)
    eps = 1e-5
    v = (x[0] @ w_ih.T + h0 @ w_hh.T).chunk(4, 1)
    b = (b_ih + b_hh).chunk(4)
    peep = ((lambda k, s: w_ch[k] * s) if peephole == "diagonal"
            else (lambda k, s: s @ w_ch[k * H:(k + 1) * H].T))

    def stats(u):
        mean = u.mean(1, keepdim=True)
        return mean, 1 / torch.sqrt(((u - mean) ** 2).mean(1, keepdim=True) + eps)

    def z_hat(k, u):
        mean, rstd = stats(u)
        return w_ln[k] * (u - mean) * rstd + b[k]

    pre = [v[0] + peep(0, c0), v[1] + peep(1, c0), v[2]]
    i, f = torch.sigmoid(z_hat(0, pre[0])), torch.sigmoid(z_hat(1, pre[1]))
    c = (f * c0 + i * torch.tanh(z_hat(2, pre[2]))).clamp(-CELL_CLIP, CELL_CLIP)
    at_bound = c.abs() >= CELL_CLIP
    assert at_bound.any() and not at_bound.all()
    pre.append(v[3] + peep(2, c))
    o = torch.sigmoid(z_hat(3, pre[3]))
    torch.testing.assert_close(c_n, c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0], o * torch.tanh(c), rtol=1e-12, atol=1e-12)
    # The saved row: activated gates, x̂ of every gate, (mean, rstd) of every gate.
    GH = 4 * H
    assert saved.shape == (1, B, 2 * GH + 8)
    for k, u in enumerate(pre):
        mean, rstd = stats(u)
        torch.testing.assert_close(saved[0, :, GH + k * H:GH + (k + 1) * H], (u - mean) * rstd)
        torch.testing.assert_close(saved[0, :, 2 * GH + 2 * k], mean[:, 0])
        torch.testing.assert_close(saved[0, :, 2 * GH + 2 * k + 1], rstd[:, 0])


@variant_params
def test_off_is_bit_for_bit_the_plain_module(variant):
    """layer_norm=False (and the eps, which then does nothing) gives exactly the results of a
    module built without the keywords: outputs and gradients."""
    peephole, coupled = variant
    results = []
    for kwargs in ({}, {"layer_norm": False}, {"layer_norm": False, "layer_norm_eps": 0.5}):
        torch.manual_seed(0)
        lstm = lstm_fused.LSTM(I, H, proj_size=PROJ, peephole=peephole, coupled=coupled, **kwargs)
        assert not any("weight_ln" in n for n, _ in lstm.named_parameters())
        x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out, (h_n, c_n) = lstm(x)
        grads = torch.autograd.grad(out.sum() + c_n.sum(), [x, *lstm.parameters()])
        results.append([out, h_n, c_n, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_eps_reaches_the_norm():
    """A large eps changes the result, as the reference says (the kernel does not drop it)."""
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    results = []
    for eps in (1e-5, 0.5):
        lstm = lstm_fused.LSTM(I, H, layer_norm=True, layer_norm_eps=eps)
        torch.manual_seed(0)
        lstm.reset_parameters()
        ref = lstm_fused.LSTM(I, H, layer_norm=True, layer_norm_eps=eps)
        ref._layer_fn = reference.lstm_layer
        ref.load_state_dict(lstm.state_dict())
        out = lstm(x)[0]
        assert_close(out, ref(x)[0], torch.float32, f"eps={eps}")
        results.append(out)
    assert (results[0] - results[1]).abs().max() > 1e-3


# --- the CUDA kernels (host shim), double backward, inference, half precision ----------------


def layer_norm_op_args(variant, dtype, packed, proj, generator):
    """layer_forward's arguments with a random γ: (leading args, weight_ln)."""
    args = layer_op_args(variant, dtype, packed, False, proj, generator)
    weight_ln = make_weight_ln(variant[1], 6, generator, dtype)  # layer_op_args' H = 6
    return (args[0] * 2, *args[1:]), weight_ln


def test_layer_norm_weight_grad_close_to_float64():
    """dγ, summed over rows step by step in the time loop (in the op-math type, by the column
    sums whose thread-count independence test_cell.py checks through the peephole gradient),
    against the float64 layer's. (Half precision: test_half_precision.py.)"""
    dtype = torch.float32
    g = torch.Generator().manual_seed(8)
    args64, weight_ln64 = layer_norm_op_args(("diagonal", False), torch.float64, True, 0, g)
    extra = (CELL_CLIP, 0.0, None, None)

    def weight_ln_grad(dtype):
        args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args64]
        weight_ln = weight_ln64.to(dtype)
        out, h_n, c_n, gates, cells = ops.layer_forward(*args, True, *extra, weight_ln, 1e-5)
        grads = [torch.ones_like(out), h_n.cos(), c_n.sin()]
        return ops.layer_backward(*grads, *args[:9], out, gates, cells, *args[9:], True,
                                  *extra, weight_ln)[-1]

    got, expected = weight_ln_grad(dtype), weight_ln_grad(torch.float64)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@variant_params
@grid(dtype=[torch.float32, torch.float64, torch.bfloat16], packed=[False, True], proj=[0, 2])
def test_layer_norm_with_cuda_kernels_matches_cpu(host_shim, variant, dtype, packed, proj):
    g = torch.Generator().manual_seed(1)
    args, weight_ln = layer_norm_op_args(variant, dtype, packed, proj, g)
    extra = (CELL_CLIP, PROJ_CLIP if proj else 0.0, None, None, weight_ln, 1e-5)  # no zoneout
    expected = ops.layer_forward(*args, True, *extra)
    got = host_shim.layer_forward(*args, 3, 7, *extra)
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="kernels")
    out, h_n, c_n, gates, cells = expected
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (out, h_n, c_n)]
    backward_args = (*grads, *args[:9], out, gates, cells, *args[9:], True)
    expected = ops.layer_backward(*backward_args, *extra[:5])
    got = host_shim.layer_backward(*backward_args, 3, 7, *extra[:5])
    assert expected[-1].shape == weight_ln.shape
    for a, b in zip(got, expected):
        assert_close(a, b, dtype, kind="kernels")


@pytest.mark.parametrize("variant", [("diagonal", False), ("full", True), (None, False)],
                         ids=["diagonal-standard", "full-coupled", "nopeep-standard"])
def test_double_backward_of_a_layer_norm_layer(variant):
    peephole, coupled = variant
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(2, 3, proj_size=2, peephole=peephole, coupled=coupled,
                           dtype=torch.float64, layer_norm=True, cell_clip=CELL_CLIP * 2)
    randomize_weight_ln(lstm, 1)
    names = [n for n, _ in lstm.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64) * 2

    def f(x, *ps):
        out, (_, c_n) = torch.func.functional_call(lstm, dict(zip(names, ps)), (x,))
        return out, c_n

    assert torch.autograd.gradgradcheck(f, (x.requires_grad_(), *params))


def test_inference_path_matches_training():
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, num_layers=2, proj_size=PROJ, peephole="diagonal",
                           layer_norm=True, bidirectional=True)
    randomize_weight_ln(lstm, 2)
    x = torch.randn(T, B, I) * 3
    out, (h_n, c_n) = lstm(x)
    with torch.inference_mode():
        out2, (h2, c2) = lstm(x)
    # The same kernels; the GEMMs may take other paths (the saved rows are wider in training).
    for a, b in ((out, out2), (h_n, h2), (c_n, c2)):
        assert_close(a, b, torch.float32, "inference vs training", kind="kernels")


def test_inference_op_saves_nothing():
    g = torch.Generator().manual_seed(2)
    args, weight_ln = layer_norm_op_args(("diagonal", False), torch.float32, False, 0, g)
    trained = ops.layer_forward(*args, True, 0.0, 0.0, None, None, weight_ln, 1e-5)
    inferred = ops.layer_forward(*args, False, 0.0, 0.0, None, None, weight_ln, 1e-5)
    assert inferred[3].numel() == 0 and inferred[4].numel() == 0
    for a, b in zip(inferred[:3], trained[:3]):
        assert_close(a, b, torch.float32, "inference vs training", kind="kernels")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_norm_close_to_float32(dtype):
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(8, 16, proj_size=4, peephole="diagonal", layer_norm=True)
    randomize_weight_ln(lstm, 3)
    x = torch.randn(6, 3, 8)
    out, (h_n, c_n) = lstm(x)
    half = lstm_fused.LSTM(8, 16, proj_size=4, peephole="diagonal", layer_norm=True, dtype=dtype)
    half.load_state_dict(lstm.state_dict())
    x_half = x.to(dtype).requires_grad_()
    out_h, (h_h, c_h) = half(x_half)
    for a, b, name in ((out_h, out, "output"), (h_h, h_n, "h_n"), (c_h, c_n, "c_n")):
        assert a.dtype == dtype
        assert_close_scaled(a, b, dtype, name)
    out_h.float().sum().backward()
    assert half.weight_ln_l0.grad.dtype == dtype and torch.isfinite(half.weight_ln_l0.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_layer_norm_close_to_float32(dtype):
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(8, 16, peephole="full", coupled=True, layer_norm=True)
    randomize_weight_ln(lstm, 4)
    x = torch.randn(6, 3, 8, requires_grad=True)
    out, _ = lstm(x)
    grads = torch.autograd.grad(out.sum(), [x, lstm.weight_ln_l0])
    with torch.autocast("cpu", dtype=dtype):
        out_a, _ = lstm(x)
    assert out_a.dtype == dtype
    assert_close_scaled(out_a, out, dtype, "output", kind="autocast")
    grads_a = torch.autograd.grad(out_a.float().sum(), [x, lstm.weight_ln_l0])
    for a, b, name in zip(grads_a, grads, ("input", "weight_ln")):
        assert a.dtype == torch.float32
        assert_close_scaled(a, b, dtype, f"gradient of {name}", kind="autocast_grad")


# --- the module API -----------------------------------------------------------------------------


@pytest.mark.parametrize("coupled", [False, True])
def test_weight_ln_parameters(coupled):
    lstm = lstm_fused.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=PROJ,
                           peephole="diagonal", coupled=coupled, layer_norm=True)
    G = 3 if coupled else 4
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        w = getattr(lstm, "weight_ln" + suffix)
        assert w.shape == (G, H) and torch.equal(w, torch.ones(G, H))
        names = [n for n in lstm.state_dict() if n.endswith(suffix)]
        assert names.index("weight_ln" + suffix) == names.index("weight_ch" + suffix) + 1
    for names in lstm._all_weights:
        assert names.index(next(n for n in names if n.startswith("weight_ln"))) == \
            names.index(next(n for n in names if n.startswith("weight_ch"))) + 1
    assert len(lstm._flat_weights) == len(lstm._flat_weights_names) == 4 * 7
    assert lstm.all_weights[1][5] is lstm.weight_ln_l0_reverse
    with torch.no_grad():
        lstm.weight_ln_l1.mul_(3)
    lstm.reset_parameters()
    assert torch.equal(lstm.weight_ln_l1, torch.ones(G, H))
    cell = lstm_fused.LSTMCell(I, H, coupled=coupled, layer_norm=True)
    assert torch.equal(cell.weight_ln, torch.ones(G, H))


def test_convenience_classes_repr_and_to_torch():
    lstm = lstm_fused.LayerNormLSTM(I, H, peephole="diagonal")
    cell = lstm_fused.LayerNormLSTMCell(I, H, layer_norm_eps=1e-8)
    assert lstm.layer_norm and cell.layer_norm and cell.layer_norm_eps == 1e-8
    assert "layer_norm=True" in repr(lstm) and "layer_norm_eps=1e-08" in repr(cell)
    for module in (lstm_fused.LayerNormLSTM(I, H), cell):
        with pytest.raises(ValueError, match="layer_norm=True"):
            module.to_torch()


@pytest.mark.parametrize("value, error", [(1, TypeError), ("yes", TypeError), (None, TypeError)])
def test_non_bool_layer_norm_is_a_type_error(value, error):
    for make in (lambda: lstm_fused.LSTM(I, H, layer_norm=value),
                 lambda: lstm_fused.LSTMCell(I, H, layer_norm=value)):
        with pytest.raises(error, match="layer_norm"):
            make()


@pytest.mark.parametrize("value, error", [(0.0, ValueError), (-1e-5, ValueError),
                                          (math.nan, ValueError), (math.inf, ValueError),
                                          ("1e-5", TypeError), (None, TypeError)])
def test_bad_layer_norm_eps_is_refused_by_name(value, error):
    for make in (lambda: lstm_fused.LSTM(I, H, layer_norm=True, layer_norm_eps=value),
                 lambda: lstm_fused.LSTMCell(I, H, layer_norm=True, layer_norm_eps=value)):
        with pytest.raises(error, match="layer_norm_eps"):
            make()
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh = torch.randn(4 * H, I), torch.randn(4 * H, H)
    with pytest.raises(error, match="layer_norm_eps"):
        functional.lstm_cell(x, h, c, w_ih, w_hh, weight_ln=torch.ones(4, H),
                             layer_norm_eps=value)


def test_ops_refuse_bad_weight_ln_and_eps_by_name():
    g = torch.Generator().manual_seed(2)
    args, weight_ln = layer_norm_op_args((None, False), torch.float32, False, 0, g)
    with pytest.raises(ValueError, match="weight_ln"):
        ops.layer_forward(*args, True, 0.0, 0.0, None, None, weight_ln[:3], 1e-5)
    for eps in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="layer_norm_eps"):
            ops.layer_forward(*args, True, 0.0, 0.0, None, None, weight_ln, eps)
    with pytest.raises(ValueError, match="weight_ln"):
        functional.lstm_layer(*args[:9], weight_ln=weight_ln.t())
    with pytest.raises(TypeError, match="weight_ln"):
        functional.lstm_layer(*args[:9], weight_ln=weight_ln.double())


def test_load_state_dict_names_the_wrong_weight_ln():
    lstm = lstm_fused.LSTM(I, H, num_layers=2, layer_norm=True)
    state = lstm.state_dict()
    state["weight_ln_l1"] = torch.ones(3, H)
    with pytest.raises(RuntimeError, match="weight_ln_l1"):
        lstm.load_state_dict(state)
    plain = lstm_fused.LSTM(I, H, num_layers=2)
    with pytest.raises(RuntimeError, match="no weight_ln_l0, as with layer_norm=False"):
        lstm.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="weight_ln_l0, as with layer_norm=True"):
        plain.load_state_dict(lstm.state_dict())


# --- external vectors: TFLite lstm_test.cc and the NNAPI layer_norm_lstm spec -----------------
# Source files and commits: tensorflow/tensorflow tensorflow/lite/kernels/lstm_test.cc at
# 0d7a1f8d037b13c6fd6271ee67f909d2d5042a19 (NoCifg... and CifgPeepholeProjectionNoClipping
# LayerNormLstmTest.LayerNormLstmBlackBoxTest), and AOSP platform/frameworks/ml
# nn/runtime/test/specs/V1_2/layer_norm_lstm.mod.py (read from sshyran/aosp at
# 72cfcf7f0c90ea46d25509f8cf315023633492e9), both Apache-2.0. Both use the same weights;
# n_batch = 2, n_input = 5, n_cell = 4, n_output = 3, zero initial states, 3 steps; TFLite's
# normalisation eps is 1e-8 (kLayerNormEpsilon), biased variance.

TFLITE = {
    "input_to_input": [0.5, 0.6, 0.7, -0.8, -0.9, 0.1, 0.2, 0.3, -0.4, 0.5, -0.8, 0.7, -0.6, 0.5,
                       -0.4, -0.5, -0.4, -0.3, -0.2, -0.1],
    "input_to_forget": [-0.6, -0.1, 0.3, 0.2, 0.9, -0.5, -0.2, -0.4, 0.3, -0.8, -0.4, 0.3, -0.5,
                        -0.4, -0.6, 0.3, -0.4, -0.6, -0.5, -0.5],
    "input_to_cell": [-0.4, -0.3, -0.2, -0.1, -0.5, 0.5, -0.2, -0.3, -0.2, -0.6, 0.6, -0.1, -0.4,
                      -0.3, -0.7, 0.7, -0.9, -0.5, 0.8, 0.6],
    "input_to_output": [-0.8, -0.4, -0.2, -0.9, -0.1, -0.7, 0.3, -0.3, -0.8, -0.2, 0.6, -0.2, 0.4,
                        -0.7, -0.3, -0.5, 0.1, 0.5, -0.6, -0.4],
    "input_bias": [0.03, 0.15, 0.22, 0.38],
    "forget_bias": [0.1, -0.3, -0.2, 0.1],
    "cell_bias": [-0.05, 0.72, 0.25, 0.08],
    "output_bias": [0.05, -0.01, 0.2, 0.1],
    "recurrent_to_input": [-0.2, -0.3, 0.4, 0.1, -0.5, 0.9, -0.2, -0.3, -0.7, 0.05, -0.2, -0.6],
    "recurrent_to_cell": [-0.3, 0.2, 0.1, -0.3, 0.8, -0.08, -0.2, 0.3, 0.8, -0.6, -0.1, 0.2],
    "recurrent_to_forget": [-0.5, -0.3, -0.5, -0.2, 0.6, 0.4, 0.9, 0.3, -0.1, 0.2, 0.5, 0.2],
    "recurrent_to_output": [0.3, -0.1, 0.1, -0.2, -0.5, -0.7, -0.2, -0.6, -0.1, -0.4, -0.7, -0.2],
    "cell_to_input": [0.05, 0.1, 0.25, 0.15],
    "cell_to_forget": [-0.02, -0.15, -0.25, -0.03],
    "cell_to_output": [0.1, -0.1, -0.5, 0.05],
    "projection": [-0.1, 0.2, 0.01, -0.2, 0.1, 0.5, 0.3, 0.08, 0.07, 0.2, -0.4, 0.2],
    "input_layer_norm": [0.1, 0.2, 0.3, 0.5],
    "forget_layer_norm": [0.2, 0.2, 0.4, 0.3],
    "cell_layer_norm": [0.7, 0.2, 0.3, 0.8],
    "output_layer_norm": [0.6, 0.2, 0.2, 0.5],
}
# [step][batch][input]
TFLITE_INPUT = [[[0.7, 0.8, 0.1, 0.2, 0.3], [0.3, 0.2, 0.9, 0.8, 0.1]],
                [[0.8, 0.1, 0.2, 0.4, 0.5], [0.1, 0.5, 0.2, 0.4, 0.2]],
                [[0.2, 0.7, 0.7, 0.1, 0.7], [0.6, 0.9, 0.2, 0.5, 0.7]]]
# NNAPI's golden outputs and cell states, [step][batch][unit] (TFLite's outputs agree to 1e-6).
NNAPI_OUTPUT = [
    [[0.024407668039203, 0.128027379512787, -0.001709178090096],
     [-0.006924282759428, 0.084874063730240, 0.063444979488850]],
    [[0.013764165341854, 0.140751048922539, 0.039583537727594],
     [-0.004039138555527, 0.139963015913963, 0.072681039571762]],
    [[-0.004592306911945, 0.155278354883194, 0.083737745881081],
     [0.007527053356171, 0.161902531981468, 0.056137066334486]]]
NNAPI_CELL = [
    [[-0.451771229505539, 0.376915663480759, 0.225425109267235, 0.232406347990036],
     [-0.252585828304291, 0.330421179533005, 0.017305245622993, 0.366601228713989]],
    [[-0.645632147789001, 0.518238246440887, 0.168679088354111, 0.555787742137909],
     [-0.493674814701080, 0.475847363471985, 0.106874041259289, 0.504309654235840]],
    [[-0.742560744285583, 0.579139292240143, 0.114988230168819, 0.649957716464996],
     [-0.686565399169922, 0.548869132995605, 0.173138767480850, 0.587379336357117]]]
# TFLite's CIFG test (the same weights without the input gate's), [step][batch][output].
TFLITE_CIFG_OUTPUT = [
    [[0.02129706, 0.140816242, 0.0112733059], [-0.0226350538, 0.0916948169, 0.0769175813]],
    [[0.0132302344, 0.152308047, 0.0346313119], [-0.0269966982, 0.149707705, 0.094149217]],
    [[-0.0123688057, 0.165790111, 0.0893077999], [-0.0103429332, 0.173016444, 0.0720508844]]]


def tflite_module(coupled):
    """Our LayerNormLSTM with TFLite's weights, mapped onto our layout: weight_ih = the gates'
    input weights stacked in our order (i, f, g, o) or, coupled (CIFG), (f, g, o); weight_hh the
    recurrent ones alike; bias_ih TFLite's gate biases (added after the norm, as TFLite does),
    bias_hh 0; weight_ch rows (i, f, o) / (f, o); weight_ln rows (i, f, g, o) / (f, g, o);
    weight_hr TFLite's projection_weights [n_output, n_cell]."""
    gates = ("forget", "cell", "output") if coupled else ("input", "forget", "cell", "output")
    peepholes = ("forget", "output") if coupled else ("input", "forget", "output")

    def t(*names, shape):
        return torch.tensor([TFLITE[n] for n in names], dtype=torch.float64).reshape(shape)

    G = len(gates)
    lstm = lstm_fused.LayerNormLSTM(5, 4, proj_size=3, peephole="diagonal", coupled=coupled,
                                    layer_norm_eps=1e-8, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(t(*(f"input_to_{g}" for g in gates), shape=(G * 4, 5)))
        lstm.weight_hh_l0.copy_(t(*(f"recurrent_to_{g}" for g in gates), shape=(G * 4, 3)))
        lstm.bias_ih_l0.copy_(t(*(f"{g}_bias" for g in gates), shape=(G * 4,)))
        lstm.bias_hh_l0.zero_()
        lstm.weight_ch_l0.copy_(t(*(f"cell_to_{g}" for g in peepholes), shape=(G - 1, 4)))
        lstm.weight_ln_l0.copy_(t(*(f"{g}_layer_norm" for g in gates), shape=(G, 4)))
        lstm.weight_hr_l0.copy_(t("projection", shape=(3, 4)))
    return lstm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_external_vectors_nnapi_layer_norm_lstm(dtype):
    """NNAPI layer_norm_lstm (= TFLite NoCifgPeepholeProjectionNoClippingLayerNormLstmTest):
    every step's output and cell state, to 1e-5."""
    lstm = tflite_module(coupled=False).to(dtype)
    x = torch.tensor(TFLITE_INPUT, dtype=dtype)
    out, _ = lstm(x)
    torch.testing.assert_close(out, torch.tensor(NNAPI_OUTPUT, dtype=dtype), rtol=0, atol=1e-5)
    # The cell states of every step: the same module one step at a time.
    state = None
    for t, expected in enumerate(NNAPI_CELL):
        _, state = lstm(x[t:t + 1], state)
        torch.testing.assert_close(state[1][0], torch.tensor(expected, dtype=dtype), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_external_vectors_tflite_cifg_layer_norm_lstm(dtype):
    """TFLite CifgPeepholeProjectionNoClippingLayerNormLstmTest (CIFG = our coupled=True)."""
    lstm = tflite_module(coupled=True).to(dtype)
    out, _ = lstm(torch.tensor(TFLITE_INPUT, dtype=dtype))
    torch.testing.assert_close(out, torch.tensor(TFLITE_CIFG_OUTPUT, dtype=dtype), rtol=0,
                               atol=1e-5)


# --- the benchmark (benchmarks/layer_norm.py) at toy size ---------------------------------------


def test_layer_norm_benchmark_runs_and_checks_the_loop_computes_the_same(tmp_path):
    import layer_norm as bench  # benchmarks/, on sys.path through conftest

    result = bench.main(["--size", "5,3,4,6", "--warmup", "1", "--repeats", "2", "--no-compile",
                         "--json", str(tmp_path / "r.json")])
    assert result["max_abs_diff_vs_loop"] < 1e-5
    for mode in ("forward", "fwd+bwd"):
        numbers = result["modes"][mode]
        assert set(numbers["median_ms"]) == {"fused LN-LSTM", "loop of nn.LayerNorm",
                                             "nn.LSTM (vanilla)"}
        assert numbers["ratio_vs_loop"] > 0 and numbers["ratio_vs_nn_lstm"] > 0
        assert 0 < result["gemm_floor"][mode] < numbers["median_ms"]["nn.LSTM (vanilla)"] * 10
    assert (tmp_path / "r.json").stat().st_size > 0


# --- zoneout with layer norm (issue 23: the regularizers compose with layer norm) --------------


def test_zoneout_with_layer_norm_runs_at_every_entry_point_and_zones():
    """Every entry point takes the pair (test_regularizers.py compares them with the twin):
    the modules in training keep units of the states at their previous values, and in eval
    they give the expectation, which differs from layer norm alone."""
    torch.manual_seed(0)
    for module in (lstm_fused.LSTM(4, 6, zoneout=0.5, layer_norm=True),
                   lstm_fused.LayerNormLSTM(4, 6, zoneout=(0.5, 0.5))):
        assert "zoneout=(0.5, 0.5)" in repr(module) and "layer_norm=True" in repr(module)
        x = torch.randn(5, 3, 4)
        out, _ = module(x)
        kept = (out[1:] == out[:-1]).float().mean().item()
        assert 0.3 < kept < 0.7  # half the units keep h_{t-1}, bit for bit
        module.eval()
        plain = lstm_fused.LSTM(4, 6, layer_norm=True).eval()
        plain.load_state_dict(module.state_dict())
        assert not torch.allclose(module(x)[0], plain(x)[0])
    cell = lstm_fused.LSTMCell(4, 6, zoneout=0.5, layer_norm=True)
    x, h0, c0 = torch.randn(64, 4), torch.randn(64, 6), torch.randn(64, 6)
    h1, c1 = cell(x, (h0, c0))
    for new, old in ((h1, h0), (c1, c0)):
        assert 0.4 < (new == old).float().mean().item() < 0.6
