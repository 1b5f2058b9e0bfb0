"""ONNX export (lstm_fused.onnx): every variant and option exported, run in onnxruntime at a batch
size and sequence length other than the export's, and compared with eager PyTorch."""

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import VARIANTS, variant_id
from onnx.reference import ReferenceEvaluator

import lstm_fused
import lstm_fused.onnx

I, H = 3, 4
EXPORT_T, EXPORT_B = 3, 2  # the example the model is exported with
RUN_T, RUN_B = 6, 5  # what the exported model then runs on

# Options of lstm_fused.LSTM. The fast tests cover each variant with the richest option set and
# each option on some variant; the slow test crosses every variant with every option.
OPTIONS = {
    "plain": {},
    "stacked-bidirectional-batch_first": {"num_layers": 2, "bidirectional": True,
                                          "batch_first": True},
    "projection": {"proj_size": 2},
    "no-bias": {"bias": False},
    # TensorFlow's state clipping: Clip nodes in the Scan body.
    "cell_clip": {"cell_clip": 0.4},
    "clips-projection": {"proj_size": 2, "cell_clip": 0.4, "proj_clip": 0.25},
    # Layer norm: one LayerNormalization per gate in the Scan body (opset >= 17).
    "layer_norm": {"layer_norm": True, "num_layers": 2, "bidirectional": True},
    "layer_norm-clips-projection": {"layer_norm": True, "proj_size": 2, "cell_clip": 0.4,
                                    "proj_clip": 0.25, "layer_norm_eps": 1e-3},
}


def make_lstm(peephole, coupled, dtype=torch.float32, **options):
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, dtype=dtype, **options)
    with torch.no_grad():  # γ away from its initial ones, so the export must carry it
        for name, p in lstm.named_parameters():
            if name.startswith("weight_ln"):
                p.uniform_(0.5, 1.5)
    return lstm.eval()


def lstm_inputs(lstm, T, B, initial_states, dtype=torch.float32):
    """(x,) or (x, (h_0, c_0)) for `lstm` at sequence length T and batch B."""
    generator = torch.Generator().manual_seed(T * 100 + B)
    x = torch.randn(*((B, T) if lstm.batch_first else (T, B)), I, generator=generator)
    if not initial_states:
        return (x.to(dtype),)
    rows = lstm.num_layers * (2 if lstm.bidirectional else 1)
    h0 = torch.randn(rows, B, lstm.proj_size or H, generator=generator)
    c0 = torch.randn(rows, B, H, generator=generator)
    return (x.to(dtype), (h0.to(dtype), c0.to(dtype)))


def flat(values):
    return torch.utils._pytree.tree_leaves(values)


def run_onnxruntime(program, args):
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat(args), strict=True)}
    return [torch.from_numpy(a) for a in session.run(None, feeds)]


def eager(model, args):
    with torch.no_grad():
        return flat(model(*args))


def assert_matches(got, expected, atol):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, atol=atol, rtol=0)


def op_types(program):
    """Every node's (domain, op_type), also inside Scan bodies."""
    graphs, found = [program.model_proto.graph], []
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            found.append((node.domain, node.op_type))
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    return found


def assert_standard_graph(program, lstm):
    """Only standard ops; none/diagonal layers are ONE LSTM node per layer and direction,
    full peepholes and projections a Scan."""
    types = op_types(program)
    assert {domain for domain, _ in types} <= {""}, types
    assert not program.model_proto.functions
    names = [name for _, name in types]
    nodes = lstm.num_layers * (2 if lstm.bidirectional else 1)
    clips = [clip for clip in (lstm.cell_clip, lstm.proj_clip) if clip]
    assert names.count("Clip") == nodes * len(clips), names
    assert names.count("LayerNormalization") == (nodes * lstm.num_gates if lstm.layer_norm
                                                 else 0), names
    if lstm.peephole == "full" or lstm.proj_size or clips or lstm.layer_norm:
        assert names.count("Scan") == nodes and "LSTM" not in names
    else:
        assert names.count("LSTM") == nodes and "Scan" not in names


