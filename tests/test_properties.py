"""Property-based tests (hypothesis): random variants (and the GRU), options and shapes, the fused
ops against their plain-PyTorch twin (lstm_fused.reference) in float64, forward and gradients."""

import pytest
import torch
from conftest import VARIANTS, assert_close, make_params
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import functional, reference

# Optional: without hypothesis this module is skipped, and the rest of the suite (pytest -m cuda
# on a GPU host that lacks it) still collects.
hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis")
st = pytest.importorskip("hypothesis.strategies")
given, settings = hypothesis.given, hypothesis.settings

pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout")

# Random but bounded: a failure prints the example and a blob to reproduce it.
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, database=None, print_blob=True)


@st.composite
def lstm_cases(draw):
    """(module options, input shape mode, sizes, lengths for packed input, with_state, seed)."""
    peephole, coupled = draw(st.sampled_from(VARIANTS))
    hidden = draw(st.integers(1, 8))
    options = {"peephole": peephole, "coupled": coupled,
               "num_layers": draw(st.integers(1, 3)), "bidirectional": draw(st.booleans()),
               "proj_size": draw(st.integers(0, hidden - 1)), "bias": draw(st.booleans()),
               "batch_first": draw(st.booleans()), "dropout": draw(st.sampled_from([0.0, 0.4]))}
    mode = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1 if mode == "packed" else 0, 4))
    lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    sizes = {"input": draw(st.integers(1, 5)), "hidden": hidden, "steps": steps, "batch": batch}
    return options, mode, sizes, lengths, draw(st.booleans()), draw(st.integers(0, 2 ** 16))


def run_module(module, x, hx, mode, lengths, seed):
    """Outputs (as padded tensors) and the gradients of a fixed weighting of them."""
    x = x.detach().requires_grad_()
    inp = x
    if mode == "packed":
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=module.batch_first,
                                   enforce_sorted=False)
    torch.manual_seed(seed)  # the same dropout masks for the fused module and its twin
    out, finals = module(inp, hx)
    if mode == "packed":
        out = pad_packed_sequence(out, batch_first=module.batch_first)[0]
    outputs = [out, *((finals,) if isinstance(finals, torch.Tensor) else finals)]
    weights = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum()
               for t in outputs)
    states = (hx,) if isinstance(hx, torch.Tensor) else (hx or ())
    leaves = [x, *module.parameters(), *states]
    return outputs + list(torch.autograd.grad(loss, leaves, allow_unused=True))


def assert_module_matches_its_twin(module_class, twin_layer, case):
    """A fused module (LSTM or GRU) and the same module running the plain-PyTorch twin's layer,
    with the same weights, on one drawn case: outputs, states and every gradient in float64."""
    options, mode, sizes, lengths, with_state, seed = case
    torch.manual_seed(seed)
    fused = module_class(sizes["input"], sizes["hidden"], dtype=torch.float64, **options)
    twin = module_class(sizes["input"], sizes["hidden"], dtype=torch.float64, **options)
    twin.load_state_dict(fused.state_dict())
    twin._layer_fn = twin_layer

    g = torch.Generator().manual_seed(seed)
    T, B = sizes["steps"], sizes["batch"]
    shape = {"unbatched": (T, sizes["input"])}.get(
        mode, (B, T, sizes["input"]) if options["batch_first"] else (T, B, sizes["input"]))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    hx = None
    if with_state:  # (h_0, c_0) for the LSTM, h_0 for the GRU
        rows = fused.num_layers * (2 if fused.bidirectional else 1)
        batch = () if mode == "unbatched" else (B,)
        states = tuple(torch.randn(rows, *batch, width, generator=g, dtype=torch.float64)
                       .requires_grad_() for width in fused._state_widths)
        hx = states[0] if len(states) == 1 else states
    got = run_module(fused, x, hx, mode, lengths, seed)
    want = run_module(twin, x, hx, mode, lengths, seed)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if b is None:  # a parameter the outputs do not depend on
            assert a is None or not a.any()
        else:
            assert_close(a, b, torch.float64, f"{options} {mode} {sizes}")


@PROPERTY_SETTINGS
@given(lstm_cases())
def test_lstm_module_matches_reference(case):
    assert_module_matches_its_twin(lstm_fused.LSTM, reference.lstm_layer, case)


@st.composite
def gru_cases(draw):
    """(module options, input shape mode, sizes, lengths for packed input, with_state, seed)."""
    options = {"num_layers": draw(st.integers(1, 3)), "bidirectional": draw(st.booleans()),
               "bias": draw(st.booleans()), "batch_first": draw(st.booleans()),
               "dropout": draw(st.sampled_from([0.0, 0.4]))}
    mode = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1 if mode == "packed" else 0, 4))
    lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    sizes = {"input": draw(st.integers(1, 5)), "hidden": draw(st.integers(1, 8)), "steps": steps,
             "batch": batch}
    return options, mode, sizes, lengths, draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@PROPERTY_SETTINGS
@given(gru_cases())
def test_gru_module_matches_reference(case):
    assert_module_matches_its_twin(lstm_fused.GRU, reference.gru_layer, case)


@PROPERTY_SETTINGS
@given(st.integers(1, 8), st.integers(1, 5), st.integers(0, 5), st.booleans(), st.booleans(),
       st.integers(0, 2 ** 16))
