"""lstm_fused.LSTM in the rest of the PyTorch stack: torch.compile, torch.export, state_dict,
pickle, deepcopy, conversion from and to torch.nn.LSTM / LSTMCell, and profiler labels."""

import copy
import io
import json
import pickle

import pytest
import torch
from conftest import VARIANTS, assert_close, grid, variant_id, variant_params

import lstm_fused
from lstm_fused.ops import OP_NAMES

T, B, I, H = 5, 3, 4, 6


class Tagger(torch.nn.Module):
    """A small model using lstm_fused.LSTM: per-step scores from a recurrent encoder."""

    def __init__(self, **lstm_options):
        super().__init__()
        self.lstm = lstm_fused.LSTM(I, H, batch_first=True, **lstm_options)
        directions = 2 if self.lstm.bidirectional else 1
        self.head = torch.nn.Linear(directions * (self.lstm.proj_size or H), 2)

    def forward(self, x):
        out, (h_n, c_n) = self.lstm(x)
        return self.head(out), h_n, c_n


def make_tagger(options):
    torch.manual_seed(0)
    return Tagger(**options)


def inputs():
    return torch.randn(B, T, I, generator=torch.Generator().manual_seed(1))


def outputs_and_grads(model, x):
    x = x.detach().requires_grad_()
    outputs = model(x)
    loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in outputs)
    return [*outputs, *torch.autograd.grad(loss, [x, *model.parameters()])]


COMPILE_CASES = {
    "vanilla-2-layers-bidirectional-projected": {"num_layers": 2, "bidirectional": True,
                                                 "proj_size": 3},
    "diagonal-coupled": {"peephole": "diagonal", "coupled": True},
    "full-standard-2-layers": {"peephole": "full", "num_layers": 2},
    "clipped-diagonal-projected": {"peephole": "diagonal", "proj_size": 3, "cell_clip": 0.3,
                                   "proj_clip": 0.2},
    "layer-norm-full-coupled-bidirectional": {"layer_norm": True, "peephole": "full",
                                              "coupled": True, "bidirectional": True},
    "layer-norm-diagonal-projected-clipped": {"layer_norm": True, "peephole": "diagonal",
                                              "proj_size": 3, "cell_clip": 0.3},
}


@pytest.mark.parametrize("options", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_compiled_model_has_no_graph_breaks_and_matches_eager(options):
    model = make_tagger(options)
    x = inputs()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for a, b in zip(outputs_and_grads(compiled, x), outputs_and_grads(model, x)):
        assert_close(a, b, torch.float32, "compiled (aot_eager) vs eager")


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    torch._dynamo.reset()
    model = make_tagger({"peephole": "diagonal", "bidirectional": True})
    x = inputs()
    compiled = torch.compile(model, fullgraph=True)  # inductor, the default backend
    for a, b in zip(outputs_and_grads(compiled, x), outputs_and_grads(model, x)):
        assert_close(a, b, torch.float32, "compiled (inductor) vs eager")


@variant_params
@pytest.mark.parametrize("clips", [{}, {"cell_clip": 0.3}, {"layer_norm": True, "cell_clip": 0.3}],
                         ids=["unclipped", "cell_clip", "layer_norm"])
def test_exported_program_runs_and_matches_eager(variant, clips):
    peephole, coupled = variant
    model = make_tagger({"peephole": peephole, "coupled": coupled, "num_layers": 2, **clips})
    x = inputs()
    exported = torch.export.export(model, (x,))
    layer_ops = [node for node in exported.graph.nodes
                 if node.target == torch.ops.lstm_fused.layer_forward.default]
    assert len(layer_ops) == 2  # one fused op per layer, not decomposed into a time loop
    fresh = inputs() * 2  # new values, same shapes
    for a, b in zip(exported.module()(fresh), model(fresh)):
        assert_close(a, b, torch.float32, "exported vs eager")


def test_exported_program_with_dynamic_batch_runs_at_other_batch_sizes():
    model = make_tagger({"peephole": "full", "coupled": True})
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (inputs(),), dynamic_shapes=({0: batch},))
    for other_batch in (1, 7):
        x = torch.randn(other_batch, T, I)
        for a, b in zip(exported.module()(x), model(x)):
            assert_close(a, b, torch.float32, f"exported, batch {other_batch}")


# --- saving, pickling, copying ---------------------------------------------------------------


def save_and_load_state_dict(module, options):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    clone = lstm_fused.LSTM(I, H, **options)
    clone.load_state_dict(torch.load(buffer))
    return clone


ROUND_TRIPS = {"state_dict": save_and_load_state_dict,
               "pickle": lambda module, _: pickle.loads(pickle.dumps(module)),
               "deepcopy": lambda module, _: copy.deepcopy(module)}