def check_layer(peephole, coupled, options, initial_states=True, dtype=torch.float32,
                atol=1e-5, **export_options):
    lstm = make_lstm(peephole, coupled, dtype=dtype, **options)
    program = lstm_fused.onnx.export(
        lstm, lstm_inputs(lstm, EXPORT_T, EXPORT_B, initial_states, dtype), verbose=False,
        **export_options)
    assert_standard_graph(program, lstm)
    args = lstm_inputs(lstm, RUN_T, RUN_B, initial_states, dtype)
    assert_matches(run_onnxruntime(program, args), eager(lstm, args), atol)
    return program, lstm, args


FAST_CASES = (
    [(variant, "stacked-bidirectional-batch_first", True) for variant in VARIANTS]
    + [((None, False), "plain", False), (("diagonal", True), "no-bias", False),
       ((None, False), "projection", True), (("diagonal", True), "projection", False)]
    + [(variant, "clips-projection", True) for variant in VARIANTS]
    + [(("diagonal", False), "cell_clip", True)]
    + [(variant, "layer_norm-clips-projection", True) for variant in VARIANTS]
    + [(("diagonal", True), "layer_norm", False), (("full", False), "layer_norm", True)]
)


@pytest.mark.parametrize("variant, options, initial_states", FAST_CASES,
                         ids=[f"{variant_id(v)}-{o}-{'hx' if h else 'nohx'}"
                              for v, o, h in FAST_CASES])
def test_layer_exports_and_runs_in_onnxruntime_at_other_sizes(variant, options, initial_states):
    check_layer(*variant, OPTIONS[options], initial_states)


