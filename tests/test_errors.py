"""Bad inputs at every public entry (modules, functional API, ops): each raises the exception a
PyTorch user expects, with a message naming the argument and what was expected."""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import lstm_fused
from lstm_fused import functional, reference
from lstm_fused.ops import ops

T, B, I, H = 5, 2, 3, 4


def lstm(**kwargs):
    return lstm_fused.LSTM(I, H, **kwargs)


def seq(*shape, **kwargs):
    return torch.randn(*(shape or (T, B, I)), **kwargs)


def zeros(*shape, **kwargs):
    return torch.zeros(*shape, **kwargs)


def packed(batch_sizes, rows=None, dtype=torch.int64):
    rows = sum(batch_sizes) if rows is None else rows
    return PackedSequence(seq(rows, I), torch.tensor(batch_sizes, dtype=dtype), None, None)


def state_dict_of(module_class, **kwargs):
    return module_class(I, H, **kwargs).state_dict()


@dataclass
class Bad:
    what: str
    given: Callable | dict  # a call that must fail, or the keyword arguments of a function
    error: type
    match: str


MODULE_CASES = [
    # constructor options
    Bad("dropout above 1", lambda: lstm(num_layers=2, dropout=1.5), ValueError,
        r"dropout must be a number in \[0, 1\], got 1.5"),
    Bad("negative dropout", lambda: lstm(num_layers=2, dropout=-0.1), ValueError,
        r"dropout must be a number in \[0, 1\], got -0.1"),
    Bad("dropout True", lambda: lstm(num_layers=2, dropout=True), ValueError,
        r"dropout must be a number in \[0, 1\], got True"),
    Bad("dropout a string", lambda: lstm(num_layers=2, dropout="0.5"), ValueError,
        r"dropout must be a number in \[0, 1\], got '0.5'"),
    Bad("peephole misspelt", lambda: lstm(peephole="diag"), ValueError,
        r"peephole must be one of None, False, True, 'diagonal' or 'full'; got 'diag'"),
    Bad("peephole an int", lambda: lstm_fused.LSTMCell(I, H, peephole=1), ValueError,
        r"peephole must be one of .*; got 1"),
    Bad("hidden_size 0", lambda: lstm_fused.LSTM(I, 0), ValueError,
        r"hidden_size must be a positive integer, got 0"),
    Bad("num_layers 0", lambda: lstm(num_layers=0), ValueError,
        r"num_layers must be a positive integer, got 0"),
    Bad("proj_size not below hidden_size", lambda: lstm(proj_size=H), ValueError,
        r"proj_size \(4\) must be smaller than hidden_size \(4\)"),
    Bad("negative proj_size", lambda: lstm(proj_size=-1), ValueError,
        r"proj_size must be a non-negative integer, got -1"),
    # LSTM input
    Bad("input a list", lambda: lstm()([[1.0] * I]), TypeError,
        r"LSTM: expected input to be a Tensor or PackedSequence, got list"),
    Bad("input 1-D", lambda: lstm()(seq(I)), ValueError,
        r"expected input to be 2-D \(unbatched\) or 3-D, got 1-D with shape \(3,\)"),
    Bad("input 4-D", lambda: lstm()(seq(1, T, B, I)), ValueError,
        r"expected input to be 2-D \(unbatched\) or 3-D, got 4-D"),
    Bad("input_size mismatch", lambda: lstm()(seq(T, B, I + 2)), ValueError,
        r"expected input with 3 features \(input_size\), got 5"),
    Bad("integer input", lambda: lstm()(seq().long()), ValueError,
        r"expected input of dtype torch.float32 \(the dtype of the parameters\), got torch.int64"),
    Bad("float64 input, float32 module", lambda: lstm()(seq().double()), ValueError,
        r"expected input of dtype torch.float32 \(the dtype of the parameters\), "
        r"got torch.float64"),
    Bad("input on another device", lambda: lstm()(seq(device="meta")), RuntimeError,
        r"expected input on device cpu \(the device of the parameters\), got meta"),
    Bad("empty sequence (T = 0)", lambda: lstm()(seq(0, B, I)), ValueError,
        r"expected sequence length to be larger than 0, got input of shape \(0, 2, 3\)"),
    Bad("batch_first empty sequence", lambda: lstm(batch_first=True)(seq(B, 0, I)), ValueError,
        r"expected sequence length to be larger than 0"),
    # LSTM state
    Bad("hx a tensor", lambda: lstm()(seq(), zeros(1, B, H)), TypeError,
        r"expected hx to be a tuple \(h_0, c_0\), got Tensor"),
    Bad("h_0 an int", lambda: lstm()(seq(), (1, zeros(1, B, H))), TypeError,
        r"expected h_0 to be a Tensor, got int"),
    Bad("h_0 batch mismatch", lambda: lstm()(seq(), (zeros(1, 3, H), zeros(1, B, H))),
        ValueError, r"expected h_0 of shape \(1, 2, 4\), got \(1, 3, 4\)"),
    Bad("c_0 hidden mismatch", lambda: lstm()(seq(), (zeros(1, B, H), zeros(1, B, 5))),
        ValueError, r"expected c_0 of shape \(1, 2, 4\), got \(1, 2, 5\)"),
    Bad("h_0 of hidden_size with a projection",
        lambda: lstm(proj_size=2)(seq(), (zeros(1, B, H), zeros(1, B, H))),
        ValueError, r"expected h_0 of shape \(1, 2, 2\), got \(1, 2, 4\)"),
    Bad("h_0 for one layer of two", lambda: lstm(num_layers=2)(seq(), (zeros(1, B, H),) * 2),
        ValueError, r"expected h_0 of shape \(2, 2, 4\), got \(1, 2, 4\)"),
    Bad("h_0 for one direction of two",
        lambda: lstm(bidirectional=True)(seq(), (zeros(1, B, H),) * 2),
        ValueError, r"expected h_0 of shape \(2, 2, 4\), got \(1, 2, 4\)"),
    Bad("h_0 float64", lambda: lstm()(seq(), (zeros(1, B, H).double(), zeros(1, B, H))),
        ValueError,
        r"expected h_0 of dtype torch.float32 \(the dtype of input\), got torch.float64"),
    Bad("c_0 on another device",
        lambda: lstm()(seq(), (zeros(1, B, H), zeros(1, B, H, device="meta"))),
        RuntimeError, r"expected c_0 on device cpu \(the device of input\), got meta"),
    Bad("batched state for unbatched input", lambda: lstm()(seq(T, I), (zeros(1, B, H),) * 2),
        ValueError, r"for unbatched 2-D input, h_0 should also be 2-D but got 3-D"),
    # PackedSequence
    Bad("batch sizes summing above the data", lambda: lstm()(packed([2, 2, 2, 1, 1, 1], rows=8)),
        ValueError, r"sum\(batch_sizes\) = 9 but the packed input has 8 rows"),
    Bad("increasing batch sizes", lambda: lstm()(packed([1, 2, 2])), ValueError,
        r"batch_sizes must be positive and non-increasing; got \[1, 2, 2\]"),
    Bad("zero batch size", lambda: lstm()(packed([2, 2, 0])), ValueError,
        r"batch_sizes must be positive and non-increasing; got \[2, 2, 0\]"),
    Bad("float batch sizes", lambda: lstm()(packed([2, 2, 1], dtype=torch.float32)), TypeError,
        r"expected batch_sizes to be a 1-D integer tensor or a list of ints; got dtype"),
    Bad("h_0 batch not batch_sizes[0]",
        lambda: lstm()(packed([3, 2, 1]), (zeros(1, B, H), zeros(1, B, H))),
        ValueError, r"expected h_0 of shape \(1, 3, 4\), got \(1, 2, 4\)"),
    Bad("packed data 3-D",
        lambda: lstm()(PackedSequence(seq(), torch.tensor([2, 2]), None, None)),
        ValueError, r"expected PackedSequence data of shape \[N, input_size\], got \(5, 2, 3\)"),
    # LSTMCell
    Bad("cell input 3-D", lambda: lstm_fused.LSTMCell(I, H)(seq()), ValueError,
        r"LSTMCell: expected input to be 1-D or 2-D, got 3-D"),
    Bad("cell input_size mismatch", lambda: lstm_fused.LSTMCell(I, H)(seq(B, 5)), ValueError,
        r"LSTMCell: expected input with 3 features \(input_size\), got 5"),
    Bad("cell h_0 batch mismatch",
        lambda: lstm_fused.LSTMCell(I, H)(seq(B, I), (zeros(3, H), zeros(B, H))),
        ValueError, r"LSTMCell: expected h_0 of shape \(2, 4\), got \(3, 4\)"),
    Bad("cell batched state for unbatched input",
        lambda: lstm_fused.LSTMCell(I, H)(seq(I), (zeros(H), zeros(B, H))),
        ValueError, r"LSTMCell: expected c_0 of shape \(4,\), got \(2, 4\)"),
    Bad("cell integer input", lambda: lstm_fused.CoupledLSTMCell(I, H)(seq(B, I).int()),
        ValueError, r"CoupledLSTMCell: expected input of dtype torch.float32"),
    # state_dict of another variant
    Bad("coupled state_dict into a standard LSTM",
        lambda: lstm().load_state_dict(state_dict_of(lstm_fused.CoupledLSTM)), RuntimeError,
        r"another LSTM variant .*weight_ih_l0 has 3\*hidden_size rows, as with coupled=True"),
    Bad("standard state_dict into a coupled cell",
        lambda: lstm_fused.CoupledLSTMCell(I, H).load_state_dict(
            state_dict_of(lstm_fused.LSTMCell)), RuntimeError,
        r"weight_ih has 4\*hidden_size rows, as with coupled=False"),
    Bad("peephole state_dict into a vanilla LSTM",
        lambda: lstm().load_state_dict(state_dict_of(lstm_fused.PeepholeLSTM)), RuntimeError,
        r"it has weight_ch_l0, as with peephole='diagonal' or 'full'"),
    Bad("nn.LSTM state_dict into a peephole LSTM",
        lambda: lstm_fused.PeepholeLSTM(I, H).load_state_dict(torch.nn.LSTM(I, H).state_dict()),
        RuntimeError, r"it has no weight_ch_l0, as with peephole=None"),
    Bad("full-peephole state_dict into a diagonal one",
        lambda: lstm(peephole="diagonal").load_state_dict(
            state_dict_of(lstm_fused.LSTM, peephole="full")), RuntimeError,
        r"weight_ch_l0 has shape \(12, 4\), as with peephole='full'"),
    # conversions
    Bad("to_torch of a peephole LSTM", lambda: lstm_fused.PeepholeLSTM(I, H).to_torch(),
        ValueError, r"PeepholeLSTM.to_torch\(\) needs the vanilla variant"),
    Bad("to_torch of a coupled cell", lambda: lstm_fused.CoupledLSTMCell(I, H).to_torch(),
        ValueError, r"to_torch\(\) needs the vanilla variant .* coupled=True"),
    Bad("from_torch of a GRU", lambda: lstm_fused.LSTM.from_torch(torch.nn.GRU(I, H)), TypeError,
        r"LSTM.from_torch: expected a torch.nn.LSTM, got GRU"),
]


