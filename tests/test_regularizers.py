"""The regularizer options of LSTM / LSTMCell (docs/regularizers.md): forget_bias (an
initialisation) and weight_dropout (DropConnect on weight_hh in training)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, grid, make_params, variant_id, variant_params
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from lstm_fused import reference

I, H = 3, 5


def forget_rows(coupled, hidden=H):
    """The forget block's rows of bias_ih: (i, f, g, o) -> block 1, coupled (f, g, o) -> block 0."""
    return slice(0, hidden) if coupled else slice(hidden, 2 * hidden)


# --- forget_bias ---------------------------------------------------------------------------


@variant_params
@pytest.mark.parametrize("module", ["LSTM", "LSTMCell"])
def test_forget_bias_shifts_only_the_forget_slice_of_bias_ih(variant, module):
    peephole, coupled = variant
    torch.manual_seed(0)
    hidden, shift = 400, 3.0  # many units: the shifted slice's range is unmistakable
    if module == "LSTM":
        m = lstm_fused.LSTM(I, hidden, num_layers=2, bidirectional=True, peephole=peephole,
                            coupled=coupled, forget_bias=shift)
    else:
        m = lstm_fused.LSTMCell(I, hidden, peephole=peephole, coupled=coupled, forget_bias=shift)
    bound = 1 / math.sqrt(hidden)
    rows = forget_rows(coupled, hidden)
    biases = dict(m.named_parameters())
    names = [n for n in biases if n.startswith("bias_ih")]
    assert len(names) == (4 if module == "LSTM" else 1)
    for name in names:
        bias = biases[name].detach()
        forget = bias[rows]
        assert (forget >= shift - bound).all() and (forget <= shift + bound).all(), name
        assert abs(forget.mean().item() - shift) < 4 * bound / math.sqrt(3 * hidden)
        rest = torch.cat([bias[:rows.start], bias[rows.stop:]])
        assert rest.abs().max() <= bound, name
        # bias_hh is not shifted: the sum of both biases sees the shift once
        other = biases[name.replace("bias_ih", "bias_hh")].detach()
        assert other.abs().max() <= bound


def test_reset_parameters_applies_forget_bias_again_without_accumulating():
    torch.manual_seed(0)
    m = lstm_fused.LSTM(I, 300, forget_bias=1.0)
    with torch.no_grad():
        m.bias_ih_l0.zero_()
    m.reset_parameters()
    mean = m.bias_ih_l0.detach()[forget_rows(False, 300)].mean().item()
    assert abs(mean - 1.0) < 0.05


def test_forget_bias_zero_is_nn_lstm_initialisation():
    torch.manual_seed(0)
    ours = lstm_fused.LSTM(I, H, forget_bias=0.0)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(I, H)
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0)


def test_forget_bias_in_bias_ih_equals_tensorflow_run_time_forget_bias():
    """TF's LSTMCell adds forget_bias to the forget pre-activation on every step; adding it to
    bias_ih's forget slice once (docs/regularizers.md) computes the same function."""
    torch.manual_seed(0)
    shift = 1.0
    m = lstm_fused.LSTM(I, H).double()
    x = torch.randn(4, 2, I, dtype=torch.float64)
    h0 = torch.zeros(2, H, dtype=torch.float64)
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in m.parameters())
    # TF's run time form, step by step: sigma(z_f + forget_bias)
    h, c, outputs = h0, h0, []
    for x_t in x:
        z = F.linear(x_t, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f + shift) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    with torch.no_grad():
        m.bias_ih_l0[forget_rows(False)] += shift
        out, _ = m(x)
    torch.testing.assert_close(out, torch.stack(outputs))


def test_forget_bias_errors():
    with pytest.raises(ValueError, match="forget_bias.*bias=True"):
        lstm_fused.LSTM(I, H, bias=False, forget_bias=1.0)
    with pytest.raises(ValueError, match="forget_bias.*bias=True"):
        lstm_fused.LSTMCell(I, H, bias=False, forget_bias=-1.0)
    lstm_fused.LSTM(I, H, bias=False, forget_bias=0.0)  # nothing to add: fine
    with pytest.raises(TypeError, match="forget_bias should be a real number"):
        lstm_fused.LSTM(I, H, forget_bias="1")
    with pytest.raises(TypeError, match="forget_bias should be a real number"):
        lstm_fused.LSTMCell(I, H, forget_bias=True)
    with pytest.raises(ValueError, match="forget_bias should be a finite number"):
        lstm_fused.LSTM(I, H, forget_bias=float("inf"))


# --- weight_dropout (DropConnect) ----------------------------------------------------------


class Recorder:
    """A LSTM._layer_fn that records the weight_hh each call receives and runs `layer_fn`."""

    def __init__(self, layer_fn):
        self.layer_fn, self.weights = layer_fn, []

    def __call__(self, input, hx, cx, weight_ih, weight_hh, *rest, **options):
        if weight_hh.requires_grad:
            weight_hh.retain_grad()
        self.weights.append(weight_hh)
        return self.layer_fn(input, hx, cx, weight_ih, weight_hh, *rest, **options)


def make_lstm(variant, p=0.3, dtype=torch.float64, **options):
    peephole, coupled = variant
    torch.manual_seed(0)
    return lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, weight_dropout=p,
                           dtype=dtype, **options)


