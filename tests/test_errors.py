"""Bad inputs at every public entry (modules, functional API, ops): each raises the exception a
PyTorch user expects, with a message naming the argument and what was expected."""

import ast
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

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
    # constructor options: torch.nn.LSTM's types and messages
    Bad("dropout above 1", lambda: lstm(num_layers=2, dropout=1.5), ValueError,
        r"dropout should be a number in range \[0, 1\] .*, got 1.5"),
    Bad("negative dropout", lambda: lstm(num_layers=2, dropout=-0.1), ValueError,
        r"dropout should be a number in range \[0, 1\] .*, got -0.1"),
    Bad("dropout True", lambda: lstm(num_layers=2, dropout=True), ValueError,
        r"dropout should be a number in range \[0, 1\] .*, got True"),
    Bad("dropout a string", lambda: lstm(num_layers=2, dropout="0.5"), ValueError,
        r"dropout should be a number in range \[0, 1\] .*, got '0.5'"),
    Bad("bias an int", lambda: lstm(bias=1), TypeError, r"bias should be of type bool, got: int"),
    Bad("batch_first a string", lambda: lstm(batch_first="False"), TypeError,
        r"batch_first should be of type bool, got: str"),
    Bad("bidirectional a string", lambda: lstm(bidirectional="False"), TypeError,
        r"bidirectional should be of type bool, got: str"),
    Bad("coupled an int", lambda: lstm(coupled=1), TypeError,
        r"coupled should be of type bool, got: int"),
    Bad("cell bias a string", lambda: lstm_fused.LSTMCell(I, H, bias="True"), TypeError,
        r"bias should be of type bool, got: str"),
    Bad("peephole misspelt", lambda: lstm(peephole="diag"), ValueError,
        r"peephole must be one of None, False, True, 'diagonal' or 'full'; got 'diag'"),
    Bad("peephole an int", lambda: lstm_fused.LSTMCell(I, H, peephole=1), ValueError,
        r"peephole must be one of .*; got 1"),
    Bad("input_size a float", lambda: lstm_fused.LSTM(3.0, H), TypeError,
        r"input_size should be of type int, got: float"),
    Bad("input_size 0", lambda: lstm_fused.LSTM(0, H), ValueError,
        r"input_size must be greater than zero"),
    Bad("hidden_size 0", lambda: lstm_fused.LSTM(I, 0), ValueError,
        r"hidden_size must be greater than zero"),
    Bad("cell hidden_size a float", lambda: lstm_fused.PeepholeLSTMCell(I, 4.0), TypeError,
        r"hidden_size should be of type int, got: float"),
    Bad("num_layers 0", lambda: lstm(num_layers=0), ValueError,
        r"num_layers must be greater than zero"),
    Bad("num_layers a float", lambda: lstm(num_layers=1.5), TypeError,
        r"num_layers should be of type int, got: float"),
    Bad("proj_size not below hidden_size", lambda: lstm(proj_size=H), ValueError,
        r"proj_size has to be smaller than hidden_size, got proj_size=4 and hidden_size=4"),
    Bad("negative proj_size", lambda: lstm(proj_size=-1), ValueError,
        r"proj_size should be a positive integer or zero to disable projections"),
    # LSTM input
    Bad("input a list", lambda: lstm()([[1.0] * I]), TypeError,
        r"LSTM: expected input to be a Tensor or PackedSequence, got list"),
    Bad("input 1-D", lambda: lstm()(seq(I)), ValueError,
        r"LSTM: Expected input to be 2D or 3D, got 1D instead"),
    Bad("input 4-D", lambda: lstm()(seq(1, T, B, I)), ValueError,
        r"Expected input to be 2D or 3D, got 4D instead"),
    Bad("input_size mismatch", lambda: lstm()(seq(T, B, I + 2)), RuntimeError,
        r"input.size\(-1\) must be equal to input_size. Expected 3, got 5"),
    Bad("integer input", lambda: lstm()(seq().long()), ValueError,
        r"RNN input dtype \(torch.int64\) does not match weight dtype \(torch.float32\)"),
    Bad("float64 input, float32 module", lambda: lstm()(seq().double()), ValueError,
        r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\). "
        r"Convert input: input.to\(torch.float32\), or convert model: model.to\(torch.float64\)"),
    Bad("input on another device", lambda: lstm()(seq(device="meta")), RuntimeError,
        r"Input and parameter tensors are not at the same device, found input tensor at meta "
        r"and parameter tensor at cpu"),
    Bad("empty sequence (T = 0)", lambda: lstm()(seq(0, B, I)), RuntimeError,
        r"Expected sequence length to be larger than 0 in RNN; got input of shape \(0, 2, 3\)"),
    Bad("batch_first empty sequence", lambda: lstm(batch_first=True)(seq(B, 0, I)), RuntimeError,
        r"Expected sequence length to be larger than 0 in RNN"),
    # LSTM state
    Bad("hx a tensor", lambda: lstm()(seq(), zeros(1, B, H)), TypeError,
        r"expected hx to be a tuple \(h_0, c_0\), got Tensor"),
    Bad("h_0 an int", lambda: lstm()(seq(), (1, zeros(1, B, H))), TypeError,
        r"expected hx\[0\] to be a Tensor, got int"),
    Bad("h_0 batch mismatch", lambda: lstm()(seq(), (zeros(1, 3, H), zeros(1, B, H))),
        RuntimeError, r"Expected hidden\[0\] size \(1, 2, 4\), got \[1, 3, 4\]"),
    Bad("c_0 hidden mismatch", lambda: lstm()(seq(), (zeros(1, B, H), zeros(1, B, 5))),
        RuntimeError, r"Expected hidden\[1\] size \(1, 2, 4\), got \[1, 2, 5\]"),
    Bad("h_0 of hidden_size with a projection",
        lambda: lstm(proj_size=2)(seq(), (zeros(1, B, H), zeros(1, B, H))),
        RuntimeError, r"Expected hidden\[0\] size \(1, 2, 2\), got \[1, 2, 4\]"),
    Bad("h_0 for one layer of two", lambda: lstm(num_layers=2)(seq(), (zeros(1, B, H),) * 2),
        RuntimeError, r"Expected hidden\[0\] size \(2, 2, 4\), got \[1, 2, 4\]"),
    Bad("h_0 for one direction of two",
        lambda: lstm(bidirectional=True)(seq(), (zeros(1, B, H),) * 2),
        RuntimeError, r"Expected hidden\[0\] size \(2, 2, 4\), got \[1, 2, 4\]"),
    Bad("h_0 2-D for batched input", lambda: lstm()(seq(), (zeros(B, H), zeros(1, B, H))),
        RuntimeError,
        r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\) tensors"),
    Bad("h_0 float64", lambda: lstm()(seq(), (zeros(1, B, H).double(), zeros(1, B, H))),
        RuntimeError,
        r"hx\[0\] dtype \(torch.float64\) does not match input dtype \(torch.float32\)"),
    Bad("c_0 on another device",
        lambda: lstm()(seq(), (zeros(1, B, H), zeros(1, B, H, device="meta"))),
        RuntimeError, r"Input and hidden tensors are not at the same device, found input tensor "
        r"at cpu and hidden tensor hx\[1\] at meta"),
    Bad("batched state for unbatched input", lambda: lstm()(seq(T, I), (zeros(1, B, H),) * 2),
        RuntimeError,
        r"For unbatched 2-D input, hx and cx should also be 2-D but got \(3-D, 3-D\) tensors"),
    Bad("unbatched state of two rows for one layer", lambda: lstm()(seq(T, I), (zeros(2, H),) * 2),
        RuntimeError, r"Expected hidden\[0\] size \(1, 1, 4\), got \[2, 1, 4\]"),
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
        RuntimeError, r"Expected hidden\[0\] size \(1, 3, 4\), got \[1, 2, 4\]"),
    Bad("packed data 3-D",
        lambda: lstm()(PackedSequence(seq(), torch.tensor([2, 2]), None, None)),
        RuntimeError, r"input must have 2 dimensions, got 3"),
    Bad("packed data float64",
        lambda: lstm()(PackedSequence(seq(6, I).double(), torch.tensor([3, 2, 1]), None, None)),
        ValueError, r"RNN input dtype \(torch.float64\) does not match weight dtype"),
    # LSTMCell: torch.nn.LSTMCell's types and messages
    Bad("cell input 3-D", lambda: lstm_fused.LSTMCell(I, H)(seq()), ValueError,
        r"LSTMCell: Expected input to be 1D or 2D, got 3D instead"),
    Bad("cell input_size mismatch", lambda: lstm_fused.LSTMCell(I, H)(seq(B, 5)), RuntimeError,
        r"LSTMCell: input has inconsistent input_size: got 5 expected 3"),
    Bad("cell h_0 batch mismatch",
        lambda: lstm_fused.LSTMCell(I, H)(seq(B, I), (zeros(3, H), zeros(B, H))),
        RuntimeError, r"LSTMCell: Input batch size 2 doesn't match hidden0 batch size 3"),
    Bad("cell c_0 hidden mismatch",
        lambda: lstm_fused.LSTMCell(I, H)(seq(B, I), (zeros(B, H), zeros(B, 5))),
        RuntimeError, r"hidden1 has inconsistent hidden_size: got 5, expected 4"),
    Bad("cell hx 4-D",
        lambda: lstm_fused.LSTMCell(I, H)(seq(B, I), (zeros(B, 1, 1, H),) * 2),
        ValueError, r"Expected hx\[0\] to be 1D or 2D, got 4D instead"),
    Bad("cell batched state for unbatched input",
        lambda: lstm_fused.LSTMCell(I, H)(seq(I), (zeros(H), zeros(B, H))),
        RuntimeError, r"LSTMCell: for 1-D input, hx\[1\] should also be 1-D but got 2-D"),
    Bad("cell integer input", lambda: lstm_fused.CoupledLSTMCell(I, H)(seq(B, I).int()),
        RuntimeError, r"CoupledLSTMCell: input dtype \(torch.int32\) does not match weight "
        r"dtype \(torch.float32\)"),
    Bad("cell h_0 on another device",
        lambda: lstm_fused.LSTMCell(I, H)(seq(B, I), (zeros(B, H, device="meta"), zeros(B, H))),
        RuntimeError, r"Input and hidden tensors are not at the same device"),
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


