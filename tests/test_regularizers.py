"""The regularizer options of LSTM / LSTMCell (docs/regularizers.md): forget_bias (an
initialisation) and weight_dropout (DropConnect on weight_hh in training)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, variant_id, variant_params
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
}


@variant_params
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_weight_dropout_fused_matches_reference_forward_and_backward(variant, case, packed):
    """Same seed, same masks: the fused layer and the reference twin agree under DropConnect."""
    results = []
    for layer_fn in (lstm_fused.functional.fused_layer, reference.lstm_layer):
        lstm = make_lstm(variant, p=0.3, **LAYER_CASES[case])
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
    assert set(result["median_ms"]) == {"fused", "fused + DropConnect", "nn.LSTM + WeightDrop"}
    assert result["ratio_vs_plain"] > 0 and result["ratio_vs_wrapper"] > 0
    assert (tmp_path / "r.json").stat().st_size > 0