def layer_args(**overrides):
    """Valid arguments of functional.lstm_layer (vanilla, padded), with some replaced."""
    g = torch.Generator().manual_seed(0)
    args = {"input": torch.randn(T, B, I, generator=g), "hx": torch.zeros(B, H),
            "cx": torch.zeros(B, H), "weight_ih": torch.randn(4 * H, I, generator=g),
            "weight_hh": torch.randn(4 * H, H, generator=g), "bias_ih": torch.zeros(4 * H),
            "bias_hh": torch.zeros(4 * H)}
    args.update(overrides)
    return args


FUNCTIONAL_CASES = [
    Bad("input a list", layer_args(input=[[0.0] * I]), TypeError,
        r"expected input to be a Tensor, got list"),
    Bad("integer input", layer_args(input=torch.ones(T, B, I, dtype=torch.int32)), TypeError,
        r"expected input to be a floating-point tensor .*, got torch.int32"),
    Bad("weight_ih float64", layer_args(weight_ih=torch.zeros(4 * H, I, dtype=torch.float64)),
        TypeError,
        r"expected weight_ih of dtype torch.float32 \(the dtype of input\), got torch.float64"),
    Bad("weight_hh on another device", layer_args(weight_hh=torch.zeros(4 * H, H, device="meta")),
        RuntimeError, r"expected weight_hh on device cpu \(the device of input\), got meta"),
    Bad("bias_ih a number", layer_args(bias_ih=0.0), TypeError,
        r"expected bias_ih to be a Tensor or None, got float"),
    Bad("bias_ih of a coupled layer", layer_args(bias_ih=torch.zeros(3 * H)), ValueError,
        r"bias_ih must have shape \[16\]; got \(12,\)"),
    Bad("coupled weights, coupled=False",
        layer_args(weight_ih=torch.zeros(3 * H, I), weight_hh=torch.zeros(3 * H, H)), ValueError,
        r"weight_hh must have shape \[12, 3\] for a standard LSTM with hidden_size=3; "
        r"got \(12, 4\)"),
    Bad("gate rows not a multiple of 3, coupled=True", layer_args(coupled=True), ValueError,
        r"weight_ih must have shape \[3\*hidden_size, input_size\] for a coupled LSTM"),
    Bad("weight_ch without a peephole", layer_args(weight_ch=torch.zeros(3, H)), ValueError,
        r"weight_ch was given but peephole is None"),
    Bad("peephole without weight_ch", layer_args(peephole="full"), ValueError,
        r"peephole='full' requires weight_ch, got None"),
    Bad("diagonal weight_ch for full peepholes",
        layer_args(weight_ch=torch.zeros(3, H), peephole="full"), ValueError,
        r"weight_ch for peephole='full', coupled=False must have shape \[12, 4\]"),
    Bad("weight_hr of the wrong width", layer_args(weight_hr=torch.zeros(2, H + 1)), ValueError,
        r"weight_hr must have shape \[proj_size, 4\]; got \(2, 5\)"),
    Bad("input_size mismatch", layer_args(input=torch.zeros(T, B, I + 1)), ValueError,
        r"expected input with 3 features \(weight_ih is \[16, 3\]\), got 4"),
    Bad("hx batch mismatch", layer_args(hx=torch.zeros(B + 1, H)), ValueError,
        r"expected hx \[B, R\] and cx \[B, H\] \(2-D, the same B\); got hx \(3, 4\), cx \(2, 4\)"),
    Bad("input batch not the state batch",
        layer_args(hx=torch.zeros(B + 1, H), cx=torch.zeros(B + 1, H)), ValueError,
        r"input has batch 2 but hx/cx have 3 rows"),
    Bad("padded input 2-D", layer_args(input=torch.zeros(T, I)), ValueError,
        r"padded input must be \[T, B, I\]; got \(5, 3\)"),
    Bad("float batch_sizes", layer_args(input=torch.zeros(4, I), batch_sizes=[2.0, 2.0]),
        TypeError, r"expected batch_sizes to be a 1-D integer tensor or a list of ints"),
    Bad("batch_sizes[0] not the state batch",
        layer_args(input=torch.zeros(4, I), batch_sizes=[1, 1, 1, 1]), ValueError,
        r"batch_sizes\[0\] = 1 but hx/cx have 2 rows"),
]