def sequences(dtype=torch.float64, T=4, B=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(T, B, I, generator=generator, dtype=dtype)


def test_weight_dropout_mask_statistics_scale_and_parameter_untouched():
    p = 0.3
    lstm = lstm_fused.LSTM(I, 64, num_layers=2, bidirectional=True, proj_size=8,
                           weight_dropout=p, dtype=torch.float64)
    recorder = Recorder(lstm_fused.functional.fused_layer)
    lstm._layer_fn = recorder
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    names = list(lstm.state_dict())
    lstm(sequences())
    masks = []
    for k, (name, weight) in enumerate(zip(
            ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"],
            recorder.weights, strict=True)):
        param = getattr(lstm, name)
        assert weight.shape == param.shape == (4 * 64, 8)  # projection: [G*H, R]
        kept = weight != 0
        # kept entries are the parameter scaled by 1/(1-p), the others exactly zero
        torch.testing.assert_close(weight[kept], param[kept] / (1 - p), rtol=1e-12, atol=0)
        n = kept.numel()
        fraction = kept.double().mean().item()
        assert abs(fraction - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), (name, fraction)
        masks.append(kept)
    # each layer and direction draws its own mask
    for a in range(len(masks)):
        for b in range(a):
            assert not torch.equal(masks[a], masks[b])
    # the parameters are never replaced nor changed
    assert list(lstm.state_dict()) == names
    assert all(isinstance(getattr(lstm, n), torch.nn.Parameter) for n in names)
    for k, v in lstm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert lstm._flat_weights_names == names


def test_weight_dropout_is_the_identity_in_eval():
    lstm = make_lstm(VARIANTS[0], p=0.5).eval()
    recorder = Recorder(lstm_fused.functional.fused_layer)
    lstm._layer_fn = recorder
    x = sequences()
    out = lstm(x)[0]
    assert recorder.weights[0] is lstm.weight_hh_l0
    plain = make_lstm(VARIANTS[0], p=0.0).eval()
    torch.testing.assert_close(out, plain(x)[0], rtol=0, atol=0)


def test_weight_dropout_gradient_carries_the_mask():
    p = 0.4
    lstm = make_lstm(("diagonal", False), p=p, num_layers=2)
    recorder = Recorder(lstm_fused.functional.fused_layer)
    lstm._layer_fn = recorder
    out, (_, c) = lstm(sequences())
    (out.square().sum() + c.sum()).backward()
    for name, dropped in zip(["weight_hh_l0", "weight_hh_l1"], recorder.weights, strict=True):
        mask = (dropped != 0).double()
        expected = dropped.grad * mask / (1 - p)
        torch.testing.assert_close(getattr(lstm, name).grad, expected, rtol=1e-12, atol=0)
        assert (getattr(lstm, name).grad[mask == 0] == 0).all()


LAYER_CASES = {
    "plain": {},
    "stacked-bidirectional": {"num_layers": 2, "bidirectional": True},
    "projection": {"proj_size": 2},
    "interlayer-dropout": {"num_layers": 2, "dropout": 0.5},
    "layer-norm": {"layer_norm": True, "cell_clip": 0.5, "proj_size": 2},
}


@variant_params
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_weight_dropout_fused_matches_reference_forward_and_backward(variant, case, packed):
    """Same seed, same masks: the fused layer and the reference twin agree under DropConnect."""
    assert_fused_equals_reference_with_the_same_seed(
        lambda: make_lstm(variant, p=0.3, **LAYER_CASES[case]), packed)


def assert_fused_equals_reference_with_the_same_seed(make_module, packed):
    """The module (a fresh one from make_module per run) with the fused layer and with the
    twin, each called after torch.manual_seed(7) (the same random masks): the same output,
    states and parameter gradients."""
    results = []
    for layer_fn in (lstm_fused.functional.fused_layer, reference.lstm_layer):
        lstm = make_module()
        lstm._layer_fn = layer_fn
        x = sequences()
        if packed:
            x = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
        torch.manual_seed(7)
        out, (h, c) = lstm(x)
        data = out.data if packed else out
        (data.sin().sum() + h.square().sum() + c.sum()).backward()
        results.append([data, h, c] + [p.grad for p in lstm.parameters()])
    for fused, ref in zip(*results, strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4]],
                         ids=[variant_id(v) for v in (VARIANTS[0], VARIANTS[2], VARIANTS[4])])
def test_weight_dropout_gradcheck(variant):
    lstm = make_lstm(variant, p=0.3, proj_size=2)
    x = sequences(T=3, B=2).requires_grad_()
    names = [n for n, _ in lstm.named_parameters()]

    def run(x, *params):
        torch.manual_seed(3)  # the same mask on every gradcheck evaluation
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, params)), (x,))
        return out, h, c

    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    assert torch.autograd.gradcheck(run, (x, *params))


