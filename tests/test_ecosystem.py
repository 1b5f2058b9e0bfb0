"""lstm_fused.LSTM and lstm_fused.GRU (and their cells) in the rest of the PyTorch stack:
torch.compile, torch.export, state_dict, pickle, deepcopy, conversion from and to torch.nn.LSTM /
LSTMCell / GRU / GRUCell, and profiler labels."""

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
    """A small model using lstm_fused.LSTM (or lstm_fused.GRU with gru=True): per-step scores
    from a recurrent encoder."""

    def __init__(self, gru=False, **lstm_options):
        super().__init__()
        module = lstm_fused.GRU if gru else lstm_fused.LSTM
        self.lstm = module(I, H, batch_first=True, **lstm_options)
        directions = 2 if self.lstm.bidirectional else 1
        self.head = torch.nn.Linear(directions * (self.lstm.proj_size or H), 2)

    def forward(self, x):
        out, states = self.lstm(x)
        return self.head(out), *((states,) if isinstance(states, torch.Tensor) else states)


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
    "gru-2-layers-bidirectional": {"gru": True, "num_layers": 2, "bidirectional": True},
    "gru-no-bias": {"gru": True, "bias": False},
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


def packed_inputs():
    """A batch_first packed batch of B unsorted sequences (lengths 5, 2, 4)."""
    return torch.nn.utils.rnn.pack_padded_sequence(inputs(), torch.tensor([T, 2, 4]),
                                                   batch_first=True, enforce_sorted=False)


@pytest.mark.parametrize("module_class", [lstm_fused.LSTM, lstm_fused.GRU])
def test_compiled_module_on_packed_input_matches_eager(module_class):
    """A PackedSequence through the compiled module gives eager's forward and every gradient.
    Its batch_sizes is a tensor argument whose values set the time loop, so dynamo breaks the
    graph at the argument check (as for torch.nn.LSTM): fullgraph is for padded input."""
    torch.manual_seed(0)
    module = module_class(I, H, num_layers=2, bidirectional=True, batch_first=True)

    template = packed_inputs()

    def outputs_and_grads_packed(model):
        data = template.data.clone().requires_grad_()
        out, states = model(template._replace(data=data))
        outputs = [out.data, *((states,) if isinstance(states, torch.Tensor) else states)]
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in outputs)
        return [*outputs, *torch.autograd.grad(loss, [data, *module.parameters()])]

    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager")
    for a, b in zip(outputs_and_grads_packed(compiled), outputs_and_grads_packed(module),
                    strict=True):
        assert_close(a, b, torch.float32, "compiled packed (aot_eager) vs eager")


@pytest.mark.parametrize("batched", [True, False])
def test_compiled_gru_cell_loop_matches_eager(batched):
    """GRUCell stepped in a Python loop under torch.compile(fullgraph=True): forward and every
    gradient (input, state, parameters) equal eager's."""
    torch.manual_seed(0)
    cell = lstm_fused.GRUCell(I, H)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1))
    h0 = torch.randn(B, H, generator=torch.Generator().manual_seed(2))
    if not batched:
        x, h0 = x[:, 0], h0[0]

    def steps(cell, x, h):
        outputs = []
        for t in range(T):
            h = cell(x[t], h)
            outputs.append(h)
        return torch.stack(outputs)

    def outputs_and_grads_cell(fn):
        leaves = [x.clone().requires_grad_(), h0.clone().requires_grad_()]
        out = fn(cell, *leaves)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        return [out, *torch.autograd.grad(loss, [*leaves, *cell.parameters()])]

    compiled = torch.compile(steps, fullgraph=True, backend="aot_eager")
    for a, b in zip(outputs_and_grads_cell(compiled), outputs_and_grads_cell(steps), strict=True):
        assert_close(a, b, torch.float32, "compiled GRUCell (aot_eager) vs eager")


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"peephole": "diagonal", "bidirectional": True},
                                     {"gru": True, "bidirectional": True}],
                         ids=["lstm-diagonal", "gru"])