def cell_args(**overrides):
    """Valid arguments of functional.lstm_cell (vanilla), with some replaced."""
    args = layer_args(input=torch.zeros(B, I))
    args.update(overrides)
    return args


FUNCTIONAL_CELL_CASES = [
    Bad("cell input 3-D", cell_args(input=torch.zeros(T, B, I)), ValueError,
        r"expected input of shape \[B, input_size\], got \(5, 2, 3\)"),
    Bad("cell hx of hidden_size with a projection",
        cell_args(weight_hh=torch.zeros(4 * H, 2), weight_hr=torch.zeros(2, H)), ValueError, r"hx must have last dimension 2 \(proj_size or hidden_size\); got \(2, 4\)"),
    Bad("cell cx batch mismatch", cell_args(cx=torch.zeros(B + 1, H)), ValueError,
        r"expected cx of shape \[2, 4\] \(batch of input, hidden_size\), got \(3, 4\)"),
]

TWINS = {"fused layer": (functional.lstm_layer, FUNCTIONAL_CASES),
         "reference layer": (reference.lstm_layer, FUNCTIONAL_CASES),
         "fused cell": (functional.lstm_cell, FUNCTIONAL_CELL_CASES),
         "reference cell": (reference.lstm_cell, FUNCTIONAL_CELL_CASES)}


