"""lstm_fused.GRU / GRUCell against torch.nn.GRU / nn.GRUCell and the reference twin
(lstm_fused.reference.gru_layer / gru_cell): parity after load_state_dict over an option grid
(forward and every gradient, float64), gradcheck of the fused layer and the cell, fused vs twin
in float32, and nn.GRU's behaviour promises written as our own tests (errors, state_dict round
trips, inter-layer dropout, eval determinism, no_grad, DropConnect)."""

import itertools
import re
import warnings

import pytest
import torch
from conftest import assert_close, grid
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import functional, reference

T, B, I, H = 5, 4, 3, 6
LENGTHS = [5, 4, 4, 2]  # sorted; the unsorted cases permute them

HAS_FUSED_GRU = hasattr(torch.ops.lstm_fused, "gru_layer_forward")
needs_fused = pytest.mark.skipif(not HAS_FUSED_GRU,
                                 reason="torch.ops.lstm_fused.gru_layer_forward is not built yet")

PARITY_TOL = 1e-12  # float64, absolute: the brief's bar for nn.GRU parity


def assert_abs(actual, expected, what, tol=PARITY_TOL):
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")


def as_reference(module):
    """The module with the plain-PyTorch twin as its per-layer function (GRU and GRUCell)."""
    module._layer_fn = reference.gru_layer
    return module


def make_input(mode, batch_first, dtype, generator):
    """(module input, the leaf its gradient is taken of, output -> padded tensor)."""
    x = torch.randn(T, B, I, generator=generator, dtype=torch.float64).to(dtype)
    if mode == "unbatched":
        x = x[:, 0].clone().requires_grad_()
        return x, x, lambda out: out
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    if mode == "padded":
        return x.requires_grad_(), x, lambda out: out
    sorted_ = mode == "packed-sorted"
    lengths = torch.tensor(LENGTHS if sorted_ else [LENGTHS[1], LENGTHS[0], LENGTHS[3],
                                                     LENGTHS[2]])
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sorted_)
    data = packed.data.requires_grad_()  # the leaf: each module's graph starts at it
    packed = PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                            packed.unsorted_indices)
    return packed, data, lambda out: pad_packed_sequence(out, batch_first=batch_first)[0]


def loss_of(outputs, generator):
    """A fixed random projection of every output, so every gradient path counts."""
    return sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype))
               .sum() for o in outputs)


def outputs_and_grads(module, x, leaf, h0, to_padded):
    out, h_n = module(x, h0)
    outputs = [to_padded(out), h_n]
    wrt = [leaf] + ([h0] if h0 is not None else []) + list(module.parameters())
    grads = torch.autograd.grad(loss_of(outputs, torch.Generator().manual_seed(9)), wrt)
    return outputs, grads


MODES = ["padded", "packed-sorted", "packed-unsorted", "unbatched"]


@grid(implementation=["fused", "reference"], num_layers=[1, 2], bidirectional=[False, True],
      batch_first=[False, True], mode=MODES, h0=[False, True], bias=[True, False],
      where=lambda mode, batch_first, **_: not (mode == "unbatched" and batch_first))
def test_gru_matches_torch_gru(implementation, num_layers, bidirectional, batch_first, mode, h0,
                               bias):
    """Outputs, h_n and the gradients of input, h_0 and every parameter equal nn.GRU's to 1e-12
    in float64, after load_state_dict (the fused op; the twin through the same module loop)."""
    if implementation == "fused" and not HAS_FUSED_GRU:
        pytest.skip("torch.ops.lstm_fused.gru_layer_forward is not built yet")
    g = torch.Generator().manual_seed(num_layers * 10 + bidirectional)
    kwargs = {"num_layers": num_layers, "bidirectional": bidirectional,
              "batch_first": batch_first, "bias": bias, "dtype": torch.float64}
    theirs = nn.GRU(I, H, **kwargs)
    ours = lstm_fused.GRU(I, H, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    if implementation == "reference":
        as_reference(ours)
    x, leaf, to_padded = make_input(mode, batch_first, torch.float64, g)
    D = 2 if bidirectional else 1
    state_batch = () if mode == "unbatched" else (B,)
    hx = (torch.randn(num_layers * D, *state_batch, H, generator=g, dtype=torch.float64)
          .requires_grad_() if h0 else None)
    (out_a, h_a), grads_a = outputs_and_grads(ours, x, leaf, hx, to_padded)
    (out_b, h_b), grads_b = outputs_and_grads(theirs, x, leaf, hx, to_padded)
    assert_abs(out_a, out_b, "output")
    assert_abs(h_a, h_b, "h_n")
    names = ["input"] + (["h_0"] if h0 else []) + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_a, grads_b, strict=True):
        assert_abs(a, b, f"gradient of {name}")


@grid(implementation=["fused", "reference"], batched=[True, False], h0=[True, False],
      bias=[True, False])