def test_inductor_compiled_model_matches_eager(options):
    torch._dynamo.reset()
    model = make_tagger(options)
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


@grid(num_layers=[1, 2], bidirectional=[False, True])
def test_exported_gru_program_runs_and_matches_eager(num_layers, bidirectional):
    model = make_tagger({"gru": True, "num_layers": num_layers, "bidirectional": bidirectional})
    x = inputs()
    exported = torch.export.export(model, (x,))
    layer_ops = [node for node in exported.graph.nodes
                 if node.target == torch.ops.lstm_fused.gru_layer_forward.default]
    # One fused op per layer and direction, not decomposed into a time loop.
    assert len(layer_ops) == num_layers * (2 if bidirectional else 1)
    fresh = inputs() * 2  # new values, same shapes
    for a, b in zip(exported.module()(fresh), model(fresh), strict=True):
        assert_close(a, b, torch.float32, "exported vs eager")


@pytest.mark.parametrize("batched", [True, False])
def test_exported_gru_cell_runs_and_matches_eager(batched):
    torch.manual_seed(0)
    cell = lstm_fused.GRUCell(I, H)
    x, h = torch.randn(B, I), torch.randn(B, H)
    if not batched:
        x, h = x[0], h[0]
    exported = torch.export.export(cell, (x, h))
    assert any(node.target == torch.ops.lstm_fused.gru_layer_forward.default
               for node in exported.graph.nodes)
    x2, h2 = x * 2, h - 1  # new values, same shapes
    assert_close(exported.module()(x2, h2), cell(x2, h2), torch.float32, "exported cell")


@pytest.mark.parametrize("options", [{"peephole": "full", "coupled": True}, {"gru": True}],
                         ids=["lstm-full-coupled", "gru"])
def test_exported_program_with_dynamic_batch_runs_at_other_batch_sizes(options):
    model = make_tagger(options)
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
    clone = type(module)(I, H, **options)
    clone.load_state_dict(torch.load(buffer))
    return clone


ROUND_TRIPS = {"state_dict": save_and_load_state_dict,
               "pickle": lambda module, _: pickle.loads(pickle.dumps(module)),
               "deepcopy": lambda module, _: copy.deepcopy(module)}


ROUND_TRIP_MODULES = [(lstm_fused.LSTM, {"peephole": p, "coupled": c, "num_layers": 2,
                                          "bidirectional": True, "proj_size": 2})
                      for p, c in VARIANTS]
ROUND_TRIP_MODULES += [(lstm_fused.GRU, {"num_layers": 2, "bidirectional": True}),
                       (lstm_fused.GRU, {"bias": False, "batch_first": True,
                                         "weight_dropout": 0.25}),
                       (lstm_fused.GRUCell, {}), (lstm_fused.GRUCell, {"bias": False})]
ROUND_TRIP_IDS = [variant_id(v) for v in VARIANTS] + ["gru-2-layers-bidirectional",
                                                      "gru-no-bias-weight-dropout", "gru-cell",
                                                      "gru-cell-no-bias"]


def _outputs(module, x):
    """A module's results as a flat list of tensors (LSTM, GRU or GRUCell)."""
    if isinstance(module, lstm_fused.GRUCell):
        return [module(x[0])]
    out, states = module(x)
    return [out, *((states,) if isinstance(states, torch.Tensor) else states)]