@pytest.mark.parametrize("twin, case", [
    pytest.param(function, case, id=f"{name}: {case.what}")
    for name, (function, cases) in TWINS.items() for case in cases])
def test_functional_rejects_bad_input_by_name(twin, case):
    """The fused functions and their plain-PyTorch twins reject the same inputs, with the same
    words."""
    with pytest.raises(case.error, match=case.match) as raised:
        twin(**case.given)
    assert type(raised.value) is case.error, raised.value


def cell_op(**overrides):
    """Calls torch.ops.lstm_fused.cell_forward with valid arguments, some replaced."""
    args = {"gates": torch.zeros(B, 4 * H), "c_prev": torch.zeros(B, H), "weight_ch": None,
            "peephole": "none", "coupled": False}
    args.update(overrides)
    return lambda: ops.cell_forward(*args.values())


def layer_op(**overrides):
    """Calls torch.ops.lstm_fused.layer_forward with valid arguments, some replaced."""
    args = layer_args(weight_ch=None, weight_hr=None, batch_sizes=None, reverse=False,
                      peephole="none", coupled=False)
    args.update(overrides)
    return lambda: ops.layer_forward(*args.values())


OP_CASES = [
    Bad("integer layer input", layer_op(**{
        k: v.int() for k, v in layer_args().items()}), TypeError,
        r"lstm_fused: expected input to be a floating-point tensor"),
    Bad("h0 float64", layer_op(hx=torch.zeros(B, H, dtype=torch.float64)), TypeError,
        r"lstm_fused: expected h0 to have dtype Float, got Double"),
    Bad("c0 batch mismatch", layer_op(cx=torch.zeros(B + 1, H)), ValueError,
        r"lstm_fused: expected c0 of shape \[2, 4\], got \[3, 4\]"),
    Bad("batch_sizes sum", layer_op(input=torch.zeros(3, I), batch_sizes=[2, 2]), ValueError,
        r"lstm_fused: batch_sizes sum to 4 but the packed input has 3 rows"),
    Bad("unknown peephole", cell_op(peephole="diag"), ValueError,
        r"lstm_fused: peephole must be 'none', 'diagonal' or 'full', got 'diag'"),
    Bad("gates of another variant", cell_op(coupled=True), ValueError,
        r"lstm_fused: expected gates of shape \[2, 12\], got \[2, 16\]"),
    Bad("diagonal peephole without weight_ch", cell_op(peephole="diagonal"), ValueError,
        r"lstm_fused: peephole='diagonal' needs weight_ch"),
    Bad("integer cell state", cell_op(gates=torch.zeros(B, 4 * H, dtype=torch.int32),
                                           c_prev=torch.zeros(B, H, dtype=torch.int32)),
        TypeError, r"lstm_fused: expected c_prev to be a floating-point tensor .*, got Int"),
]