def test_modules_validate_once_and_never_use_the_reference():
    """A module's forward checks its arguments with one call (lstm_fused._checks), not again in
    functional; no library module but the package's __init__ (which exposes it) imports the
    reference twin."""
    from lstm_fused import modules

    package = Path(lstm_fused.__file__).parent
    for path in package.glob("*.py"):
        if path.name in ("__init__.py", "reference.py"):
            continue
        imported = {alias.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module in (None, "")
                    for alias in node.names}
        imported |= {node.module for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not {"reference", "lstm_fused.reference"} & imported, path.name
    refuse = {"side_effect": AssertionError("checked twice")}
    with mock.patch.object(functional, "check_layer_args", **refuse), \
            mock.patch.object(functional, "check_cell_args", **refuse), \
            mock.patch.object(modules, "check_lstm_forward", wraps=modules.check_lstm_forward) as lstm_check, \
            mock.patch.object(modules, "check_cell_forward", wraps=modules.check_cell_forward) as cell_check:
        lstm(num_layers=2, bidirectional=True)(seq())
        lstm_fused.PeepholeLSTMCell(I, H)(seq(B, I))
    assert lstm_check.call_count == cell_check.call_count == 1
    # The GRU's modules likewise: one check, then the unchecked fused layer, never gru_layer.
    with mock.patch.object(functional, "gru_layer", **refuse), \
            mock.patch.object(modules, "check_gru_forward", wraps=modules.check_gru_forward) as gru_check, \
            mock.patch.object(modules, "check_gru_cell_forward", wraps=modules.check_gru_cell_forward) as gru_cell_check:
        lstm_fused.GRU(I, H, num_layers=2, bidirectional=True)(seq())
        lstm_fused.GRUCell(I, H)(seq(B, I))
    assert gru_check.call_count == gru_cell_check.call_count == 1


def test_backward_ops_called_directly_are_not_differentiable():
    """Double backward goes through the forward ops (tests/test_torch_parity.py); the backward
    ops themselves, called on tensors that require grad, say they cannot be differentiated
    instead of failing inside a kernel."""
    gates, c_prev = torch.randn(B, 4 * H), torch.randn(B, H)
    _, c, gates_out = ops.cell_forward(gates, c_prev, None, "none", False)
    grad_h = torch.randn(B, H, requires_grad=True)
    grad_gates, _, _ = ops.cell_backward(grad_h, torch.zeros(B, H), gates_out, c_prev, c, None,
                                         "none", False)
    with pytest.raises(NotImplementedError, match="the \\*_backward ops are not differentiable"):
        torch.autograd.grad(grad_gates.sum(), grad_h)
    # The GRU's layer backward op, likewise.
    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    weight_ih, weight_hh = torch.randn(3 * H, I), torch.randn(3 * H, H)
    out, _, gates = ops.gru_layer_forward(x, h0, weight_ih, weight_hh, None, None, None, False)
    grad_out = torch.randn(T, B, H, requires_grad=True)
    grad_input = ops.gru_layer_backward(grad_out, torch.zeros(B, H), x, h0, weight_ih, weight_hh,
                                        None, None, out, gates, None, False, True)[0]
    with pytest.raises(NotImplementedError, match="the \\*_backward ops are not differentiable"):
        torch.autograd.grad(grad_input.sum(), grad_out)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0, -1e-9, 1 + 1e-9])