def test_weight_dropout_compiles_without_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    lstm = make_lstm(("diagonal", True), p=0.3, dtype=torch.float32, num_layers=2)
    x = sequences(dtype=torch.float32)
    explanation = torch._dynamo.explain(lstm)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    results = []
    for model in (compiled, lstm):
        lstm.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        out, _ = model(x)
        out.sum().backward()
        results.append([out] + [p.grad for p in lstm.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_weight_dropout_double_backward_matches_reference():
    """Gradient of a gradient (e.g. a gradient penalty) through the dropped weight."""
    grads = []
    for layer_fn in (lstm_fused.functional.fused_layer, reference.lstm_layer):
        lstm = make_lstm(("full", False), p=0.3)
        lstm._layer_fn = layer_fn
        x = sequences().requires_grad_()
        torch.manual_seed(6)
        out, _ = lstm(x)
        (grad_x,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        grads.append([p.grad for p in lstm.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_weight_dropout_same_seed_same_result_different_seed_different():
    lstm = make_lstm(VARIANTS[3], p=0.5, num_layers=2)
    x = sequences()

    def run(seed):
        torch.manual_seed(seed)
        return lstm(x)[0]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@variant_params
def test_cell_weight_dropout_matches_reference_with_the_same_mask(variant):
    peephole, coupled = variant
    p = 0.3
    torch.manual_seed(0)
    cell = lstm_fused.LSTMCell(I, H, peephole=peephole, coupled=coupled, weight_dropout=p,
                               dtype=torch.float64)
    x = torch.randn(2, I, dtype=torch.float64)
    hx = (torch.randn(2, H, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64))
    torch.manual_seed(5)
    h, c = cell(x, hx)
    (h.sum() + c.square().sum()).backward()
    torch.manual_seed(5)
    weights = list(cell._parameters_for(""))
    dropped = F.dropout(weights[1], p=p, training=True).detach().requires_grad_()
    ref_h, ref_c = reference.lstm_cell(x, *hx, weights[0], dropped, *weights[2:],
                                       peephole=peephole, coupled=coupled)
    (ref_h.sum() + ref_c.square().sum()).backward()
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)
    torch.testing.assert_close(cell.weight_hh.grad, dropped.grad * (dropped != 0) / (1 - p))
    # under no_grad in training mode the cell still drops (not the inference shortcut)
    with torch.no_grad():
        torch.manual_seed(5)
        h2, c2 = cell(x, hx)
    assert torch.equal(h2, h.detach()) and torch.equal(c2, c.detach())
    # eval: identity, the inference shortcut included
    cell.eval()
    with torch.no_grad():
        h3, _ = cell(x, hx)
    plain_h, _ = reference.lstm_cell(x, *hx, *weights, peephole=peephole, coupled=coupled)
    torch.testing.assert_close(h3, plain_h)


def test_weight_dropout_errors():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"weight_dropout should be a number in range \[0, 1\)"):
            lstm_fused.LSTM(I, H, weight_dropout=bad)
        with pytest.raises(ValueError, match=r"weight_dropout should be a number in range \[0, 1\)"):
            lstm_fused.LSTMCell(I, H, weight_dropout=bad)
    for bad in ("0.1", None, False, (0.1,)):
        with pytest.raises(TypeError, match="weight_dropout should be a real number"):
            lstm_fused.LSTM(I, H, weight_dropout=bad)
    with pytest.raises(ValueError, match="no DropConnect"):
        lstm_fused.LSTM(I, H, weight_dropout=0.2).to_torch()


def test_repr_names_the_regularizers():
    text = repr(lstm_fused.LSTM(I, H, forget_bias=1.0, weight_dropout=0.25))
    assert "forget_bias=1.0" in text and "weight_dropout=0.25" in text
    assert "forget_bias" not in repr(lstm_fused.LSTMCell(I, H))


def test_onnx_export_with_weight_dropout_eval_matches_eager_and_training_is_refused():
    onnxruntime = pytest.importorskip("onnxruntime")
    import lstm_fused.onnx

    lstm = make_lstm(("diagonal", False), p=0.5, dtype=torch.float32, num_layers=2)
    x = sequences(dtype=torch.float32)
    with pytest.raises(ValueError, match="training mode with weight_dropout=0.5.*eval"):
        lstm_fused.onnx.export(lstm, (x,), verbose=False)
    assert_eval_onnx_matches_eager(onnxruntime, lstm, x)


def assert_eval_onnx_matches_eager(onnxruntime, lstm, x):
    """The module in eval mode, exported to ONNX and run in onnxruntime, gives eager's output
    and final states."""
    import lstm_fused.onnx

    lstm.eval()
    program = lstm_fused.onnx.export(lstm, (x,), verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out, (h, c) = lstm(x)
    for g, e in zip(got, (out, h, c), strict=True):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-5, rtol=0)


# --- the example and the benchmark, at toy size ---------------------------------------------


def test_regularizers_example_runs_every_setting_and_reports_held_out_loss(capsys):
    import regularizers  # examples/, on sys.path (conftest.py)

    results = regularizers.main(["--steps", "3", "--seeds", "1", "--train", "4", "--test", "8",
                                 "--length", "6", "--hidden", "8"])
    assert list(results) == list(regularizers.SETTINGS)
    for losses in results.values():
        assert all(math.isfinite(v) and v > 0 for v in losses["train"] + losses["test"])
    printed = capsys.readouterr().out
    assert "held-out MSE" in printed and "weight_dropout=0.5" in printed
    assert "zoneout=0.1" in printed


def test_regularizers_benchmark_runs_and_checks_the_wrapper_computes_the_same(tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_regularizers",
                                                  ROOT / "benchmarks" / "regularizer_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--size", "5,3,4,6", "--warmup", "1", "--repeats", "2",
                         "--json", str(tmp_path / "r.json")])
    assert result["max_abs_diff_vs_wrapper"] < 1e-5
    assert set(result["median_ms"]) == {"fused", "fused + DropConnect", "nn.LSTM + WeightDrop",
                                        "fused + zoneout", "nn.LSTMCell loop + zoneout"}
    assert result["ratio_vs_plain"] > 0 and result["ratio_vs_wrapper"] > 0
    assert result["zoneout_ratio_vs_plain"] > 0 and result["zoneout_ratio_vs_cell_loop"] > 0
    assert 0 < result["floor_ratio_vs_wrapper"] and 0 < result["floor_ratio_vs_cell_loop"]
    assert (tmp_path / "r.json").stat().st_size > 0


# --- zoneout: the fused time loop against the reference twin, with injected masks ------------

T_Z, B_Z, BATCH_SIZES_Z = 4, 3, [3, 3, 2, 1]


def zoneout_masks(R, HID, p=(0.4, 0.5), dtype=torch.float64, seed=5):
    """0/1 keep masks [T, B, R] (h) and [T, B, H] (c), drawn with Bernoulli(p_h), (p_c)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple((torch.rand(T_Z, B_Z, width, generator=generator) < rate).to(dtype)
                 for width, rate in ((R, p[0]), (HID, p[1])))


def zoneout_layer_inputs(variant, proj, packed, dtype=torch.float64, seed=2):
    """(input, h0, c0, params) for the functional layer: T=4, B=3, I=3, H=5, packed with batch
    sizes 3, 3, 2, 1; everything requires grad."""
    peephole, coupled = variant
    generator = torch.Generator().manual_seed(seed)
    params = make_params_z(peephole, coupled, proj, dtype, generator)
    R = proj or H
    N = sum(BATCH_SIZES_Z)
    x = torch.randn(N if packed else T_Z, *(() if packed else (B_Z,)), I, generator=generator)
    h0, c0 = torch.randn(B_Z, R, generator=generator), torch.randn(B_Z, H, generator=generator)
    return [t.to(dtype).requires_grad_() for t in (x, h0, c0)], params


def make_params_z(peephole, coupled, proj, dtype, generator):
    return [None if t is None else t.requires_grad_() for t in make_params(
        I, H, peephole=peephole, coupled=coupled, proj=proj, dtype=dtype, generator=generator)]


def run_zoneout_layer(layer_fn, variant, proj, packed, tensors, params, zoneout, reverse=False,
                      **clips):
    peephole, coupled = variant
    x, h0, c0 = tensors
    out, (h, c) = layer_fn(x, h0, c0, *params, peephole=peephole, coupled=coupled,
                           reverse=reverse, batch_sizes=BATCH_SIZES_Z if packed else None,
                           zoneout=zoneout, **clips)
    return out, h, c


def zoneout_grads(outputs, inputs):
    out, h, c = outputs
    loss = out.sin().sum() + (h * h).sum() + (c * c.cos()).sum()
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, wanted)


ZONEOUT_LAYER_CASES = grid(proj=[0, 2], packed=[False, True], reverse=[False, True],
                           where=lambda proj, packed, reverse: not (reverse and proj))


@variant_params
@ZONEOUT_LAYER_CASES
def test_zoneout_layer_fused_equals_reference_and_gradcheck(variant, proj, packed, reverse):
    """Injected 0/1 masks: the fused time loop equals the twin, forward and every gradient, and
    its own gradients pass gradcheck (float64)."""
    tensors, params = zoneout_layer_inputs(variant, proj, packed)
    masks = zoneout_masks(proj or H, H)
    inputs = [*tensors, *params]
    results = []
    for layer_fn in (lstm_fused.functional.lstm_layer, reference.lstm_layer):
        outputs = run_zoneout_layer(layer_fn, variant, proj, packed, tensors, params, masks,
                                    reverse)
        results.append([*outputs, *zoneout_grads(outputs, inputs)])
    for fused, ref in zip(*results, strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)

    def fused(*inputs):
        return run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, proj, packed,
                                 inputs[:3], inputs[3:], masks, reverse)

    differentiable = [t for t in inputs if t is not None]
    positions = [k for k, t in enumerate(inputs) if t is not None]

    def by_position(*values):
        full = list(inputs)
        for k, v in zip(positions, values):
            full[k] = v
        return fused(*full)

    assert torch.autograd.gradcheck(by_position, differentiable)


@pytest.mark.parametrize("variant", [VARIANTS[1], VARIANTS[2], VARIANTS[5]],
                         ids=[variant_id(v) for v in (VARIANTS[1], VARIANTS[2], VARIANTS[5])])
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_zoneout_layer_with_clips_and_eval_rates_equals_reference(variant, proj, packed):
    """Clips then zoneout (c clipped, then zoned; the projection clipped, then zoned), with masks
    and with eval's rates (the expectation): fused equals the twin, forward and backward."""
    clips = {"cell_clip": 0.3, **({"proj_clip": 0.05} if proj else {})}
    for zoneout in (zoneout_masks(proj or H, H), (0.3, 0.6), (0.0, 0.5), (0.5, 0.0)):
        tensors, params = zoneout_layer_inputs(variant, proj, packed)
        inputs = [*tensors, *params]
        results = []
        for layer_fn in (lstm_fused.functional.lstm_layer, reference.lstm_layer):
            outputs = run_zoneout_layer(layer_fn, variant, proj, packed, tensors, params,
                                        zoneout, **clips)
            results.append([*outputs, *zoneout_grads(outputs, inputs)])
        for fused, ref in zip(*results, strict=True):
            torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)


@variant_params
@pytest.mark.parametrize("proj", [0, 2])
def test_zoneout_layer_float32_matches_reference(variant, proj):
    tensors, params = zoneout_layer_inputs(variant, proj, False, dtype=torch.float32)
    masks = zoneout_masks(proj or H, H, dtype=torch.float32)
    inputs = [*tensors, *params]
    results = []
    for layer_fn in (lstm_fused.functional.lstm_layer, reference.lstm_layer):
        outputs = run_zoneout_layer(layer_fn, variant, proj, False, tensors, params, masks)
        results.append([*outputs, *zoneout_grads(outputs, inputs)])
    for fused, ref in zip(*results, strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4]],
                         ids=[variant_id(v) for v in (VARIANTS[0], VARIANTS[2], VARIANTS[4])])
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_zoneout_layer_inference_path_equals_training_path(variant, proj, packed):
    """need_backward=False (no_grad) computes the same zoned output and final states."""
    tensors, params = zoneout_layer_inputs(variant, proj, packed)
    masks = zoneout_masks(proj or H, H)
    trained = run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, proj, packed,
                                tensors, params, masks, cell_clip=0.3)
    with torch.no_grad():
        inferred = run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, proj, packed,
                                     tensors, params, masks, cell_clip=0.3)
    # (not bit for bit: the two paths may take other GEMM kernels for the W_co c~ GEMM)
    for a, b in zip(trained, inferred, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer-norm"])
def test_zoneout_layer_double_backward_matches_reference(layer_norm):
    variant = ("diagonal", False)
    tensors, params = zoneout_layer_inputs(variant, 2, True)
    masks = zoneout_masks(2, H)
    norm = {"weight_ln": layer_norm_weight(variant)} if layer_norm else {}
    results = []
    for layer_fn in (lstm_fused.functional.lstm_layer, reference.lstm_layer):
        out, _, c = run_zoneout_layer(layer_fn, variant, 2, True, tensors, params, masks, **norm)
        (grad_x,) = torch.autograd.grad(out.sin().sum() + c.sum(), tensors[0], create_graph=True)
        results.append(torch.autograd.grad(grad_x.square().sum(), [tensors[1], params[1]]))
    for fused, ref in zip(*results, strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-10)


def layer_norm_weight(variant, dtype=torch.float64, seed=8):
    """γ [G, H] around 1 (G = 3 coupled, else 4), requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    gates = 3 if variant[1] else 4
    return (1 + 0.3 * torch.randn(gates, H, generator=generator, dtype=torch.float64)).to(
        dtype).requires_grad_()


@variant_params
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_zoneout_with_layer_norm_layer_fused_equals_reference_and_gradcheck(variant, proj,
                                                                            packed):
    """Zoneout inside layer norm's whole-row kernels: with injected masks, and with eval's
    rates and the clips, the fused layer equals the twin (whose norm sees the step's computed
    c, and whose zoneout comes after), forward and every gradient (γ's too); gradcheck of the
    masked layer (float64)."""
    clips = {"cell_clip": 0.3, **({"proj_clip": 0.05} if proj else {})}
    for zoneout, options in ((zoneout_masks(proj or H, H), {}), ((0.3, 0.6), clips),
                             ((0.0, 0.5), clips), (zoneout_masks(proj or H, H), clips)):
        tensors, params = zoneout_layer_inputs(variant, proj, packed)
        weight_ln = layer_norm_weight(variant)
        inputs = [*tensors, *params, weight_ln]
        results = []
        for layer_fn in (lstm_fused.functional.lstm_layer, reference.lstm_layer):
            outputs = run_zoneout_layer(layer_fn, variant, proj, packed, tensors, params,
                                        zoneout, weight_ln=weight_ln, **options)
            results.append([*outputs, *zoneout_grads(outputs, inputs)])
        for fused, ref in zip(*results, strict=True):
            torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)

    masks = zoneout_masks(proj or H, H)
    positions = [k for k, t in enumerate(inputs) if t is not None]

    def by_position(*values):
        full = list(inputs)
        for k, v in zip(positions, values):
            full[k] = v
        return run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, proj, packed,
                                 full[:3], full[3:-1], masks, weight_ln=full[-1])

    assert torch.autograd.gradcheck(by_position, [inputs[k] for k in positions])


@variant_params
def test_zoneout_with_layer_norm_float32_and_inference_path(variant):
    """float32 against the twin at tolerances that catch a missing term, and the no_grad path
    (the computed c~ in a step buffer of its own) equal to the training path."""
    tensors, params = zoneout_layer_inputs(variant, 2, False, dtype=torch.float32)
    weight_ln = layer_norm_weight(variant, torch.float32)
    masks = zoneout_masks(2, H, dtype=torch.float32)
    inputs = [*tensors, *params, weight_ln]
    results = []
    for layer_fn in (lstm_fused.functional.lstm_layer, reference.lstm_layer):
        outputs = run_zoneout_layer(layer_fn, variant, 2, False, tensors, params, masks,
                                    weight_ln=weight_ln, cell_clip=0.4)
        results.append([*outputs, *zoneout_grads(outputs, inputs)])
    for fused, ref in zip(*results, strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        inferred = run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, 2, False,
                                     tensors, params, masks, weight_ln=weight_ln, cell_clip=0.4)
    for a, b in zip(results[0][:3], inferred, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)


@variant_params
def test_zoneout_with_layer_norm_cell_equals_reference_and_gradcheck(variant):
    peephole, coupled = variant
    generator = torch.Generator().manual_seed(4)
    params = make_params_z(peephole, coupled, 0, torch.float64, generator)
    x, hx, cx = (torch.randn(B_Z, width, generator=generator, dtype=torch.float64)
                 .requires_grad_() for width in (I, H, H))
    weight_ln = layer_norm_weight(variant)
    mask_h, mask_c = (m[0] for m in zoneout_masks(H, H))
    inputs = [x, hx, cx, *params, weight_ln]
    positions = [k for k, t in enumerate(inputs) if t is not None]

    def cell(fn, *values, zoneout=(mask_h, mask_c)):
        return fn(*values[:-1], peephole=peephole, coupled=coupled, zoneout=zoneout,
                  weight_ln=values[-1], cell_clip=0.5)

    for zoneout in ((mask_h, mask_c), (0.3, 0.6)):
        results = []
        for fn in (lstm_fused.functional.lstm_cell, reference.lstm_cell):
            h, c = cell(fn, *inputs, zoneout=zoneout)
            results.append([h, c, *torch.autograd.grad(
                h.sin().sum() + (c * c).sum(), [inputs[k] for k in positions])])
        for fused, ref in zip(*results, strict=True):
            torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)

    def by_position(*values):
        full = list(inputs)
        for k, v in zip(positions, values):
            full[k] = v
        return cell(lstm_fused.functional.lstm_cell, *full)

    assert torch.autograd.gradcheck(by_position, [inputs[k] for k in positions])


@variant_params
@pytest.mark.parametrize("proj", [0, 2])
def test_zoneout_cell_fused_equals_reference_and_gradcheck(variant, proj):
    peephole, coupled = variant
    generator = torch.Generator().manual_seed(4)
    params = make_params_z(peephole, coupled, proj, torch.float64, generator)
    R = proj or H
    x, hx, cx = (torch.randn(B_Z, width, generator=generator, dtype=torch.float64)
                 .requires_grad_() for width in (I, R, H))
    mask_h, mask_c = (m[0] for m in zoneout_masks(R, H))
    inputs = [x, hx, cx, *params]
    for zoneout in ((mask_h, mask_c), (0.3, 0.6)):
        def cell(layer_fn, *values, zoneout=zoneout):
            return layer_fn(*values[:3], *values[3:], peephole=peephole, coupled=coupled,
                            zoneout=zoneout)
        results = []
        for fn in (lstm_fused.functional.lstm_cell, reference.lstm_cell):
            h, c = cell(fn, *inputs)
            results.append([h, c, *torch.autograd.grad(
                h.sin().sum() + (c * c).sum(), [t for t in inputs if t is not None])])
        for fused, ref in zip(*results, strict=True):
            torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    positions = [k for k, t in enumerate(inputs) if t is not None]

    def by_position(*values):
        full = list(inputs)
        for k, v in zip(positions, values):
            full[k] = v
        return cell(lstm_fused.functional.lstm_cell, *full, zoneout=(mask_h, mask_c))

    assert torch.autograd.gradcheck(by_position, [inputs[k] for k in positions])


def test_zoneout_masks_keep_exactly_and_update_exactly():
    """A kept unit carries its previous value bit for bit; p = 0 is the plain layer bit for bit."""
    variant = (None, False)
    tensors, params = zoneout_layer_inputs(variant, 0, False)
    ones = torch.ones(T_Z, B_Z, H, dtype=torch.float64)
    out, _, c = run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, 0, False, tensors,
                                  params, (ones, ones))
    assert torch.equal(out, tensors[1].expand(T_Z, B_Z, H)) and torch.equal(c, tensors[2])
    plain = run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, 0, False, tensors,
                              params, None)
    zero = run_zoneout_layer(lstm_fused.functional.lstm_layer, variant, 0, False, tensors,
                             params, (ones * 0, ones * 0))
    for a, b in zip(plain, zero, strict=True):
        assert torch.equal(a, b)


# --- zoneout: the modules (masks drawn per call, layer and direction; eval's expectation) ------


class KeepRecorder:
    """A stand-in layer function that records the `zoneout` argument of every call."""

    def __init__(self, layer_fn):
        self.layer_fn, self.keeps = layer_fn, []

    def __call__(self, *args, zoneout=None, **options):
        self.keeps.append(zoneout)
        return self.layer_fn(*args, zoneout=zoneout, **options)


# --- zoneout's keep masks: the Philox kernel (functional.keep_mask, the keep_mask op) ---------

# Random123's published known-answer vectors for Philox4x32-10 (its tests/kat_vectors):
# (counter, key, the four output words).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, words", PHILOX_KNOWN_ANSWERS)
def test_philox_twin_gives_random123_known_answers(counter, key, words):
    assert reference.philox4x32_10(counter, key) == words


def key_tensor(seed):
    return torch.tensor([seed], dtype=torch.int64)


# Sizes around the kernel's 4-element blocks, its 16-block lane chunks and the four quarters.
MASK_SIZES = [[0], [1], [2], [3], [5], [7, 5, 9], [63], [64], [65], [3, 43], [257], [4, 129]]


@pytest.mark.parametrize("size", MASK_SIZES, ids=str)
def test_keep_mask_kernel_equals_the_twin_bit_for_bit(size):
    """The CPU kernel (SIMD lanes, quarters, tails) against the twin written out in Python, for
    negative and large keys, p = 0 (nothing kept), 1 (everything) and in between, every dtype."""
    for seed in (0, 1, -1234567890123, 2**63 - 1, -2**63):
        for p in (0.0, 0.3, 0.999, 1.0):
            expected = reference.keep_mask(seed, size, p)
            for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
                got = lstm_fused.ops.ops.keep_mask(key_tensor(seed), size, p, dtype)
                assert got.dtype == dtype and list(got.shape) == size
                assert torch.equal(got.double(), expected), (seed, p, dtype)


def test_keep_mask_is_the_same_for_any_thread_count():
    size = [37, 64, 19]  # 45,000 elements: several parallel chunks
    threads = torch.get_num_threads()
    try:
        masks = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            masks.append(lstm_fused.ops.ops.keep_mask(key_tensor(99), size, 0.4, torch.float32))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_mask_statistics(p):
    """Over 2^20 units the kept fraction is p within 4 standard errors; neighbours (in a row,
    across quarters of one Philox block) and two keys are uncorrelated within 4 standard
    errors; another key gives another mask."""
    n = 2**20
    a = lstm_fused.ops.ops.keep_mask(key_tensor(5), [n], p, torch.float64)
    b = lstm_fused.ops.ops.keep_mask(key_tensor(6), [n], p, torch.float64)
    assert abs(a.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    bound = 4 / math.sqrt(n // 4)
    for x, y in ((a[1:], a[:-1]), (a[: n // 4], a[n // 4: n // 2]), (a, b)):
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < bound
    assert not torch.equal(a, b)


def test_keep_mask_key_comes_from_torch_generator():
    """functional.keep_mask draws its key from torch's generator: the same seed gives the same
    mask, and the key is one int64 (the mask equals the twin's for the key drawn)."""
    like = torch.empty(0, dtype=torch.float32)
    torch.manual_seed(11)
    first = lstm_fused.functional.keep_mask(like, (3, 4, 5), 0.3)
    torch.manual_seed(11)
    key = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64).item()
    torch.manual_seed(11)
    assert torch.equal(lstm_fused.functional.keep_mask(like, (3, 4, 5), 0.3), first)
    assert torch.equal(first.double(), reference.keep_mask(key, (3, 4, 5), 0.3))
    assert first.dtype == torch.float32 and first.shape == (3, 4, 5)


def test_keep_mask_errors_name_what_was_expected():
    keep_mask = lstm_fused.ops.ops.keep_mask
    with pytest.raises(TypeError, match="seed to be an int64 tensor of one element"):
        keep_mask(torch.tensor([1.0]), [3], 0.5, torch.float32)
    with pytest.raises(TypeError, match="seed to be an int64 tensor of one element"):
        keep_mask(torch.tensor([1, 2]), [3], 0.5, torch.float32)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"p, the probability of keeping a unit, in \[0, 1\]"):
            keep_mask(key_tensor(1), [3], p, torch.float32)
    with pytest.raises(TypeError, match="floating-point dtype"):
        keep_mask(key_tensor(1), [3], 0.5, torch.int32)
    with pytest.raises(ValueError, match="non-negative extents"):
        keep_mask(key_tensor(1), [3, -1], 0.5, torch.float32)


def test_keep_mask_opcheck():
    torch.library.opcheck(lstm_fused.ops.ops.keep_mask, (key_tensor(3), [4, 5], 0.25,
                                                          torch.float32))


def test_zoneout_masks_statistics_one_per_layer_and_direction():
    p_h, p_c = 0.3, 0.6
    lstm = lstm_fused.LSTM(I, 64, num_layers=2, bidirectional=True, proj_size=8,
                           zoneout=(p_h, p_c), dtype=torch.float64)
    recorder = KeepRecorder(lstm_fused.functional.fused_layer)
    lstm._layer_fn = recorder
    x = sequences(T=20, B=16)
    lstm(x)
    assert len(recorder.keeps) == 4
    for keep_h, keep_c in recorder.keeps:
        assert keep_h.shape == (20, 16, 8) and keep_c.shape == (20, 16, 64)
        for mask, p in ((keep_h, p_h), (keep_c, p_c)):
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            fraction, n = mask.mean().item(), mask.numel()
            assert abs(fraction - p) < 4 * math.sqrt(p * (1 - p) / n), (fraction, p)
    flat = [m for pair in recorder.keeps for m in pair]
    for a in range(len(flat)):
        for b in range(a):
            assert flat[a].shape != flat[b].shape or not torch.equal(flat[a], flat[b])


@variant_params
@pytest.mark.parametrize("case", ["plain", "stacked-bidirectional", "projection",
                                  "interlayer-dropout", "layer-norm"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_zoneout_module_forward_and_backward_see_the_same_masks(variant, case, packed):
    """The masks a training call drew, given to the twin (the same seed draws them again),
    give the same output, states and gradients of every parameter: the backward used the
    forward's masks. With DropConnect and forget_bias too."""
    peephole, coupled = variant

    def make():
        torch.manual_seed(0)
        return lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, zoneout=(0.4, 0.3),
                               dtype=torch.float64, weight_dropout=0.2, forget_bias=1.0,
                               **LAYER_CASES[case])

    assert_fused_equals_reference_with_the_same_seed(make, packed)


def test_zoneout_eval_is_the_expectation_formula():
    """Eval: h_t = p_h h_{t-1} + (1 - p_h) h~_t, c likewise, h~ and c~ from torch.nn.LSTMCell
    on the zoned states; deterministic."""
    p_h, p_c = 0.3, 0.6
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, zoneout=(p_h, p_c), dtype=torch.float64).eval()
    cell = torch.nn.LSTMCell(I, H, dtype=torch.float64)
    cell.load_state_dict({k[:-3]: v for k, v in lstm.state_dict().items()})
    x = sequences(T=6)
    h = c = torch.zeros(3, H, dtype=torch.float64)
    expected = []
    with torch.no_grad():
        for x_t in x:
            h_new, c_new = cell(x_t, (h, c))
            h, c = p_h * h + (1 - p_h) * h_new, p_c * c + (1 - p_c) * c_new
            expected.append(h)
        out, (h_n, c_n) = lstm(x)
        again = lstm(x)[0]
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n[0], h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_n[0], c, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, again)