@pytest.mark.parametrize("module_class, options", ROUND_TRIP_MODULES, ids=ROUND_TRIP_IDS)
@pytest.mark.parametrize("round_trip", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_gives_an_independent_module_with_identical_outputs(module_class, options,
                                                                       round_trip):
    torch.manual_seed(0)
    module = module_class(I, H, **options).eval()
    clone = round_trip(module, options).eval()
    assert type(clone) is module_class
    assert repr(clone) == repr(module)
    x = torch.randn(T, B, I)
    for a, b in zip(_outputs(clone, x), _outputs(module, x), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # the clone owns its parameters
        next(clone.parameters()).add_(1)
    assert not torch.equal(_outputs(clone, x)[0], _outputs(module, x)[0])


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


GRU_OPTIONS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
               "bidirectional")


@grid(num_layers=[1, 2], bidirectional=[False, True], batch_first=[False, True],
      bias=[True, False])
def test_gru_from_torch_and_to_torch_keep_options_weights_and_results(num_layers, bidirectional,
                                                                      batch_first, bias):
    torch.manual_seed(0)
    theirs = torch.nn.GRU(I, H, num_layers=num_layers, bidirectional=bidirectional,
                          batch_first=batch_first, bias=bias,
                          dropout=0.25 if num_layers > 1 else 0.0, dtype=torch.float64).eval()
    ours = lstm_fused.GRU.from_torch(theirs)
    assert type(ours) is lstm_fused.GRU and not ours.training
    for name in GRU_OPTIONS:
        assert getattr(ours, name) == getattr(theirs, name), name
    x = torch.randn(B, T, I, dtype=torch.float64) if batch_first else torch.randn(
        T, B, I, dtype=torch.float64)
    for a, b in zip(ours(x), theirs(x), strict=True):
        assert_close(a, b, torch.float64, "from_torch")

    back = ours.to_torch()
    assert type(back) is torch.nn.GRU and not back.training
    for name in GRU_OPTIONS:
        assert getattr(back, name) == getattr(theirs, name), name
    mine, original = back.state_dict(), theirs.state_dict()
    assert mine.keys() == original.keys()
    for key in original:
        assert torch.equal(mine[key], original[key]) and mine[key].dtype == torch.float64, key


@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_from_torch_and_to_torch(bias):
    torch.manual_seed(0)
    theirs = torch.nn.GRUCell(I, H, bias=bias)
    ours = lstm_fused.GRUCell.from_torch(theirs)
    x = torch.randn(B, I)
    assert_close(ours(x), theirs(x), torch.float32, "cell from_torch")
    back = ours.to_torch()
    assert type(back) is torch.nn.GRUCell and back.bias == bias
    assert back.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("module_class", [lstm_fused.GRU, lstm_fused.GRUCell])
def test_gru_with_weight_dropout_does_not_convert_to_torch(module_class):
    with pytest.raises(ValueError, match="torch.nn has no DropConnect"):
        module_class(I, H, weight_dropout=0.2).to_torch()


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
    """An LSTM, an LSTMCell, a GRU and a GRUCell forward+backward leave a lstm_fused::<op> range
    for every operator and for every kernel launch in a chrome trace (on the simd GEMM path the
    LSTM layer's forward step is one kernel, recurrent_step, except with full peepholes)."""
    module = lstm_fused.LSTM(4, 6, peephole=peephole)
    cell = lstm_fused.LSTMCell(4, 6, peephole=peephole)
    gru, gru_cell = lstm_fused.GRU(4, 6), lstm_fused.GRUCell(4, 6)
    x = torch.randn(3, 2, 4, requires_grad=True)

    def train_step():
        out, _ = module(x)
        h, c = cell(x[0])
        gru_out, _ = gru(x)
        (out.sum() + h.sum() + c.sum() + gru_out.sum() + gru_cell(x[0]).sum()).backward()

    with lstm_fused.cpu_gemm.mode(gemm):
        names = _chrome_trace_names(train_step, tmp_path)
    expected = {f"lstm_fused::{name}" for name in OP_NAMES}
    expected |= {"lstm_fused::pointwise_forward", "lstm_fused::pointwise_backward",
                 "lstm_fused::gru_pointwise_forward", "lstm_fused::gru_pointwise_backward"}
    if gemm == "simd" and peephole is None:
        expected.add("lstm_fused::recurrent_step")
    assert names == expected