def test_dropout_range_is_torch_lstm_range(dropout):
    """dropout in [0, 1] as torch.nn.LSTM (which accepts 1, zeroing every inter-layer output)."""
    accepted = 0 <= dropout <= 1

    def expectation(match):
        return nullcontext() if accepted else pytest.raises(ValueError, match=match)

    with expectation("dropout"):
        torch.nn.LSTM(I, H, num_layers=2, dropout=dropout)
    with expectation(r"dropout should be a number in range \[0, 1\]"):
        assert lstm(num_layers=2, dropout=dropout).dropout == dropout


# --- the order of the checks: with two mistakes at once, the one torch.nn reports ---------------

CELL_I, CELL_H, CELL_B = 10, 20, 3

# One mistake each, as an edit of the valid (input, h_0, c_0) of a [CELL_B, CELL_I] -> CELL_H
# cell: the input's size, each state's batch and hidden size, and a dtype other than the cell's.
CELL_MISTAKES = {
    "input_size": lambda a, other: {**a, "input": a["input"][:, :1].repeat(1, CELL_I + 1)},
    "hidden0_batch": lambda a, other: {**a, "h0": a["h0"][:1]},
    "hidden0_size": lambda a, other: {**a, "h0": a["h0"][:, :-1]},
    "hidden1_batch": lambda a, other: {**a, "c0": a["c0"][:1]},
    "hidden1_size": lambda a, other: {**a, "c0": a["c0"][:, :-1]},
    "input_dtype": lambda a, other: {**a, "input": a["input"].to(other)},
    "hidden0_dtype": lambda a, other: {**a, "h0": a["h0"].to(other)},
}
MISTAKE_PAIRS = [(a, b) for i, a in enumerate(CELL_MISTAKES) for b in list(CELL_MISTAKES)[i:]]