def test_gru_cell_matches_torch_gru_cell(implementation, batched, h0, bias):
    if implementation == "fused" and not HAS_FUSED_GRU:
        pytest.skip("torch.ops.lstm_fused.gru_layer_forward is not built yet")
    g = torch.Generator().manual_seed(3)
    theirs = nn.GRUCell(I, H, bias=bias, dtype=torch.float64)
    ours = lstm_fused.GRUCell(I, H, bias=bias, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    if implementation == "reference":
        as_reference(ours)
    batch = (B,) if batched else ()
    x = torch.randn(*batch, I, generator=g, dtype=torch.float64).requires_grad_()
    hx = torch.randn(*batch, H, generator=g, dtype=torch.float64).requires_grad_() if h0 else None
    results = []
    for cell in (ours, theirs):
        h1 = cell(x, hx)
        wrt = [x] + ([hx] if h0 else []) + list(cell.parameters())
        results.append((h1, torch.autograd.grad(
            loss_of([h1], torch.Generator().manual_seed(1)), wrt)))
    (h_a, grads_a), (h_b, grads_b) = results
    assert h_a.shape == h_b.shape == (*batch, H)
    assert_abs(h_a, h_b, "h_1")
    for a, b in zip(grads_a, grads_b, strict=True):
        assert_abs(a, b, "gradient")


def test_the_reference_twin_is_the_equations():
    """One step of reference.gru_cell written out here from nn.GRU's documented equations with
    its weight blocks (r, z, n): r multiplies W_hn h + b_hn, not h."""
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(2, I, generator=g, dtype=torch.float64), torch.randn(2, H, generator=g,
                                                                           dtype=torch.float64)
    w_ih, w_hh = (torch.randn(3 * H, n, generator=g, dtype=torch.float64) for n in (I, H))
    b_ih, b_hh = (torch.randn(3 * H, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
    r = torch.sigmoid(a[:, :H] + b[:, :H])
    z = torch.sigmoid(a[:, H:2 * H] + b[:, H:2 * H])
    n = torch.tanh(a[:, 2 * H:] + r * b[:, 2 * H:])
    assert_abs(reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), (1 - z) * n + z * h, "h_1")


# --- gradcheck (float64, small sizes) ---------------------------------------------------------


def small_layer_args(packed, bias=True):
    g = torch.Generator().manual_seed(5)
    Ts, Bs, Is, Hs = 3, 3, 2, 3
    batch_sizes = [3, 2, 1] if packed else None

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7).requires_grad_()

    x = rand(sum(batch_sizes), Is) if packed else rand(Ts, Bs, Is)
    weights = [rand(3 * Hs, Is), rand(3 * Hs, Hs)] + ([rand(3 * Hs), rand(3 * Hs)] if bias
                                                      else [None, None])
    return x, rand(Bs, Hs), weights, batch_sizes


@needs_fused
@grid(packed=[False, True], reverse=[False, True], bias=[True, False])
def test_gradcheck_fused_gru_layer(packed, reverse, bias):
    x, h0, weights, batch_sizes = small_layer_args(packed, bias)
    present = [w for w in weights if w is not None]

    def layer(x, h0, *present):
        it = iter(present)
        full = [next(it) if w is not None else None for w in weights]
        return functional.gru_layer(x, h0, *full, reverse=reverse, batch_sizes=batch_sizes)

    assert torch.autograd.gradcheck(layer, (x, h0, *present))
    assert torch.autograd.gradgradcheck(layer, (x, h0, *present))


@needs_fused
@pytest.mark.parametrize("batched", [True, False])
def test_gradcheck_gru_cell(batched):
    cell = lstm_fused.GRUCell(2, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    batch = (3,) if batched else ()
    x = torch.randn(*batch, 2, generator=g, dtype=torch.float64).requires_grad_()
    h = torch.randn(*batch, 3, generator=g, dtype=torch.float64).requires_grad_()
    params = tuple(cell.parameters())

    def step(x, h, *weights):
        return torch.func.functional_call(cell, dict(zip(
            [n for n, _ in cell.named_parameters()], weights)), (x, h))

    assert torch.autograd.gradcheck(step, (x, h, *params))


# --- fused vs the twin in float32 -------------------------------------------------------------


@needs_fused
@grid(packed=[False, True], reverse=[False, True])
def test_fused_layer_matches_reference_float32(packed, reverse):
    """float32 at the suite's reference tolerance (1e-5): a wrong sign or a missing term (r on h
    instead of on W_hn h + b_hn, z and 1 - z swapped, a bias dropped) moves values by ~1e-1."""
    g = torch.Generator().manual_seed(11)
    Ts, Bs, Is, Hs = 6, 4, 5, 7
    batch_sizes = [4, 4, 3, 3, 2, 1] if packed else None
    x = torch.randn(sum(batch_sizes) if packed else Ts, *(() if packed else (Bs,)), Is,
                    generator=g)
    h0 = torch.randn(Bs, Hs, generator=g)
    weights = [torch.randn(3 * Hs, Is, generator=g) * 0.5, torch.randn(3 * Hs, Hs, generator=g)
               * 0.5, torch.randn(3 * Hs, generator=g), torch.randn(3 * Hs, generator=g)]
    leaves = [t.requires_grad_() for t in (x, h0, *weights)]
    results = []
    for layer in (functional.gru_layer, reference.gru_layer):
        out, h_n = layer(*leaves, reverse=reverse, batch_sizes=batch_sizes)
        grads = torch.autograd.grad(loss_of([out, h_n], torch.Generator().manual_seed(4)),
                                    leaves)
        results.append([out, h_n, *grads])
    names = ["output", "h_n", "d input", "d h0", "d weight_ih", "d weight_hh", "d bias_ih",
             "d bias_hh"]
    for name, a, b in zip(names, *results, strict=True):
        assert_close(a, b, torch.float32, name)


@needs_fused
@grid(num_layers=[1, 2], bidirectional=[False, True], mode=["padded", "packed-unsorted"])
def test_fused_module_matches_reference_module_float32(num_layers, bidirectional, mode):
    g = torch.Generator().manual_seed(8)
    kwargs = {"num_layers": num_layers, "bidirectional": bidirectional}
    ours = lstm_fused.GRU(I, H, **kwargs)
    ref = as_reference(lstm_fused.GRU(I, H, **kwargs))
    ref.load_state_dict(ours.state_dict())
    x, leaf, to_padded = make_input(mode, False, torch.float32, g)
    (out_a, h_a), grads_a = outputs_and_grads(ours, x, leaf, None, to_padded)
    (out_b, h_b), grads_b = outputs_and_grads(ref, x, leaf, None, to_padded)
    assert_close(out_a, out_b, torch.float32, "output")
    assert_close(h_a, h_b, torch.float32, "h_n")
    for a, b in zip(grads_a, grads_b, strict=True):
        assert_close(a, b, torch.float32, "gradient")


# --- nn.GRU's promises: structure ------------------------------------------------------------


@grid(num_layers=[1, 3], bidirectional=[False, True], bias=[True, False])
def test_parameters_attributes_and_init_are_nn_grus(num_layers, bidirectional, bias):
    """Same parameter names, shapes and order, the same draws from the same seed (uniform
    ±1/sqrt(H) in registration order), and nn.GRU's attributes."""
    kwargs = {"num_layers": num_layers, "bidirectional": bidirectional, "bias": bias}
    torch.manual_seed(4)
    theirs = nn.GRU(I, H, **kwargs)
    torch.manual_seed(4)
    ours = lstm_fused.GRU(I, H, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in theirs.named_parameters()]
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert ours.mode == theirs.mode == "GRU"
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights
    assert all(a is getattr(ours, n) for a, n in zip(ours._flat_weights, ours._flat_weights_names))
    assert [[tuple(w.shape) for w in ws] for ws in ours.all_weights] == [
        [tuple(w.shape) for w in ws] for ws in theirs.all_weights]
    for attribute in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                      "dropout", "bidirectional", "proj_size"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.flatten_parameters() is None
    bound = 1 / H ** 0.5
    assert all(p.abs().max() <= bound for p in ours.parameters())


@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "dropout": 0.5},
                                    {"bias": False, "batch_first": True, "bidirectional": True}])