def test_gru_cell_matches_reference(hidden, input_size, batch, bias, with_state, seed):
    """GRUCell (the fused layer op on one step) against the twin's gru_cell, with and without
    an initial state, forward and every gradient."""
    torch.manual_seed(seed)
    cell = lstm_fused.GRUCell(input_size, hidden, bias=bias, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, input_size, generator=g, dtype=torch.float64).requires_grad_()
    h = torch.randn(batch, hidden, generator=g, dtype=torch.float64).requires_grad_()
    leaves = [x, *cell.parameters()] + ([h] if with_state else [])
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)

    def run(step):
        out = step()
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        return [out, *torch.autograd.grad(loss, leaves, allow_unused=True)]

    state = h if with_state else torch.zeros(batch, hidden, dtype=torch.float64)
    got = run(lambda: cell(x, h if with_state else None))
    want = run(lambda: reference.gru_cell(x, state, *params))
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            assert_close(a, b, torch.float64, f"H={hidden} I={input_size} B={batch}")


@st.composite
def cell_cases(draw):
    peephole, coupled = draw(st.sampled_from(VARIANTS))
    hidden = draw(st.integers(1, 8))
    return {"peephole": peephole, "coupled": coupled, "bias": draw(st.booleans()),
            "proj": draw(st.integers(0, hidden - 1)), "hidden": hidden,
            "input": draw(st.integers(1, 5)), "batch": draw(st.integers(0, 5)),
            "seed": draw(st.integers(0, 2 ** 16))}


@PROPERTY_SETTINGS
@given(cell_cases())
def test_functional_cell_matches_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, I, H, R = case["batch"], case["input"], case["hidden"], case["proj"] or case["hidden"]
    params = make_params(I, H, peephole=case["peephole"], coupled=case["coupled"],
                         bias=case["bias"], proj=case["proj"], requires_grad=True, generator=g)
    x, hx, cx = (torch.randn(B, n, generator=g, dtype=torch.float64).requires_grad_()
                 for n in (I, R, H))
    leaves = [x, hx, cx, *(p for p in params if p is not None)]

    def run(cell):
        h, c = cell(x, hx, cx, *params, peephole=case["peephole"], coupled=case["coupled"])
        loss = (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum() + c.sum()
        return [h, c, *torch.autograd.grad(loss, leaves)]

    for a, b in zip(run(functional.lstm_cell), run(reference.lstm_cell)):
        assert_close(a, b, torch.float64, str(case))


@PROPERTY_SETTINGS
@given(st.sampled_from(VARIANTS), st.integers(1, 5), st.lists(st.integers(1, 6), min_size=1,
                                                               max_size=5),
       st.booleans(), st.integers(0, 2 ** 16))
def test_packed_layer_op_equals_each_sequence_run_alone(variant, hidden, lengths, reverse, seed):
    """The fused layer on a packed batch gives each sequence exactly what it gives that sequence
    alone (no leaking between rows, each row ends at its own length), in either direction."""
    peephole, coupled = variant
    lengths = sorted(lengths, reverse=True)
    g = torch.Generator().manual_seed(seed)
    params = make_params(3, hidden, peephole=peephole, coupled=coupled, generator=g)
    sequences = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in lengths]
    h0, c0 = (torch.randn(len(lengths), hidden, generator=g, dtype=torch.float64)
              for _ in range(2))
    padded = torch.nn.utils.rnn.pad_sequence(sequences)
    packed = pack_padded_sequence(padded, torch.tensor(lengths))
    out, (h_n, c_n) = functional.lstm_layer(packed.data, h0, c0, *params, peephole=peephole,
                                            coupled=coupled, reverse=reverse,
                                            batch_sizes=packed.batch_sizes)
    out = pad_packed_sequence(packed._replace(data=out))[0]
    for b, seq in enumerate(sequences):
        alone, (h_b, c_b) = functional.lstm_layer(
            seq.unsqueeze(1), h0[b:b + 1], c0[b:b + 1], *params, peephole=peephole,
            coupled=coupled, reverse=reverse)
        assert_close(out[:len(seq), b], alone[:, 0], torch.float64, "output")
        assert_close(h_n[b], h_b[0], torch.float64, "h_n")
        assert_close(c_n[b], c_b[0], torch.float64, "c_n")


@PROPERTY_SETTINGS
@given(st.integers(1, 5), st.lists(st.integers(1, 6), min_size=1, max_size=5), st.booleans(),
       st.booleans(), st.integers(0, 2 ** 16))
def test_packed_gru_layer_op_equals_each_sequence_run_alone(hidden, lengths, reverse, bias, seed):
    """The same for the fused GRU layer (functional.gru_layer)."""
    lengths = sorted(lengths, reverse=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.5

    params = (rand(3 * hidden, 3), rand(3 * hidden, hidden),
              rand(3 * hidden) if bias else None, rand(3 * hidden) if bias else None)
    sequences = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in lengths]
    h0 = torch.randn(len(lengths), hidden, generator=g, dtype=torch.float64)
    padded = torch.nn.utils.rnn.pad_sequence(sequences)
    packed = pack_padded_sequence(padded, torch.tensor(lengths))
    out, h_n = functional.gru_layer(packed.data, h0, *params, reverse=reverse,
                                    batch_sizes=packed.batch_sizes)
    out = pad_packed_sequence(packed._replace(data=out))[0]
    for b, seq in enumerate(sequences):
        alone, h_b = functional.gru_layer(seq.unsqueeze(1), h0[b:b + 1], *params, reverse=reverse)
        assert_close(out[:len(seq), b], alone[:, 0], torch.float64, "output")
        assert_close(h_n[b], h_b[0], torch.float64, "h_n")