def _raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the exception itself is what is compared
        return e
    return None


def _same_check(ours: Exception, theirs: Exception) -> bool:
    """Ours reports the mistake torch's reports: torch's size/batch messages verbatim; for a
    dtype clash (torch's GEMM: "mat1 and mat2 must have the same dtype"), a dtype message."""
    if "dtype" in str(theirs):
        return "dtype" in str(ours)
    return str(theirs) in str(ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mistakes", MISTAKE_PAIRS, ids="+".join)
def test_cell_reports_the_mistake_torch_reports_first(dtype, mistakes):
    """Every pair of mistakes (and each alone), in a cell of each dtype with the other dtype as
    the wrong one: lstm_fused.LSTMCell raises torch.nn.LSTMCell's exception type for the same
    check, e.g. a wrongly-sized float64 input to a float32 cell gets "input has inconsistent
    input_size: got 11 expected 10", not a dtype message."""
    other = torch.float64 if dtype == torch.float32 else torch.float32
    torch.manual_seed(0)
    theirs_cell = torch.nn.LSTMCell(CELL_I, CELL_H).to(dtype)
    ours_cell = lstm_fused.LSTMCell(CELL_I, CELL_H).to(dtype)
    args = {"input": torch.randn(CELL_B, CELL_I, dtype=dtype),
            "h0": torch.randn(CELL_B, CELL_H, dtype=dtype),
            "c0": torch.randn(CELL_B, CELL_H, dtype=dtype)}
    for mistake in mistakes:
        args = CELL_MISTAKES[mistake](args, other)
    for grad in (True, False):  # the general path, and the no_grad latency path in front of it
        with torch.set_grad_enabled(grad):
            theirs = _raised(lambda: theirs_cell(args["input"], (args["h0"], args["c0"])))
            ours = _raised(lambda: ours_cell(args["input"], (args["h0"], args["c0"])))
        assert theirs is not None, "torch.nn.LSTMCell accepted a mistake"
        assert ours is not None, f"lstm_fused.LSTMCell accepted what torch rejects: {theirs}"
        assert type(ours) is type(theirs), (ours, theirs)
        assert _same_check(ours, theirs), f"ours: {ours}\ntorch: {theirs}"


LSTM_MISTAKES = {
    "input_size": lambda a, other: {**a, "input": a["input"][..., :1].repeat(1, 1, CELL_I + 1)},
    "hidden0_batch": lambda a, other: {**a, "h0": a["h0"][:, :1]},
    "hidden0_size": lambda a, other: {**a, "h0": a["h0"][..., :-1]},
    "hidden1_batch": lambda a, other: {**a, "c0": a["c0"][:, :1]},
    "hidden1_size": lambda a, other: {**a, "c0": a["c0"][..., :-1]},
    "input_dtype": lambda a, other: {**a, "input": a["input"].to(other)},
}
LSTM_MISTAKE_PAIRS = [(a, b) for i, a in enumerate(LSTM_MISTAKES) for b in list(LSTM_MISTAKES)[i:]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mistakes", LSTM_MISTAKE_PAIRS, ids="+".join)
def test_lstm_reports_the_mistake_torch_reports_first(dtype, mistakes):
    """The same for the LSTM module (torch.nn.LSTM checks the input dtype first, then sizes):
    the exception type and torch's message, with the module's name in front."""
    other = torch.float64 if dtype == torch.float32 else torch.float32
    torch.manual_seed(0)
    theirs_lstm = torch.nn.LSTM(CELL_I, CELL_H).to(dtype)
    ours_lstm = lstm_fused.LSTM(CELL_I, CELL_H).to(dtype)
    args = {"input": torch.randn(4, CELL_B, CELL_I, dtype=dtype),
            "h0": torch.randn(1, CELL_B, CELL_H, dtype=dtype),
            "c0": torch.randn(1, CELL_B, CELL_H, dtype=dtype)}
    for mistake in mistakes:
        args = LSTM_MISTAKES[mistake](args, other)
    theirs = _raised(lambda: theirs_lstm(args["input"], (args["h0"], args["c0"])))
    ours = _raised(lambda: ours_lstm(args["input"], (args["h0"], args["c0"])))
    assert theirs is not None and ours is not None, (theirs, ours)
    assert type(ours) is type(theirs), (ours, theirs)
    assert str(theirs).replace("torch.", "") in str(ours).replace("torch.", ""), (
        f"ours: {ours}\ntorch: {theirs}")


# The GRU's mistakes: those of the LSTM's without the cell state (the GRU's state is h alone).
GRU_CELL_MISTAKES = {k: v for k, v in CELL_MISTAKES.items() if not k.startswith("hidden1")}
GRU_CELL_MISTAKE_PAIRS = [(a, b) for i, a in enumerate(GRU_CELL_MISTAKES)
                          for b in list(GRU_CELL_MISTAKES)[i:]]
GRU_MISTAKES = {k: v for k, v in LSTM_MISTAKES.items() if not k.startswith("hidden1")}
GRU_MISTAKE_PAIRS = [(a, b) for i, a in enumerate(GRU_MISTAKES) for b in list(GRU_MISTAKES)[i:]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mistakes", GRU_CELL_MISTAKE_PAIRS, ids="+".join)
def test_gru_cell_reports_the_mistake_torch_reports_first(dtype, mistakes):
    """As test_cell_reports_the_mistake_torch_reports_first, for lstm_fused.GRUCell against
    torch.nn.GRUCell, on the general path and the no_grad one-op path."""
    other = torch.float64 if dtype == torch.float32 else torch.float32
    torch.manual_seed(0)
    theirs_cell = torch.nn.GRUCell(CELL_I, CELL_H).to(dtype)
    ours_cell = lstm_fused.GRUCell(CELL_I, CELL_H).to(dtype)
    args = {"input": torch.randn(CELL_B, CELL_I, dtype=dtype),
            "h0": torch.randn(CELL_B, CELL_H, dtype=dtype)}
    for mistake in mistakes:
        args = GRU_CELL_MISTAKES[mistake](args, other)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            theirs = _raised(lambda: theirs_cell(args["input"], args["h0"]))
            ours = _raised(lambda: ours_cell(args["input"], args["h0"]))
        assert theirs is not None, "torch.nn.GRUCell accepted a mistake"
        assert ours is not None, f"lstm_fused.GRUCell accepted what torch rejects: {theirs}"
        assert type(ours) is type(theirs), (ours, theirs)
        assert _same_check(ours, theirs), f"ours: {ours}\ntorch: {theirs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mistakes", GRU_MISTAKE_PAIRS, ids="+".join)
def test_gru_reports_the_mistake_torch_reports_first(dtype, mistakes):
    """As test_lstm_reports_the_mistake_torch_reports_first, for lstm_fused.GRU against
    torch.nn.GRU."""
    other = torch.float64 if dtype == torch.float32 else torch.float32
    torch.manual_seed(0)
    theirs_gru = torch.nn.GRU(CELL_I, CELL_H).to(dtype)
    ours_gru = lstm_fused.GRU(CELL_I, CELL_H).to(dtype)
    args = {"input": torch.randn(4, CELL_B, CELL_I, dtype=dtype),
            "h0": torch.randn(1, CELL_B, CELL_H, dtype=dtype)}
    for mistake in mistakes:
        args = GRU_MISTAKES[mistake](args, other)
    theirs = _raised(lambda: theirs_gru(args["input"], args["h0"]))
    ours = _raised(lambda: ours_gru(args["input"], args["h0"]))
    assert theirs is not None and ours is not None, (theirs, ours)
    assert type(ours) is type(theirs), (ours, theirs)
    assert str(theirs).replace("torch.", "") in str(ours).replace("torch.", ""), (
        f"ours: {ours}\ntorch: {theirs}")