def test_repr_is_nn_grus(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert repr(lstm_fused.GRU(I, H, **kwargs)) == repr(nn.GRU(I, H, **kwargs))
    assert repr(lstm_fused.GRUCell(I, H, bias=False)) == repr(nn.GRUCell(I, H, bias=False))
    assert repr(lstm_fused.GRUCell(I, H)) == repr(nn.GRUCell(I, H))
    assert "weight_dropout=0.25" in repr(lstm_fused.GRU(I, H, weight_dropout=0.25))


def test_gru_cell_parameters_are_nn_gru_cells():
    for bias in (True, False):
        torch.manual_seed(1)
        theirs = nn.GRUCell(I, H, bias=bias)
        torch.manual_seed(1)
        ours = lstm_fused.GRUCell(I, H, bias=bias)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [
            (n, p.shape) for n, p in theirs.named_parameters()]
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
        assert (ours.bias_ih is None) == (theirs.bias_ih is None) == (not bias)


def test_gru_takes_none_of_the_lstm_options():
    """The LSTM's options without a GRU counterpart (or, layer_norm, not built for the GRU yet);
    zoneout and weight_dropout are the GRU's too."""
    for option in ("peephole", "coupled", "proj_size", "layer_norm", "cell_clip",
                   "forget_bias"):
        with pytest.raises(TypeError, match=option):
            lstm_fused.GRU(I, H, **{option: 1})
        with pytest.raises(TypeError, match=option):
            lstm_fused.GRUCell(I, H, **{option: 1})


# --- nn.GRU's promises: errors ---------------------------------------------------------------


def raises_as_torch(ours, theirs, error, match):
    """ours() and theirs() (the same call on torch.nn) both raise exactly `error`, with a
    message matching `match`."""
    for call in (theirs, ours):
        with pytest.raises(error, match=match) as raised:
            call()
        assert type(raised.value) is error, raised.value


def seq(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


GRU_FORWARD_ERRORS = [  # (what, call(module), error, regex of nn.GRU's message); GRU(I, H)
    ("input 1-D", lambda m: m(seq(I)), ValueError, r"GRU: Expected input to be 2D or 3D, got 1D"),
    ("input 4-D", lambda m: m(seq(1, T, B, I)), ValueError,
     r"GRU: Expected input to be 2D or 3D, got 4D instead"),
    ("input size", lambda m: m(seq(T, B, I + 2)), RuntimeError,
     re.escape("input.size(-1) must be equal to input_size. Expected 3, got 5")),
    ("float64 input", lambda m: m(seq(T, B, I, dtype=torch.float64)), ValueError,
     re.escape("RNN input dtype (torch.float64) does not match weight dtype (torch.float32). "
               "Convert input: input.to(torch.float32), or convert model: "
               "model.to(torch.float64)")),
    ("integer input", lambda m: m(seq(T, B, I).long()), ValueError,
     re.escape("RNN input dtype (torch.int64) does not match weight dtype (torch.float32)")),
    ("input on another device", lambda m: m(seq(T, B, I).to("meta")), RuntimeError,
     ("Input and parameter tensors are not at the same device, found input tensor at meta and "
      "parameter tensor at cpu")),
    ("empty sequence", lambda m: m(seq(0, B, I)), RuntimeError,
     "Expected sequence length to be larger than 0 in RNN"),
    ("h_0 2-D for batched input", lambda m: m(seq(T, B, I), torch.zeros(B, H)), RuntimeError,
     "For batched 3-D input, hx should also be 3-D but got 2-D tensor"),
    ("h_0 3-D for unbatched input", lambda m: m(seq(T, I), torch.zeros(1, B, H)), RuntimeError,
     "For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
    ("h_0 batch", lambda m: m(seq(T, B, I), torch.zeros(1, B + 1, H)), RuntimeError,
     re.escape("Expected hidden size (1, 4, 6), got [1, 5, 6]")),
    ("h_0 width", lambda m: m(seq(T, B, I), torch.zeros(1, B, H + 1)), RuntimeError,
     re.escape("Expected hidden size (1, 4, 6), got [1, 4, 7]")),
    ("h_0 rows", lambda m: m(seq(T, B, I), torch.zeros(2, B, H)), RuntimeError,
     re.escape("Expected hidden size (1, 4, 6), got [2, 4, 6]")),
    ("unbatched h_0 rows", lambda m: m(seq(T, I), torch.zeros(2, H)), RuntimeError,
     re.escape("Expected hidden size (1, 1, 6), got [2, 1, 6]")),
    ("h_0 on another device", lambda m: m(seq(T, B, I), torch.zeros(1, B, H, device="meta")),
     RuntimeError, ("Input and hidden tensors are not at the same device, found input tensor "
                    "at cpu and hidden tensor at meta")),
    # nn.GRU meets this one in its GEMM ("mat1 and mat2 must have the same dtype"); we say it
    # first, in our words, with its exception type
    ("h_0 float64", lambda m: m(seq(T, B, I), torch.zeros(1, B, H, dtype=torch.float64)),
     RuntimeError, "dtype"),
    ("packed data 3-D",
     lambda m: m(PackedSequence(seq(T, B, I), torch.tensor([2, 2]), None, None)), RuntimeError,
     "input must have 2 dimensions, got 3"),
    ("packed h_0 batch",
     lambda m: m(PackedSequence(seq(6, I), torch.tensor([3, 2, 1]), None, None),
                 torch.zeros(1, 2, H)), RuntimeError,
     re.escape("Expected hidden size (1, 3, 6), got [1, 2, 6]")),
    ("packed h_0 2-D",
     lambda m: m(PackedSequence(seq(6, I), torch.tensor([3, 2, 1]), None, None),
                 torch.zeros(3, H)), RuntimeError,
     re.escape("Expected hidden size (1, 3, 6), got [3, 6]")),
]


@pytest.mark.parametrize("case", GRU_FORWARD_ERRORS, ids=lambda c: c[0])
def test_gru_forward_errors_are_nn_grus(case):
    _, call, error, match = case
    raises_as_torch(lambda: call(lstm_fused.GRU(I, H)), lambda: call(nn.GRU(I, H)), error, match)


def test_gru_batch_first_and_bidirectional_hidden_sizes_are_nn_grus():
    for kwargs, hx in (({"batch_first": True}, torch.zeros(1, T, H)),
                       ({"bidirectional": True}, torch.zeros(1, B, H)),
                       ({"num_layers": 2}, torch.zeros(1, B, H))):
        x = seq(B, T, I) if kwargs.get("batch_first") else seq(T, B, I)
        raises_as_torch(lambda: lstm_fused.GRU(I, H, **kwargs)(x, hx),  # noqa: B023
                        lambda: nn.GRU(I, H, **kwargs)(x, hx),  # noqa: B023
                        RuntimeError, r"Expected hidden size \(\d, \d, 6\), got \[1, \d, 6\]")


GRU_CONSTRUCTION_ERRORS = [  # (args, kwargs, error, regex), nn.GRU's
    ((I, 0), {}, ValueError, "hidden_size must be greater than zero"),
    ((0, H), {}, ValueError, "input_size must be greater than zero"),
    ((I, H, 0), {}, ValueError, "num_layers must be greater than zero"),
    ((3.0, H), {}, TypeError, "input_size should be of type int, got: float"),
    ((I, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
    ((I, H), {"bias": 1}, TypeError, "bias should be of type bool, got: int"),
    ((I, H), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
    ((I, H, 2), {"dropout": 1.5}, ValueError, r"dropout should be a number in range \[0, 1\]"),
    ((I, H, 2), {"dropout": True}, ValueError, r"dropout should be a number in range \[0, 1\]"),
]


@pytest.mark.parametrize("case", GRU_CONSTRUCTION_ERRORS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_gru_construction_errors_are_nn_grus(case):
    args, kwargs, error, match = case
    raises_as_torch(lambda: lstm_fused.GRU(*args, **kwargs), lambda: nn.GRU(*args, **kwargs),
                    error, match)


GRU_CELL_ERRORS = [  # (what, input shape, hx shape or None, error, regex); GRUCell(I, H)
    ("input 3-D", (2, B, I), None, ValueError,
     "GRUCell: Expected input to be 1D or 2D, got 3D instead"),
    ("hx 3-D", (B, I), (B, 1, H), ValueError,
     "GRUCell: Expected hidden to be 1D or 2D, got 3D instead"),
    ("input size", (B, I + 1), None, RuntimeError,
     "input has inconsistent input_size: got 4 expected 3"),
    ("hx batch", (B, I), (B + 1, H), RuntimeError,
     "Input batch size 4 doesn't match hidden0 batch size 5"),
    ("hx width", (B, I), (B, H + 1), RuntimeError,
     "hidden0 has inconsistent hidden_size: got 7, expected 6"),
    ("hx batch broadcast", (B, I), (1, H), RuntimeError,
     "Input batch size 4 doesn't match hidden0 batch size 1"),
    ("hx width broadcast", (B, I), (B, 1), RuntimeError,
     "hidden0 has inconsistent hidden_size: got 1, expected 6"),
    ("input width broadcast", (B, 1), (B, H), RuntimeError,
     "input has inconsistent input_size: got 1 expected 3"),
]


@pytest.mark.parametrize("case", GRU_CELL_ERRORS, ids=lambda c: c[0])
def test_gru_cell_errors_are_nn_gru_cells(case):
    _, input_shape, hx_shape, error, match = case
    x = seq(*input_shape)
    hx = torch.zeros(hx_shape) if hx_shape else None
    raises_as_torch(lambda: lstm_fused.GRUCell(I, H)(x, hx), lambda: nn.GRUCell(I, H)(x, hx),
                    error, match)


@pytest.mark.parametrize("case", [
    ("float64 input", lambda: (seq(B, I, dtype=torch.float64), None)),
    ("float64 hx", lambda: (seq(B, I), torch.zeros(B, H, dtype=torch.float64))),
    ("integer input", lambda: (seq(B, I).int(), None)),
    ("hx rank not the input's", lambda: (seq(I), torch.zeros(2, H))),
], ids=lambda c: c[0])
def test_gru_cell_dtype_and_rank_errors_have_nn_gru_cells_type(case):
    """nn.GRUCell meets these in its kernels, with messages about its GEMM; ours say what is
    wrong, with the same exception type."""
    x, hx = case[1]()
    for cell in (lstm_fused.GRUCell(I, H), nn.GRUCell(I, H)):
        with pytest.raises(RuntimeError) as raised:
            cell(x, hx)
        assert type(raised.value) is RuntimeError


def test_fused_layer_and_twin_reject_the_same_inputs():
    """functional.gru_layer and reference.gru_layer raise the same exception type for the same
    bad argument."""
    x, h0 = seq(T, B, I), torch.zeros(B, H)
    w_ih, w_hh, b = torch.zeros(3 * H, I), torch.zeros(3 * H, H), torch.zeros(3 * H)
    cases = [((x[0], h0, w_ih, w_hh, b, b), {}),                             # 2-D padded input
             ((x, torch.zeros(B + 1, H), w_ih, w_hh, b, b), {}),               # hx batch
             ((x, h0, torch.zeros(4 * H, I), w_hh, b, b), {}),                 # LSTM's weight_ih
             ((x, h0, w_ih, torch.zeros(3 * H, H + 1), b, b), {}),             # weight_hh
             ((x, h0, w_ih, w_hh, torch.zeros(2 * H), b), {}),                 # bias_ih
             ((x, h0.double(), w_ih, w_hh, b, b), {}),                         # hx dtype
             ((seq(7, I), h0, w_ih, w_hh, b, b), {"batch_sizes": [2, 4, 1]}),  # increasing
             ((seq(9, I), h0, w_ih, w_hh, b, b), {"batch_sizes": [4, 4]})]     # input rows
    for args, kwargs in cases:
        errors = []
        for layer in (functional.gru_layer, reference.gru_layer):
            with pytest.raises((ValueError, TypeError, RuntimeError)) as raised:
                layer(*args, **kwargs)
            errors.append(type(raised.value))
        assert errors[0] is errors[1], (args[0].shape, kwargs, errors)


# --- nn.GRU's promises: state_dict, dropout, modes --------------------------------------------


def test_state_dict_round_trips_both_ways():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = nn.GRU(I, H, num_layers=2, bias=False, batch_first=True, dropout=0.3,
                        bidirectional=True, dtype=torch.float64).eval()
    ours = lstm_fused.GRU.from_torch(theirs)
    assert not ours.training and ours.weight_ih_l1_reverse.dtype == torch.float64
    back = ours.to_torch()
    assert type(back) is nn.GRU and repr(back) == repr(theirs) and not back.training
    for sd in (ours.state_dict(), back.state_dict()):
        assert sd.keys() == theirs.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in theirs.state_dict().items())
    # a fresh module of either library loads the other's state_dict (strict)
    fresh = lstm_fused.GRU(I, H, num_layers=2, bias=False, batch_first=True, dropout=0.3,
                           bidirectional=True, dtype=torch.float64)
    fresh.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(fresh.state_dict())
    cell = nn.GRUCell(I, H).train()
    ours_cell = lstm_fused.GRUCell.from_torch(cell)
    assert ours_cell.training
    assert all(torch.equal(a, b) for a, b in zip(ours_cell.to_torch().parameters(),
                                                 cell.parameters()))
    with pytest.raises(TypeError, match="GRU.from_torch: expected a torch.nn.GRU, got LSTM"):
        lstm_fused.GRU.from_torch(nn.LSTM(I, H))
    with pytest.raises(ValueError, match="weight_dropout"):
        lstm_fused.GRU(I, H, weight_dropout=0.1).to_torch()


def as_module(module, implementation):
    return as_reference(module) if implementation == "reference" else module


IMPLEMENTATIONS = ["reference", pytest.param("fused", marks=needs_fused)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dropout_only_between_layers_in_training(implementation):
    """dropout=1 zeroes every layer's output but the last's: layer 2 then sees zeros, so its
    output is the GRU of a zero input; in eval (or with one layer) dropout changes nothing."""
    torch.manual_seed(0)
    gru = as_module(lstm_fused.GRU(I, H, num_layers=2, dropout=1.0, dtype=torch.float64),
                    implementation)
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, h_n = gru.train()(x)
    second = as_module(lstm_fused.GRU(H, H, dtype=torch.float64), implementation)
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in gru.state_dict().items()
                            if "_l1" in k})
    assert not torch.equal(h_n[0], torch.zeros_like(h_n[0]))  # layer 1 ran on x, undropped
    expected, _ = second(torch.zeros(T, B, H, dtype=torch.float64))
    assert_abs(out, expected, "layer 2 of zeros")
    eval_out, _ = gru.eval()(x)
    no_dropout = as_module(lstm_fused.GRU(I, H, num_layers=2, dtype=torch.float64),
                           implementation)
    no_dropout.load_state_dict(gru.state_dict())
    assert torch.equal(eval_out, no_dropout(x)[0])
    with pytest.warns(UserWarning, match="dropout option adds dropout after all but last"):
        lstm_fused.GRU(I, H, dropout=0.5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_training_with_dropout_draws_per_call_and_eval_is_deterministic(implementation):
    gru = as_module(lstm_fused.GRU(I, H, num_layers=2, dropout=0.5), implementation)
    x = torch.randn(T, B, I)
    assert not torch.equal(gru.train()(x)[0], gru(x)[0])
    gru.eval()
    assert torch.equal(gru(x)[0], gru(x)[0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["padded", "packed-unsorted"])
def test_no_grad_path_equals_grad_path(implementation, mode):
    gru = as_module(lstm_fused.GRU(I, H, num_layers=2, bidirectional=True), implementation)
    cell = as_module(lstm_fused.GRUCell(I, H), implementation)
    x, _, to_padded = make_input(mode, False, torch.float32, torch.Generator().manual_seed(0))
    out, h_n = gru(x)
    with torch.no_grad():
        out_ng, h_n_ng = gru(x)
    # the same arithmetic by another kernel path (need_backward=False): see the next test
    assert_close(to_padded(out), to_padded(out_ng), torch.float32, "output", kind="kernels")
    assert_close(h_n, h_n_ng, torch.float32, "h_n", kind="kernels")
    with torch.inference_mode():
        out_im, _ = gru(x)
    assert torch.equal(to_padded(out_im), to_padded(out_ng))
    xc = torch.randn(B, I, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(cell(xc), cell(xc.detach()))
    assert torch.equal(cell(xc), cell(xc.detach()))


@needs_fused
@pytest.mark.parametrize("gemm", ["aten", "simd"])
def test_no_grad_forward_is_bit_exact_on_every_gemm_path(gemm):
    """Like the LSTM's layer op, the GRU's forward without backward computes exactly what the
    forward with backward does, on each CPU GEMM path."""
    g = torch.Generator().manual_seed(0)
    x, h0 = torch.randn(T, B, 2 * H, generator=g), torch.randn(B, H, generator=g)
    weights = [torch.randn(3 * H, 2 * H, generator=g), torch.randn(3 * H, H, generator=g),
               torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g)]
    previous = lstm_fused.cpu_gemm.get_mode()
    lstm_fused.cpu_gemm.set_mode(gemm)
    try:
        with torch.no_grad():
            out_ng, h_ng = functional.gru_layer(x, h0, *weights)
        out, h_n = functional.gru_layer(x.requires_grad_(), h0, *weights)
    finally:
        lstm_fused.cpu_gemm.set_mode(previous)
    assert torch.equal(out, out_ng) and torch.equal(h_n, h_ng)


# --- DropConnect (weight_dropout) -------------------------------------------------------------


class RecordingLayer:
    """A _layer_fn that records the weight_hh of each call and runs `layer_fn`."""

    def __init__(self, layer_fn):
        self.layer_fn, self.weights = layer_fn, []

    def __call__(self, input, hx, weight_ih, weight_hh, *rest, **kwargs):
        self.weights.append(weight_hh)
        return self.layer_fn(input, hx, weight_ih, weight_hh, *rest, **kwargs)


@pytest.mark.parametrize("module_class", [lstm_fused.GRU, lstm_fused.GRUCell])
def test_weight_dropout_is_identity_in_eval(module_class):
    kwargs = {"num_layers": 2, "bidirectional": True} if module_class is lstm_fused.GRU else {}
    plain = as_reference(module_class(I, H, **kwargs))
    dropped = as_reference(module_class(I, H, weight_dropout=0.6, **kwargs))
    dropped.load_state_dict(plain.state_dict())
    recorder = RecordingLayer(reference.gru_layer)
    dropped._layer_fn = recorder
    x = torch.randn(T, B, I) if module_class is lstm_fused.GRU else torch.randn(B, I)
    out_a, out_b = plain.eval()(x), dropped.eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    names = [n for n, _ in dropped.named_parameters() if n.startswith("weight_hh")]
    assert all(w is getattr(dropped, n) for w, n in zip(recorder.weights, names, strict=True))


def test_weight_dropout_in_training_masks_weight_hh_per_call_and_direction():
    """Each layer and direction gets F.dropout(weight_hh, p): entries 0 or w / (1 - p), one mask
    for the whole call, a new one per call; the parameter itself is unchanged and its gradient
    is masked the same way."""
    p = 0.5
    gru = lstm_fused.GRU(I, H, num_layers=2, bidirectional=True, weight_dropout=p).train()
    recorder = RecordingLayer(reference.gru_layer)
    gru._layer_fn = recorder
    names = [n for n, _ in gru.named_parameters() if n.startswith("weight_hh")]
    before = {n: getattr(gru, n).detach().clone() for n in names}
    out, _ = gru(torch.randn(T, B, I))
    first = recorder.weights[:len(names)]
    for used, name in zip(first, names, strict=True):
        w = getattr(gru, name)
        kept = used != 0
        assert 0 < kept.float().mean() < 1, name
        torch.testing.assert_close(used[kept], w[kept] / (1 - p))
        assert torch.equal(w.detach(), before[name])
    masks = [w != 0 for w in first]
    assert any(not torch.equal(a, b) for a, b in itertools.pairwise(masks))  # one per direction
    out.sum().backward()
    for mask, name in zip(masks, names, strict=True):
        assert torch.all(getattr(gru, name).grad[~mask] == 0), name
    gru(torch.randn(T, B, I))
    assert not torch.equal(recorder.weights[len(names)] != 0, masks[0])  # a new one per call


def test_gru_cell_weight_dropout_in_training():
    cell = lstm_fused.GRUCell(I, H, weight_dropout=0.5).train()
    recorder = RecordingLayer(reference.gru_layer)
    cell._layer_fn = recorder
    cell(torch.randn(B, I))
    used = recorder.weights[0]
    assert used is not cell.weight_hh
    kept = used != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(used[kept], cell.weight_hh[kept] * 2)


@needs_fused
def test_gru_cell_runs_the_fused_layer_on_one_step(monkeypatch):
    """GRUCell has one kernel path: the fused GRU layer op on a sequence of one step."""
    calls = []
    fused = functional.fused_gru_layer

    def spy(input, *args, **kwargs):
        calls.append(tuple(input.shape))
        return fused(input, *args, **kwargs)

    cell = lstm_fused.GRUCell(I, H)
    monkeypatch.setattr(cell, "_layer_fn", spy)
    cell(torch.randn(B, I))
    cell(torch.randn(I))
    assert calls == [(1, B, I), (1, 1, I)]


# --- zoneout of h (h_t = m h_{t-1} + (1 - m) h~_t) ---------------------------------------------


def zoneout_layer_inputs(packed, generator, dtype=torch.float64):
    """(input, h0, weights, batch_sizes, a 0/1 keep mask [T, B, H]) of one GRU layer."""
    sizes = [B, B, B - 1, 2, 1] if packed else None
    x = torch.randn(sum(sizes) if packed else T, *(() if packed else (B,)), I,
                    generator=generator, dtype=dtype)
    h0 = torch.randn(B, H, generator=generator, dtype=dtype)
    weights = [torch.randn(3 * H, I, generator=generator, dtype=dtype) * 0.5,
               torch.randn(3 * H, H, generator=generator, dtype=dtype) * 0.5,
               torch.randn(3 * H, generator=generator, dtype=dtype) * 0.5,
               torch.randn(3 * H, generator=generator, dtype=dtype) * 0.5]
    mask = torch.bernoulli(torch.full((T, B, H), 0.4, dtype=dtype), generator=generator)
    return x, h0, weights, sizes, mask


@needs_fused
@grid(packed=[False, True], reverse=[False, True], keep=["mask", "rate"])
def test_zoneout_layer_fused_equals_reference_and_gradcheck(packed, reverse, keep):
    """With an injected mask (training) or a rate (eval), the fused layer is the twin's
    equation, forward and backward (float64 gradcheck of the fused op)."""
    g = torch.Generator().manual_seed(21)
    x, h0, weights, sizes, mask = zoneout_layer_inputs(packed, g)
    zoneout = mask if keep == "mask" else 0.3
    tensors = [t.requires_grad_() for t in (x, h0, *weights)]

    def fused(*t):
        return functional.gru_layer(*t, reverse=reverse, batch_sizes=sizes, zoneout=zoneout)

    def twin(*t):
        return reference.gru_layer(*t, reverse=reverse, batch_sizes=sizes, zoneout=zoneout)

    got, expected = fused(*tensors), twin(*tensors)
    for a, b, what in zip(got, expected, ("output", "h_n")):
        assert_close(a, b, torch.float64, what)
    loss_weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in got]
    grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, loss_weights)), tensors)
    expected_grads = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip(expected, loss_weights)), tensors)
    for a, b, what in zip(grads, expected_grads, ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
        assert_close(a, b, torch.float64, f"d {what}")
    assert torch.autograd.gradcheck(fused, tuple(tensors))


@needs_fused
def test_zoneout_mask_of_ones_keeps_h0_and_of_zeros_is_the_plain_layer():
    g = torch.Generator().manual_seed(22)
    x, h0, weights, _, mask = zoneout_layer_inputs(False, g)
    out, h_n = functional.gru_layer(x, h0, *weights, zoneout=torch.ones_like(mask))
    assert torch.equal(h_n, h0) and torch.equal(out, h0.expand_as(out))
    plain = functional.gru_layer(x, h0, *weights)
    zeros = functional.gru_layer(x, h0, *weights, zoneout=torch.zeros_like(mask))
    for a, b in zip(zeros, plain):
        assert torch.equal(a, b)


@needs_fused
def test_zoneout_masks_statistics_one_per_layer_and_direction():
    p = 0.3
    gru = lstm_fused.GRU(I, 64, num_layers=2, bidirectional=True, zoneout=p,
                         dtype=torch.float64)
    keeps = []

    def recorder(*args, zoneout=None, **kwargs):
        keeps.append(zoneout)
        return functional.fused_gru_layer(*args, zoneout=zoneout, **kwargs)

    gru._layer_fn = recorder
    gru(torch.randn(20, 16, I, dtype=torch.float64))
    assert len(keeps) == 4
    for mask in keeps:
        assert mask.shape == (20, 16, 64)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        fraction, n = mask.mean().item(), mask.numel()
        assert abs(fraction - p) < 4 * (p * (1 - p) / n) ** 0.5, (fraction, p)
    for a, b in itertools.combinations(keeps, 2):
        assert not torch.equal(a, b)


@needs_fused
@pytest.mark.parametrize("mode", ["padded", "packed-unsorted"])
def test_zoneout_module_training_draws_the_twins_masks_and_eval_is_the_expectation(mode):
    """A training call's masks, drawn again by the same seed for the twin, give the same output
    and gradients (the backward used the forward's masks); in eval the module is the twin with
    the rate, deterministic."""
    def make():
        torch.manual_seed(0)
        return lstm_fused.GRU(I, H, num_layers=2, bidirectional=True, zoneout=0.4,
                              weight_dropout=0.2, dtype=torch.float64)

    g = torch.Generator().manual_seed(23)
    x, leaf, to_padded = make_input(mode, False, torch.float64, g)
    fused, twin = make(), as_reference(make())
    torch.manual_seed(1)
    got = outputs_and_grads(fused, x, leaf, None, to_padded)
    torch.manual_seed(1)
    expected = outputs_and_grads(twin, x, leaf, None, to_padded)
    for a, b in zip([*got[0], *got[1]], [*expected[0], *expected[1]]):
        assert_close(a, b, torch.float64)
    fused.eval(), twin.eval()
    with torch.no_grad():
        first, second, reference_out = fused(x)[0], fused(x)[0], twin(x)[0]
    assert torch.equal(to_padded(first), to_padded(second))
    assert_close(to_padded(first), to_padded(reference_out), torch.float64)


@needs_fused
def test_zoneout_same_seed_bit_identical_different_seed_differs():
    gru = lstm_fused.GRU(I, H, zoneout=0.5)
    x = torch.randn(T, B, I)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(gru(x)[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@needs_fused
def test_gru_cell_zoneout_training_mask_and_eval_expectation():
    cell = lstm_fused.GRUCell(I, H, zoneout=0.3, dtype=torch.float64)
    x, h = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    params = list(cell.parameters())
    torch.manual_seed(5)
    got = cell(x, h)
    torch.manual_seed(5)
    mask = lstm_fused.functional.keep_mask(x, (1, B, H), 0.3)[0]  # the draw the cell makes
    new = reference.gru_cell(x, h, *params)
    assert_close(got, mask * h + (1 - mask) * new, torch.float64)
    cell.eval()
    with torch.no_grad():
        assert_close(cell(x, h), 0.3 * h + 0.7 * new, torch.float64)


@pytest.mark.parametrize("zoneout, error, match", [
    ((0.1, 0.2), ValueError, "one state"), (1.0, ValueError, r"\[0, 1\)"),
    (-0.1, ValueError, r"\[0, 1\)"), ("0.1", TypeError, "real number")])
def test_zoneout_rates_are_checked(zoneout, error, match):
    for make in (lambda: lstm_fused.GRU(I, H, zoneout=zoneout),
                 lambda: lstm_fused.GRUCell(I, H, zoneout=zoneout)):
        with pytest.raises(error, match=match):
            make()


def test_zoneout_repr_and_no_torch_counterpart():
    gru = lstm_fused.GRU(I, H, zoneout=0.25)
    assert repr(gru) == f"GRU({I}, {H}, zoneout=0.25)"
    with pytest.raises(ValueError, match="zoneout"):
        gru.to_torch()


def test_functional_zoneout_mask_shape_is_checked():
    g = torch.Generator().manual_seed(24)
    x, h0, weights, _, mask = zoneout_layer_inputs(False, g)
    with pytest.raises(ValueError, match="keep_h"):
        functional.gru_layer(x, h0, *weights, zoneout=mask[:, :, :-1])
    with pytest.raises(ValueError, match="keep_h"):
        reference.gru_layer(x, h0, *weights, zoneout=mask[:, :, :-1])