@pytest.mark.parametrize("case", MODULE_CASES + OP_CASES, ids=lambda case: case.what)
def test_module_and_op_reject_bad_input_by_name(case):
    with pytest.raises(case.error, match=case.match) as raised:
        case.given()
    assert type(raised.value) is case.error, raised.value  # not merely a subclass


def test_table_covers_at_least_25_bad_inputs():
    tables = [MODULE_CASES, FUNCTIONAL_CASES, FUNCTIONAL_CELL_CASES, OP_CASES]
    assert sum(len(table) for table in tables) >= 25
    for table in tables:  # within a table, each case is a different input
        assert len({case.what for case in table}) == len(table)


@pytest.mark.parametrize("module, make_input", [
    (lambda: lstm_fused.PeepholeLSTM(I, H, num_layers=2), lambda: seq(requires_grad=True)),
    (lambda: lstm_fused.CoupledLSTMCell(I, H, peephole="full"),
     lambda: seq(B, I, requires_grad=True)),
], ids=["layer", "cell"])
def test_double_backward_raises_not_supported(module, make_input):
    """A first backward with create_graph=True works; differentiating it again says clearly
    that the fused ops do not support it (instead of an error from inside a kernel)."""
    x = make_input()
    output = module()(x)[0]
    (grad,) = torch.autograd.grad(output.pow(2).sum(), x, create_graph=True)
    assert grad.requires_grad
    with pytest.raises(NotImplementedError, match="double backward .* is not supported"):
        torch.autograd.grad(grad.sum(), x)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0, -1e-9, 1 + 1e-9])
def test_dropout_range_is_torch_lstm_range(dropout):
    """dropout in [0, 1] as torch.nn.LSTM (which accepts 1, zeroing every inter-layer output)."""
    accepted = 0 <= dropout <= 1

    def expectation(match):
        return nullcontext() if accepted else pytest.raises(ValueError, match=match)

    with expectation("dropout"):
        torch.nn.LSTM(I, H, num_layers=2, dropout=dropout)
    with expectation(r"dropout must be a number in \[0, 1\]"):
        assert lstm(num_layers=2, dropout=dropout).dropout == dropout