@variant_params
@pytest.mark.parametrize("round_trip", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_gives_an_independent_module_with_identical_outputs(variant, round_trip):
    peephole, coupled = variant
    options = {"peephole": peephole, "coupled": coupled, "num_layers": 2, "bidirectional": True,
               "proj_size": 2}
    torch.manual_seed(0)
    module = lstm_fused.LSTM(I, H, **options)
    clone = round_trip(module, options)
    assert repr(clone) == repr(module)
    x = torch.randn(T, B, I)
    for a, b in zip(clone(x)[1], module(x)[1]):
        assert torch.equal(a, b)
    assert torch.equal(clone(x)[0], module(x)[0])
    with torch.no_grad():  # the clone owns its parameters
        next(clone.parameters()).add_(1)
    assert not torch.equal(clone(x)[0], module(x)[0])


# --- conversion from and to torch.nn ------------------------------------------------------------


OPTIONS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
           "bidirectional", "proj_size")


@grid(num_layers=[1, 2], bidirectional=[False, True], proj_size=[0, 2], batch_first=[False, True],
      bias=[True, False])
def test_from_torch_and_to_torch_keep_options_weights_and_results(num_layers, bidirectional,
                                                                  proj_size, batch_first, bias):
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional,
                           proj_size=proj_size, batch_first=batch_first, bias=bias,
                           dropout=0.25 if num_layers > 1 else 0.0, dtype=torch.float64).eval()
    ours = lstm_fused.LSTM.from_torch(theirs)
    assert type(ours) is lstm_fused.LSTM and ours.peephole is None and not ours.coupled
    assert not ours.training
    for name in OPTIONS:
        assert getattr(ours, name) == getattr(theirs, name), name
    x = torch.randn(B, T, I, dtype=torch.float64) if batch_first else torch.randn(
        T, B, I, dtype=torch.float64)
    for a, b in zip(ours(x)[1] + (ours(x)[0],), theirs(x)[1] + (theirs(x)[0],)):
        assert_close(a, b, torch.float64, "from_torch")

    back = ours.to_torch()
    assert type(back) is torch.nn.LSTM and not back.training
    for name in OPTIONS:
        assert getattr(back, name) == getattr(theirs, name), name
    mine, original = back.state_dict(), theirs.state_dict()
    assert mine.keys() == original.keys()
    for key in original:
        assert torch.equal(mine[key], original[key]) and mine[key].dtype == torch.float64, key


@pytest.mark.parametrize("bias", [True, False])
def test_cell_from_torch_and_to_torch(bias):
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(I, H, bias=bias)
    ours = lstm_fused.LSTMCell.from_torch(theirs)
    x = torch.randn(B, I)
    for a, b in zip(ours(x), theirs(x)):
        assert_close(a, b, torch.float32, "cell from_torch")
    back = ours.to_torch()
    assert type(back) is torch.nn.LSTMCell and back.bias == bias
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != (None, False)],
                         ids=[variant_id(v) for v in VARIANTS if v != (None, False)])
def test_only_the_vanilla_variant_converts_to_torch(variant):
    peephole, coupled = variant
    with pytest.raises(ValueError, match="needs the vanilla variant"):
        lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled).to_torch()


# --- profiler labels ---------------------------------------------------------------------------


def _chrome_trace_names(fn, tmp_path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    return {e["name"] for e in events if e.get("name", "").startswith("lstm_fused::")}


@pytest.mark.parametrize("gemm", ["aten", "simd"])
@pytest.mark.parametrize("peephole", [None, "full"])
def test_cpu_profiler_trace_labels_every_op(peephole, gemm, tmp_path):
    """An LSTM and an LSTMCell forward+backward leave a lstm_fused::<op> range for every
    operator and for every kernel launch in a chrome trace (on the simd GEMM path the layer's
    forward step is one kernel, recurrent_step, except with full peepholes)."""
    module = lstm_fused.LSTM(4, 6, peephole=peephole)
    cell = lstm_fused.LSTMCell(4, 6, peephole=peephole)
    x = torch.randn(3, 2, 4, requires_grad=True)

    def train_step():
        out, _ = module(x)
        h, c = cell(x[0])
        (out.sum() + h.sum() + c.sum()).backward()

    with lstm_fused.cpu_gemm.mode(gemm):
        names = _chrome_trace_names(train_step, tmp_path)
    expected = {f"lstm_fused::{name}" for name in OP_NAMES}
    expected |= {"lstm_fused::pointwise_forward", "lstm_fused::pointwise_backward"}
    if gemm == "simd" and peephole is None:
        expected.add("lstm_fused::recurrent_step")
    assert names == expected