# Every variant with every option (initial states given), and without initial states; less what
# the fast test runs.
SLOW_CASES = [case for case in [*itertools.product(VARIANTS, OPTIONS, [True]),
                                *itertools.product(VARIANTS, ["plain"], [False])]
              if case not in FAST_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("variant, options, initial_states", SLOW_CASES,
                         ids=[f"{variant_id(v)}-{o}-{'hx' if h else 'nohx'}"
                              for v, o, h in SLOW_CASES])
def test_every_variant_and_option_exports(variant, options, initial_states):
    check_layer(*variant, OPTIONS[options], initial_states)


@pytest.mark.parametrize("variant", [("diagonal", True), ("full", False)],
                         ids=variant_id)
def test_float16_model_exports_and_matches_eager(variant):
    program, _, _ = check_layer(*variant, {"bidirectional": True}, dtype=torch.float16,
                                atol=3e-3)
    assert program.model_proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("variant, options", [(("diagonal", True), {"bidirectional": True}),
                                              (("full", False), {"proj_size": 2})],
                         ids=["lstm-node", "scan"])
def test_opset_14(variant, options):
    program, _, _ = check_layer(*variant, options, opset_version=14)
    assert {o.domain: o.version for o in program.model_proto.opset_import}[""] == 14


def test_layer_norm_exports_at_opset_17_and_is_refused_below():
    """LayerNormalization exists from opset 17: a layer-norm model lowers to 17, not to 16."""
    program, lstm, _ = check_layer("diagonal", True, OPTIONS["layer_norm-clips-projection"],
                                   opset_version=17)
    assert {o.domain: o.version for o in program.model_proto.opset_import}[""] == 17
    with pytest.raises(ValueError, match=r"\(LayerNormalization\) is not the same operator at "
                                         r"opset_version=16"):
        lstm_fused.onnx.export(lstm, lstm_inputs(lstm, EXPORT_T, EXPORT_B, True), verbose=False,
                               opset_version=16)


def test_coupled_mapping_does_not_depend_on_input_forget():
    """The coupled export (input-gate rows = negated forget rows) gives i = 1 - f whatever a
    runtime makes of input_forget: exported with 0, and with the attribute flipped to 1 (which
    onnxruntime implements as f = 1 - i, and onnx's reference evaluator ignores), both
    onnxruntime and onnx.reference.ReferenceEvaluator give the eager numbers."""
    program, lstm, args = check_layer("diagonal", True, {"bidirectional": True})
    model = program.model_proto
    lstm_nodes = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert all(onnx.helper.get_node_attr_value(n, "input_forget") == 0 for n in lstm_nodes)
    expected = eager(lstm, args)
    feeds = {i.name: t.numpy() for i, t in zip(model.graph.input, flat(args), strict=True)}
    for input_forget in (0, 1):
        for node in lstm_nodes:
            next(a for a in node.attribute if a.name == "input_forget").i = input_forget
        session = onnxruntime.InferenceSession(model.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        for runtime in (session, ReferenceEvaluator(model)):
            got = [torch.from_numpy(np.asarray(a)) for a in runtime.run(None, feeds)]
            assert_matches(got, expected, atol=1e-5)


@pytest.mark.parametrize("cell_clip", [None, 0.3])
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def test_cell_exports_as_a_few_standard_ops(variant, cell_clip):
    peephole, coupled = variant
    torch.manual_seed(0)
    cell = lstm_fused.LSTMCell(I, H, peephole=peephole, coupled=coupled,
                               cell_clip=cell_clip).eval()

    def cell_args(B):
        generator = torch.Generator().manual_seed(B)
        return (torch.randn(B, I, generator=generator),
                (torch.randn(B, H, generator=generator), torch.randn(B, H, generator=generator)))

    program = lstm_fused.onnx.export(cell, cell_args(EXPORT_B), verbose=False)
    types = op_types(program)
    assert {domain for domain, _ in types} == {""} and len(types) <= 25, types
    assert not {"LSTM", "Scan", "Loop"} & {name for _, name in types}
    assert [name for _, name in types].count("Clip") == (1 if cell_clip else 0)
    args = cell_args(RUN_B)
    assert_matches(run_onnxruntime(program, args), eager(cell, args), atol=1e-5)


class Tagger(torch.nn.Module):
    """A model around the layer: an encoder and a read-out of the mean over time."""

    def __init__(self):
        super().__init__()
        self.lstm = lstm_fused.LSTM(I, H, peephole="diagonal", batch_first=True)
        self.head = torch.nn.Linear(H, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(dim=1))


def test_torch_onnx_export_with_the_translation_table_and_saving_to_a_file(tmp_path):
    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(EXPORT_B, EXPORT_T, I)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    torch.onnx.export(model, (x,), tmp_path / "tagger.onnx", dynamo=True, verbose=False,
                      dynamic_shapes=({0: batch, 1: time},),
                      custom_translation_table=lstm_fused.onnx.translation_table())
    lstm_fused.onnx.export(model, (x,), tmp_path / "ours.onnx", verbose=False)
    x = torch.randn(RUN_B, RUN_T, I)
    for name in ("tagger.onnx", "ours.onnx"):
        session = onnxruntime.InferenceSession(str(tmp_path / name),
                                               providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), eager(model, (x,))[0], atol=1e-5,
                                   rtol=0)


def test_export_rejects_bad_arguments_by_name():
    lstm = make_lstm(None, False)
    args = lstm_inputs(lstm, EXPORT_T, EXPORT_B, False)
    with pytest.raises(TypeError, match="model"):
        lstm_fused.onnx.export(lstm.forward, args)
    with pytest.raises(TypeError, match="args"):
        lstm_fused.onnx.export(lstm, [args[0]])
    with pytest.raises(ValueError, match="opset_version"):
        lstm_fused.onnx.export(lstm, args, opset_version=13)


def test_opset_below_18_is_refused_for_a_node_that_changed():
    """The mean over time is exported with Shape(start=, end=) (opset 15) and ReduceMean taking
    its axes as an input (opset 18): relabelling that graph to opset 14 would change its
    meaning, so the export refuses, naming the node."""
    model = Tagger().eval()
    with pytest.raises(ValueError, match=r"node '\w+' \((Shape|ReduceMean)\) is not the same "
                                         r"operator at opset_version=14"):
        lstm_fused.onnx.export(model, (torch.randn(EXPORT_B, EXPORT_T, I),), verbose=False,
                               opset_version=14)


def test_import_lstm_fused_does_not_import_onnx():
    code = ("import sys, lstm_fused; heavy = {'onnx', 'onnxscript', 'onnx_ir', 'onnxruntime'}; "
            "assert not heavy & set(sys.modules), heavy & set(sys.modules); "
            "assert callable(lstm_fused.onnx.export); assert 'onnxscript' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_onnx_benchmark_runs_and_checks_both_outputs():
    import onnx_vs_fused  # benchmarks/, on sys.path (conftest.py)

    rows = onnx_vs_fused.main(["--size", "4,3,3,4", "--variants", "coupled,full", "--threads",
                               "1", "--warmup", "0", "--repeats", "1"])
    assert [row["variant"] for row in rows] == ["coupled", "full"]
    for row in rows:
        assert row["fused_ms"] > 0 and row["onnxruntime_ms"] > 0 and row["max_abs_diff"] <= 1e-4


# --- GRU: one standard GRU node (linear_before_reset=1) per layer ---------------------------

# Options of lstm_fused.GRU (all of nn.GRU's; dropout is the identity in eval).
GRU_OPTIONS = {
    "plain": {},
    "no-bias": {"bias": False},
    "batch_first": {"batch_first": True},
    "bidirectional": {"bidirectional": True},
    "stacked-bidirectional-batch_first-dropout": {"num_layers": 2, "bidirectional": True,
                                                  "batch_first": True, "dropout": 0.3},
    "stacked-no-bias": {"num_layers": 3, "bias": False},
    "stacked-bidirectional-no-bias": {"num_layers": 2, "bidirectional": True, "bias": False},
}
GRU_CASES = [(options, hx) for options in GRU_OPTIONS for hx in (True, False)]


def make_gru(dtype=torch.float32, **options):
    """An eval-mode lstm_fused.GRU with weights in (-1, 1): every gate block matters at the
    tolerance (a swapped z and r moves the outputs by ~0.1)."""
    torch.manual_seed(0)
    gru = lstm_fused.GRU(I, H, dtype=dtype, **options)
    with torch.no_grad():
        for p in gru.parameters():
            p.uniform_(-1, 1)
    return gru.eval()


def gru_inputs(gru, T, B, initial_state, dtype=torch.float32):
    """(x,) or (x, h_0) for `gru` at sequence length T and batch B."""
    generator = torch.Generator().manual_seed(T * 100 + B)
    x = torch.randn(*((B, T) if gru.batch_first else (T, B)), I, generator=generator)
    if not initial_state:
        return (x.to(dtype),)
    rows = gru.num_layers * (2 if gru.bidirectional else 1)
    return (x.to(dtype), torch.randn(rows, B, H, generator=generator).to(dtype))


def gru_nodes(program):
    return [n for n in program.model_proto.graph.node if n.op_type == "GRU"]


def check_gru(options, initial_state=True, dtype=torch.float32, atol=1e-5, **export_options):
    """Export at (EXPORT_T, EXPORT_B), run in onnxruntime at (RUN_T, RUN_B), compare with the
    eager module and with torch.nn.GRU holding the same weights."""
    gru = make_gru(dtype, **options)
    program = lstm_fused.onnx.export(
        gru, gru_inputs(gru, EXPORT_T, EXPORT_B, initial_state, dtype), verbose=False,
        **export_options)
    types = op_types(program)
    assert {domain for domain, _ in types} <= {""}, types
    names = [name for _, name in types]
    assert names.count("GRU") == gru.num_layers and not {"LSTM", "Scan", "Loop"} & set(names)
    args = gru_inputs(gru, RUN_T, RUN_B, initial_state, dtype)
    got = run_onnxruntime(program, args)
    assert_matches(got, eager(gru, args), atol)
    if dtype == torch.float32:
        assert_matches(got, eager(gru.to_torch(), args), atol)
    return program, gru, args


@pytest.mark.parametrize("options, initial_state", GRU_CASES,
                         ids=[f"{o}-{'hx' if h else 'nohx'}" for o, h in GRU_CASES])
def test_gru_exports_and_runs_in_onnxruntime_at_other_sizes(options, initial_state):
    check_gru(GRU_OPTIONS[options], initial_state)


def test_gru_matches_torch_nn_gru_loaded_into_it():
    """An nn.GRU's state_dict loaded into lstm_fused.GRU exports to nn.GRU's numbers."""
    torch.manual_seed(1)
    theirs = torch.nn.GRU(I, H, num_layers=2, bidirectional=True, batch_first=True).eval()
    ours = lstm_fused.GRU(I, H, num_layers=2, bidirectional=True, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    program = lstm_fused.onnx.export(ours, gru_inputs(ours, EXPORT_T, EXPORT_B, True),
                                     verbose=False)
    args = gru_inputs(ours, RUN_T, RUN_B, True)
    assert_matches(run_onnxruntime(program, args), eager(theirs, args), atol=1e-5)


def _attribute(node, name):
    return onnx.helper.get_node_attr_value(node, name)


@pytest.mark.parametrize("options", ["stacked-bidirectional-batch_first-dropout",
                                     "stacked-no-bias"])
def test_gru_graph_is_one_gru_node_per_layer_in_onnx_gate_order(options):
    """One GRU node per layer (bidirectional: direction="bidirectional"), linear_before_reset=1,
    and W, R, B as the ONNX spec lays them out: [D, 3H, ...] with the blocks in ONNX's order
    (z, r, h) from ours (r, z, n), B = [Wb_z, Wb_r, Wb_h, Rb_z, Rb_r, Rb_h]."""
    program, gru, _ = check_gru(GRU_OPTIONS[options])
    nodes = gru_nodes(program)
    assert len(nodes) == gru.num_layers
    suffixes = ["", "_reverse"] if gru.bidirectional else [""]
    initializers = {i.name: onnx.numpy_helper.to_array(i)
                    for i in program.model_proto.graph.initializer}

    def onnx_order(w):  # ours r, z, n -> ONNX's z, r, h
        r, z, n = np.split(w.detach().numpy(), 3)
        return np.concatenate([z, r, n])

    for layer, node in enumerate(nodes):
        assert _attribute(node, "linear_before_reset") == 1
        assert _attribute(node, "hidden_size") == H
        assert _attribute(node, "direction").decode() == (
            "bidirectional" if gru.bidirectional else "forward")
        W, R = (initializers[node.input[k]] for k in (1, 2))
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if gru.bias else [])
        params = {name: [getattr(gru, f"{name}_l{layer}{s}") for s in suffixes]
                  for name in names}
        np.testing.assert_array_equal(W, np.stack([onnx_order(w) for w in params["weight_ih"]]))
        np.testing.assert_array_equal(R, np.stack([onnx_order(w) for w in params["weight_hh"]]))
        if gru.bias:
            B = initializers[node.input[3]]
            np.testing.assert_array_equal(B, np.stack([
                np.concatenate([onnx_order(b_ih), onnx_order(b_hh)])
                for b_ih, b_hh in zip(params["bias_ih"], params["bias_hh"], strict=True)]))
        else:
            assert len(node.input) < 4 or node.input[3] == ""


def test_gru_float16_and_opset_14():
    program, _, _ = check_gru({"bidirectional": True}, dtype=torch.float16, atol=3e-3)
    assert program.model_proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    program, _, _ = check_gru({"num_layers": 2, "bidirectional": True}, opset_version=14)
    assert {o.domain: o.version for o in program.model_proto.opset_import}[""] == 14


def test_gru_cell_exports_as_a_gru_node_over_one_step():
    torch.manual_seed(0)
    cell = lstm_fused.GRUCell(I, H).eval()

    def cell_args(B):
        generator = torch.Generator().manual_seed(B)
        return (torch.randn(B, I, generator=generator), torch.randn(B, H, generator=generator))

    program = lstm_fused.onnx.export(cell, cell_args(EXPORT_B), verbose=False)
    assert [_attribute(n, "linear_before_reset") for n in gru_nodes(program)] == [1]
    args = cell_args(RUN_B)
    assert_matches(run_onnxruntime(program, args), eager(cell, args), atol=1e-5)
    assert_matches(run_onnxruntime(program, args), eager(cell.to_torch(), args), atol=1e-5)


def test_gru_with_torch_onnx_export_and_the_table_is_a_node_per_direction():
    """torch.onnx.export with the translation table alone (no merging pass) gives one GRU node
    per layer and direction, which computes the same."""
    gru = make_gru(bidirectional=True)
    time, batch = torch.export.Dim("time"), torch.export.Dim("batch")
    program = torch.onnx.export(gru, gru_inputs(gru, EXPORT_T, EXPORT_B, False), dynamo=True,
                                verbose=False, dynamic_shapes=({0: time, 1: batch},),
                                custom_translation_table=lstm_fused.onnx.translation_table())
    assert sorted(_attribute(n, "direction").decode() for n in gru_nodes(program)) == [
        "forward", "reverse"]
    args = gru_inputs(gru, RUN_T, RUN_B, False)
    assert_matches(run_onnxruntime(program, args), eager(gru, args), atol=1e-5)


@pytest.mark.parametrize("module", ["GRU", "GRUCell"])
def test_gru_in_training_mode_with_weight_dropout_is_refused(module):
    gru = getattr(lstm_fused, module)(I, H, weight_dropout=0.2)
    x = torch.randn(EXPORT_T, EXPORT_B, I) if module == "GRU" else torch.randn(EXPORT_B, I)
    with pytest.raises(ValueError, match=rf"\({module}\) is in training mode with "
                                         r"weight_dropout=0.2.*model.eval\(\)"):
        lstm_fused.onnx.export(gru, (x,), verbose=False)
    gru.eval()  # DropConnect is the identity in eval: exported, and the plain GRU's numbers
    program = lstm_fused.onnx.export(gru, (x,), verbose=False)
    assert_matches(run_onnxruntime(program, (x,)), eager(gru, (x,)), atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True,
                                          "batch_first": True}])
def test_gru_with_zoneout_exports_in_eval_as_a_scan_and_matches_eager(options):
    """The GRU node cannot mix in the previous h: a zoneout GRU in eval mode (the expectation,
    p h_{t-1} + (1 - p) h~_t) exports as a Scan of the GRU step, at other sizes too."""
    gru = make_gru(zoneout=0.3, **options)
    program = lstm_fused.onnx.export(gru, gru_inputs(gru, EXPORT_T, EXPORT_B, True),
                                     verbose=False)
    names = [name for _, name in op_types(program)]
    directions = 2 if gru.bidirectional else 1
    assert names.count("Scan") == gru.num_layers * directions and "GRU" not in names
    args = gru_inputs(gru, RUN_T, RUN_B, True)
    got = run_onnxruntime(program, args)
    assert_matches(got, eager(gru, args), 1e-5)
    plain = make_gru(**options)  # the same weights without zoneout: a different function
    assert (got[0] - eager(plain, args)[0]).abs().max() > 1e-3