def test_zoneout_same_seed_bit_identical_different_seed_differs():
    lstm = lstm_fused.LSTM(I, H, num_layers=2, zoneout=0.5)
    x = sequences(dtype=torch.float32)

    def run(seed):
        torch.manual_seed(seed)
        out, (h, c) = lstm(x)
        out.sum().backward()
        grads = [p.grad.clone() for p in lstm.parameters()]
        lstm.zero_grad()
        return [out, h, c, *grads]

    first, second, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[4]],
                         ids=[variant_id(v) for v in (VARIANTS[0], VARIANTS[4])])
def test_zoneout_cell_module_training_masks_and_eval_expectation(variant):
    peephole, coupled = variant
    p_h, p_c = 0.5, 0.25
    torch.manual_seed(0)
    cell = lstm_fused.LSTMCell(I, 200, peephole=peephole, coupled=coupled, zoneout=(p_h, p_c),
                               dtype=torch.float64)
    x = torch.randn(64, I, dtype=torch.float64)
    hx = (torch.randn(64, 200, dtype=torch.float64), torch.randn(64, 200, dtype=torch.float64))
    h, c = cell(x, hx)
    for new, old, p in ((h, hx[0], p_h), (c, hx[1], p_c)):
        kept = (new == old).double().mean().item()
        assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / new.numel())
    cell.eval()
    with torch.no_grad():
        h, c = cell(x, hx)
        plain_h, plain_c = reference.lstm_cell(x, *hx, *cell._parameters_for(""),
                                               peephole=peephole, coupled=coupled)
    torch.testing.assert_close(h, p_h * hx[0] + (1 - p_h) * plain_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, p_c * hx[1] + (1 - p_c) * plain_c, rtol=1e-12, atol=1e-12)
    # unbatched input: the same step on one row
    h1, c1 = cell(x[0], (hx[0][0], hx[1][0]))
    torch.testing.assert_close(h1, h[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c1, c[0], rtol=1e-12, atol=1e-12)


def test_zoneout_unbatched_and_batch_first_match_batched():
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, zoneout=(0.2, 0.4), dtype=torch.float64).eval()
    x = sequences()
    out = lstm(x)[0]
    torch.testing.assert_close(lstm(x[:, 1])[0], out[:, 1], rtol=1e-12, atol=1e-12)
    lstm.batch_first = True
    torch.testing.assert_close(lstm(x.transpose(0, 1))[0], out.transpose(0, 1), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("module", [lstm_fused.LSTM, lstm_fused.LSTMCell])
def test_zoneout_errors(module):
    for bad in (1.0, -0.1, (0.2, 1.5), float("nan")):
        with pytest.raises(ValueError, match="zoneout"):
            module(I, H, zoneout=bad)
    for bad in ((0.1,), (0.1, 0.2, 0.3), []):
        with pytest.raises(ValueError, match="zoneout should be a number or a pair"):
            module(I, H, zoneout=bad)
    for bad in ("0.1", (0.1, "x"), None, True):
        with pytest.raises(TypeError, match="zoneout"):
            module(I, H, zoneout=bad)
    with pytest.raises(ValueError, match="torch.nn has no zoneout"):
        module(I, H, zoneout=0.1).to_torch()
    assert module(I, H, zoneout=[0.1, 0.2]).zoneout == (0.1, 0.2)
    assert "zoneout=(0.1, 0.1)" in repr(module(I, H, zoneout=0.1))
    assert "zoneout" not in repr(module(I, H))


def test_zoneout_functional_mask_errors_name_the_argument():
    tensors, params = zoneout_layer_inputs((None, False), 0, False)
    good = zoneout_masks(H, H)
    for zoneout, error, match in (
            ((good[0][:2], good[1]), ValueError, "keep_h: expected a mask of shape"),
            ((good[0], good[1].float()), TypeError, "keep_c: expected a mask of dtype"),
            ((good[0], 1.0), ValueError, "keep_c: expected a keep rate in"),
            ((good[0],), ValueError, "pair"),
            (("a", 0.1), TypeError, "keep_h")):
        for layer_fn in (lstm_fused.functional.lstm_layer, reference.lstm_layer):
            with pytest.raises(error, match=match):
                run_zoneout_layer(layer_fn, (None, False), 0, False, tensors, params, zoneout)
    x, h0, c0 = (t.detach() for t in tensors)
    args = (x, h0, c0, *(p.detach() for p in params[:4]), None, None, None, False, "none", False)
    with pytest.raises(ValueError, match="zoneout_c of shape"):
        lstm_fused.ops.ops.layer_forward(*args, True, 0.0, 0.0, None, good[1][:, :2])


def test_onnx_export_with_zoneout_eval_matches_eager_and_training_is_refused():
    onnxruntime = pytest.importorskip("onnxruntime")
    import lstm_fused.onnx

    torch.manual_seed(0)
    for options in ({}, {"proj_size": 2, "cell_clip": 0.5, "bidirectional": True},
                    {"layer_norm": True, "peephole": "diagonal", "coupled": True}):
        lstm = lstm_fused.LSTM(I, H, num_layers=2, zoneout=(0.3, 0.5), **options)
        x = sequences(dtype=torch.float32)
        with pytest.raises(ValueError, match=r"training mode with zoneout=\(0.3, 0.5\).*eval"):
            lstm_fused.onnx.export(lstm, (x,), verbose=False)
        assert_eval_onnx_matches_eager(onnxruntime, lstm, x)


def test_zoneout_compiles_without_graph_breaks_and_matches_eager():
    """Training (the masks drawn inside the graph, the same seed as eager) and eval. (Packed
    input does not compile with or without zoneout: its batch sizes are checked as data.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, num_layers=2, proj_size=2, zoneout=(0.3, 0.2),
                           peephole="diagonal")
    x = sequences(dtype=torch.float32)
    explanation = torch._dynamo.explain(lstm)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    for training in (True, False):
        lstm.train(training)
        torch._dynamo.reset()
        compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
        results = []
        for model in (compiled, lstm):
            lstm.zero_grad(set_to_none=True)
            torch.manual_seed(4)
            out, (h, c) = model(x)
            (out.sum() + c.sum()).backward()
            results.append([out, h, c] + [p.grad for p in lstm.parameters()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zoneout_half_storage_and_autocast_follow_float32(dtype):
    """A zoneout module stored in half precision, and the float32 module under autocast, give
    the float32 result (eval: the rates; training: the same seed, so the same masks) within the
    suite's half-precision tolerances."""
    from conftest import assert_close_scaled

    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, num_layers=2, zoneout=(0.3, 0.5), peephole="diagonal")
    x = sequences(dtype=torch.float32)
    for training in (False, True):
        lstm.train(training)
        torch.manual_seed(3)
        expected = lstm(x)[0]
        half = lstm_fused.LSTM(I, H, num_layers=2, zoneout=(0.3, 0.5), peephole="diagonal",
                               dtype=dtype).train(training)
        half.load_state_dict(lstm.state_dict())
        torch.manual_seed(3)
        assert_close_scaled(half(x.to(dtype))[0], expected.detach(), dtype,
                            f"{dtype} storage, training={training}")
        with torch.autocast("cpu", dtype=dtype):
            torch.manual_seed(3)
            out = lstm(x)[0]
        assert out.dtype == dtype
        assert_close_scaled(out, expected.detach(), dtype, f"autocast {dtype}",
                            kind="autocast")
