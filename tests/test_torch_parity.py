"""PyTorch's own tests of torch.nn.LSTM / torch.nn.LSTMCell, written again for lstm_fused (the
same assertions) and run for every variant: test_nn.py's test_rnn_args_check,
test_projections_lstm_args_check, test_RNN_cell_no_broadcasting, test_cudnn_forward_exception,
test_error_RNN_seq_len_zero and test_rnn_weight_norm, test/nn/test_pruning.py's
test_rnn_pruning, and the ModuleInfo test_errors / test_gradgrad cases of LSTM and LSTMCell
(torch/testing/_internal/common_modules.py). Where PyTorch's originals also cover nn.GRU /
nn.GRUCell (test_rnn_args_check, test_RNN_cell_no_broadcasting, test_cudnn_forward_exception,
test_error_RNN_seq_len_zero, and the ModuleInfo entries of GRU and GRUCell), the same tests run
lstm_fused.GRU / GRUCell as one more `variant`, GRU. Then what the issue adds: double backward
of every op (gradgradcheck in float64), nn.LSTM's flat-weight attributes, and
torch.ao.quantization."""

import itertools
import re
from unittest import mock

import pytest
import torch
from conftest import VARIANTS, make_params, variant_id, variant_params
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
from torch.nn.utils import parametrizations, prune
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from lstm_fused import _double_backward, functional, reference
from lstm_fused.ops import BUILT_WITH_CUDA

HAS_CUDA = BUILT_WITH_CUDA and torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")])]
on_every_device = pytest.mark.parametrize("device", DEVICES)


# The `variant` of the tests PyTorch also runs on nn.GRU / nn.GRUCell: lstm_fused.GRU / GRUCell,
# checked against nn.GRU / nn.GRUCell where the LSTM variants are checked against nn.LSTM.
GRU = "gru"
variant_and_gru_params = pytest.mark.parametrize(
    "variant", [*VARIANTS, GRU], ids=[*map(variant_id, VARIANTS), GRU])


def make_lstm(variant, *args, **kwargs):
    """Our layer stack: the LSTM of the variant, or lstm_fused.GRU for GRU."""
    if variant == GRU:
        return lstm_fused.GRU(*args, **kwargs)
    peephole, coupled = variant
    return lstm_fused.LSTM(*args, peephole=peephole, coupled=coupled, **kwargs)


def make_cell(variant, *args, **kwargs):
    """Our cell: the LSTMCell of the variant, or lstm_fused.GRUCell for GRU."""
    if variant == GRU:
        return lstm_fused.GRUCell(*args, **kwargs)
    peephole, coupled = variant
    return lstm_fused.LSTMCell(*args, peephole=peephole, coupled=coupled, **kwargs)


def torch_rnn(variant, *args, **kwargs):
    """torch.nn's layer stack for the same case: nn.GRU for GRU, else nn.LSTM."""
    return (nn.GRU if variant == GRU else nn.LSTM)(*args, **kwargs)


def torch_cell(variant, *args, **kwargs):
    return (nn.GRUCell if variant == GRU else nn.LSTMCell)(*args, **kwargs)


def state_cases(variant, state, good):
    """The initial states to try with one wrong state tensor: the GRU's h_0 alone; for an LSTM,
    the wrong tensor as h_0 and as c_0 beside a right one (or as both, when it is right)."""
    if variant == GRU:
        return [state]
    return [(state, state)] if state is good else [(state, good), (good, state)]


def update_shape(shape, dim, size):
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)


def raises_as_torch(ours, theirs, error=RuntimeError, match=None):
    """ours() raises exactly `error` (matching `match`), and so does theirs(), the same call on
    the torch.nn module, so the case really is one torch rejects that way."""
    for call in (theirs, ours):
        with pytest.raises(error, match=match) as raised:
            call()
        assert type(raised.value) is error, raised.value


# --- test_nn.py: argument checks -------------------------------------------------------------


@variant_and_gru_params
def test_rnn_args_check(variant):
    """A wrong input batch, hidden batch, input size, hidden size or number of state rows is a
    RuntimeError, for h_0 or c_0 wrong alone (test_nn.py runs it on nn.RNN, nn.GRU and nn.LSTM)."""
    input_size, hidden_size, num_layers, batch_size, seq_len, bad_size = 3, 5, 2, 4, 6, 7
    correct_input = (seq_len, batch_size, input_size)
    correct_hidden = (num_layers, batch_size, hidden_size)
    cases = [(update_shape(correct_input, 1, bad_size), correct_hidden),   # input batch
             (correct_input, update_shape(correct_hidden, 1, bad_size)),   # hidden batch
             (update_shape(correct_input, 2, bad_size), correct_hidden),   # input size
             (correct_input, update_shape(correct_hidden, 2, bad_size)),   # hidden size
             (correct_input, update_shape(correct_hidden, 0, bad_size))]   # hidden[0]
    ours = make_lstm(variant, input_size, hidden_size, num_layers)
    theirs = torch_rnn(variant, input_size, hidden_size, num_layers)
    for input_shape, hidden_shape in cases:
        x, hidden = torch.randn(input_shape), torch.randn(hidden_shape)
        good = hidden if hidden_shape == correct_hidden else torch.randn(correct_hidden)
        for hx in state_cases(variant, hidden, good):
            raises_as_torch(lambda: ours(x, hx), lambda: theirs(x, hx))  # noqa: B023


@variant_params
@pytest.mark.parametrize("bidirectional", [False, True])
def test_projections_lstm_args_check(variant, bidirectional):
    """With proj_size, h_0 is [D*L, B, proj_size] and c_0 [D*L, B, hidden_size]: every wrong
    size, batch or row count of either, or of the input, is a RuntimeError."""
    input_size, hidden_size, proj_size, num_layers, batch_size, seq_len = 3, 5, 2, 2, 4, 6
    bad_size, rows = 7, num_layers * (2 if bidirectional else 1)
    x_shape = (seq_len, batch_size, input_size)
    h_shape, c_shape = (rows, batch_size, proj_size), (rows, batch_size, hidden_size)
    cases = [(update_shape(x_shape, 1, bad_size), h_shape, c_shape),           # input batch
             (x_shape, update_shape(h_shape, 1, bad_size), update_shape(c_shape, 1, bad_size)),
             (update_shape(x_shape, 2, bad_size), h_shape, c_shape),           # input size
             (x_shape, update_shape(h_shape, 2, bad_size), update_shape(c_shape, 2, bad_size)),
             (x_shape, update_shape(h_shape, 0, bad_size), update_shape(c_shape, 0, bad_size)),
             (x_shape, update_shape(h_shape, 2, hidden_size), c_shape),        # h of hidden_size
             (x_shape, update_shape(h_shape, 2, bad_size), c_shape),           # h of neither
             (x_shape, h_shape, update_shape(c_shape, 2, proj_size))]          # c of proj_size
    ours = make_lstm(variant, input_size, hidden_size, num_layers, proj_size=proj_size,
                     bidirectional=bidirectional)
    theirs = nn.LSTM(input_size, hidden_size, num_layers, proj_size=proj_size,
                     bidirectional=bidirectional)
    for shapes in cases:
        x, h, c = (torch.randn(s) for s in shapes)
        raises_as_torch(lambda: ours(x, (h, c)), lambda: theirs(x, (h, c)))  # noqa: B023


@variant_and_gru_params
def test_RNN_cell_no_broadcasting(variant):
    """LSTMCell and GRUCell never broadcast: a state of batch 1, a state of width 1 and an input
    of width 1 are RuntimeErrors, for h_0 or c_0."""
    input_size, hidden_size = 10, 20
    good_input, good_hx = torch.randn(3, input_size), torch.randn(3, hidden_size)
    ours = make_cell(variant, input_size, hidden_size)
    theirs = torch_cell(variant, input_size, hidden_size)
    for x, bad_hx in ((good_input, torch.randn(1, hidden_size)),   # batch broadcast
                      (good_input, torch.randn(3, 1)),             # hidden_size broadcast
                      (torch.randn(3, 1), good_hx)):               # input_size broadcast
        for hx in state_cases(variant, bad_hx, good_hx):
            raises_as_torch(lambda: ours(x, hx), lambda: theirs(x, hx))  # noqa: B023


@on_every_device
@pytest.mark.parametrize("variant, proj_size", [
    *((variant, proj_size) for variant in VARIANTS for proj_size in (0, 10)), (GRU, 0)],
    ids=[*(f"{variant_id(v)}-proj{p}" for v in VARIANTS for p in (0, 10)), GRU])
def test_cudnn_forward_exception(variant, device, proj_size):
    """(test_nn runs it on cuDNN, for nn.LSTM with and without projections, nn.GRU and nn.RNN;
    the same checks hold on every device here.)"""
    options = {"batch_first": True, "device": device}
    if proj_size:
        options["proj_size"] = proj_size
    ours, theirs = make_lstm(variant, 10, 20, **options), torch_rnn(variant, 10, 20, **options)
    hidden = torch.zeros(1, 2, 19, device=device)
    hidden = hidden if variant == GRU else (hidden, torch.zeros(1, 2, 19, device=device))
    x_wrong, x_right = torch.randn(2, 3, 3, device=device), torch.randn(2, 3, 10, device=device)
    raises_as_torch(lambda: ours(x_right, hidden), lambda: theirs(x_right, hidden),
                    match="Expected hidden.*size.*got")
    raises_as_torch(lambda: ours(x_wrong), lambda: theirs(x_wrong),
                    match=re.escape("input.size(-1) must be equal to input_size"))


@variant_and_gru_params
@on_every_device
@pytest.mark.parametrize("bidirectional", [True, False])
def test_error_RNN_seq_len_zero(variant, device, bidirectional):
    """(test_nn.py: nn.RNN, nn.LSTM and nn.GRU.)"""
    x = torch.ones(0, 10, 5, device=device)
    ours = make_lstm(variant, 5, 6, bidirectional=bidirectional, device=device)
    theirs = torch_rnn(variant, 5, 6, bidirectional=bidirectional, device=device)
    raises_as_torch(lambda: ours(x), lambda: theirs(x),
                    match="Expected sequence length to be larger than 0 in RNN")


# --- ModuleInfo test_errors (common_modules.py: module_error_inputs_torch_nn_RNN_GRU, used for
# LSTM and GRU, module_error_inputs_torch_nn_LSTMCell, and module_error_inputs_torch_nn_RNN_GRU_Cell
# for GRUCell) --------------------------------------------------------------------------------

LSTM_CONSTRUCTION_ERRORS = [  # (args, kwargs, error, regex)
    ((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
    ((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
    ((3, 5), {"bias": 0}, TypeError, "bias should be of type bool, got: int"),
    ((3, 5), {"bias": 1}, TypeError, "bias should be of type bool, got: int"),
    ((3, 5), {"bias": "True"}, TypeError, "bias should be of type bool, got: str"),
    ((3, 5), {"batch_first": 0}, TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), {"batch_first": 1}, TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
    ((3.0, 5), {}, TypeError, "input_size should be of type int, got: float"),
    (("10", 5), {}, TypeError, "input_size should be of type int, got: str"),
    ((0, 5), {}, ValueError, "input_size must be greater than zero"),
    ((-1, 5), {}, ValueError, "input_size must be greater than zero"),
    ((3, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
]


@variant_and_gru_params
@pytest.mark.parametrize("case", LSTM_CONSTRUCTION_ERRORS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_module_info_errors_lstm_construction(variant, case):
    """(The same list for nn.LSTM and nn.GRU.)"""
    args, kwargs, error, regex = case
    raises_as_torch(lambda: make_lstm(variant, *args, **kwargs),
                    lambda: torch_rnn(variant, *args, **kwargs), error, regex)


@variant_and_gru_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_info_errors_lstm_dtype_mismatch(variant, dtype):
    mismatched = torch.float64 if dtype == torch.float32 else torch.float32
    x = torch.randn(2, 4, 3, dtype=mismatched)
    regex = (r"RNN input dtype .* does not match weight dtype .* "
             r"Convert input: input\.to\(.*\), or convert model: model\.to\(.*\)")
    raises_as_torch(lambda: make_lstm(variant, 3, 5, dtype=dtype)(x),
                    lambda: torch_rnn(variant, 3, 5, dtype=dtype)(x), ValueError, regex)


LSTMCELL_FORWARD_ERRORS = [  # (input shape, state shape, error, regex); LSTMCell(10, 20) and
    # GRUCell(10, 20). {state}: nn.LSTMCell names a state of the wrong rank hx[0] (then hx[1]),
    # nn.GRUCell "hidden".
    ((3, 11), (3, 20), RuntimeError, "input has inconsistent input_size: got 11 expected 10"),
    ((3, 10), (3, 21), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ((3, 10), (5, 20), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
    ((3, 10), (3, 1, 1, 20), ValueError, r"Expected {state} to be 1D or 2D, got 4D instead"),
]


@variant_and_gru_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", LSTMCELL_FORWARD_ERRORS, ids=lambda c: c[3][:24])
def test_module_info_errors_lstmcell(variant, dtype, case):
    input_shape, state_shape, error, regex = case
    regex = regex.format(state="hidden" if variant == GRU else r"hx\[0\]")
    x, state = torch.randn(input_shape, dtype=dtype), torch.randn(state_shape, dtype=dtype)
    hx = state if variant == GRU else (state, torch.randn(state_shape, dtype=dtype))
    raises_as_torch(lambda: make_cell(variant, 10, 20, dtype=dtype)(x, hx),
                    lambda: torch_cell(variant, 10, 20, dtype=dtype)(x, hx), error, regex)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_module_info_errors_grucell_third_argument(dtype, nonlinearity):
    """module_error_inputs_torch_nn_RNN_GRU_Cell is shared by RNNCell and GRUCell: its last two
    cases build the cell as RNNCell(10, 20, nonlinearity) and expect the forward's hidden-size
    RuntimeError. For nn.GRUCell the third argument is `bias`, which it never checks ("relu" is
    truthy: a cell with biases), so it fails only in the forward. Deliberate difference
    (docs/guarantees.md: our cells check their constructor arguments as nn.GRU / nn.LSTM do):
    GRUCell refuses the string at construction, with nn.GRU's TypeError for a non-bool bias."""
    x, hx = torch.randn(3, 10, dtype=dtype), torch.randn(3, 21, dtype=dtype)
    theirs = nn.GRUCell(10, 20, nonlinearity, dtype=dtype)
    with pytest.raises(RuntimeError, match="hidden0 has inconsistent hidden_size: got 21, "
                                           "expected 20"):
        theirs(x, hx)
    with pytest.raises(TypeError, match="bias should be of type bool, got: str") as raised:
        lstm_fused.GRUCell(10, 20, nonlinearity, dtype=dtype)
    assert type(raised.value) is TypeError
    raises_as_torch(lambda: lstm_fused.GRUCell(10, 20, True, dtype=dtype)(x, hx),  # as meant
                    lambda: nn.GRUCell(10, 20, True, dtype=dtype)(x, hx),
                    match="hidden0 has inconsistent hidden_size: got 21, expected 20")


# --- ModuleInfo test_gradgrad (module_inputs_torch_nn_LSTM / _LSTMCell, and for the GRU
# module_inputs_torch_nn_RNN_GRU / _RNN_GRU_Cell: unbatched inputs) ----------------------------


def module_gradgradcheck(module, call, inputs, fast_mode):
    """As test_modules' _test_gradients_helper: gradgradcheck of call(*inputs)'s flattened
    outputs with respect to the inputs and every parameter of module (perturbed in place, where
    the module reads them)."""
    params = tuple(module.parameters())

    def run(*flat):
        return tuple(torch.utils._pytree.tree_leaves(call(*flat[:len(inputs)])))

    return torch.autograd.gradgradcheck(run, (*inputs, *params), fast_mode=fast_mode)


def lstm_module_inputs(variant, bias, batch_first, bidirectional, proj_size, with_state):
    """One sample of module_inputs_torch_nn_LSTM: 2 layers of hidden size 3, input [3, 2] and
    the state ([D*2, proj_size or 3], [D*2, 3]) or none; for the GRU, of
    module_inputs_torch_nn_RNN_GRU: 2 layers of hidden size 2 without a state, of hidden size 3
    with h_0 [D*2, 3] (no projection)."""
    rows = 4 if bidirectional else 2
    hidden = 3 if variant != GRU or with_state else 2
    module_args = {"input_size": 2, "hidden_size": hidden, "num_layers": 2, "bias": bias,
                   "batch_first": batch_first, "bidirectional": bidirectional}
    if variant != GRU:
        module_args["proj_size"] = proj_size
    if not with_state:
        return module_args, (torch.randn(3, 2, dtype=torch.float64, requires_grad=True),)
    widths = (hidden,) if variant == GRU else (proj_size or hidden, hidden)
    x, *state = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                 for shape in ((3, 2), *((rows, width) for width in widths)))
    return module_args, (x, state[0] if variant == GRU else tuple(state))


def torch_twin(variant, module, factory, *args, **kwargs):
    """factory(variant, *args, **kwargs) (torch_rnn or torch_cell: torch.nn's module built with
    the options `module` was built with), given `module`'s weights by load_state_dict; None for
    the variants torch.nn has not (peephole, coupled)."""
    if variant not in (GRU, (None, False)):
        return None
    theirs = factory(variant, *args, **kwargs)
    theirs.load_state_dict(module.state_dict())
    return theirs


def assert_derivatives_are_torchs(ours, theirs, call, inputs):
    """call(module, *inputs) gives the same outputs with ours and theirs, the same gradients
    (of a fixed random projection of the outputs, with respect to every input and parameter),
    and the same second derivatives (of the gradients' squared norm, a gradient penalty), in
    float64. (call's inputs are the same tensors for both.)"""
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    results = []
    for module in (ours, theirs):
        wrt = [*inputs, *module.parameters()]
        outputs = torch.utils._pytree.tree_leaves(call(module, *inputs))
        g = torch.Generator().manual_seed(0)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
        grads = torch.autograd.grad(loss, wrt, create_graph=True)
        penalty = sum(grad.pow(2).sum() for grad in grads)
        results.append((outputs, grads, torch.autograd.grad(penalty, wrt, allow_unused=True)))
    (out_a, grad_a, second_a), (out_b, grad_b, second_b) = results
    for what, a, b, tol in (("outputs", out_a, out_b, 1e-12), ("gradients", grad_a, grad_b, 1e-12),
                            ("second derivatives", second_a, second_b, 1e-10)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")  # noqa: B023


GRU_MODULE_INPUTS = [(bias, batch_first, bidirectional, False, with_state)
                     for bias, batch_first, bidirectional, with_state
                     in itertools.product([False, True], repeat=4)]
LSTM_MODULE_INPUTS = list(itertools.product([False, True], repeat=5))


def options_id(options):
    return "".join(map(str, map(int, options)))


@pytest.mark.slow
@pytest.mark.parametrize("variant, options", [
    *((variant, options) for variant in VARIANTS for options in LSTM_MODULE_INPUTS),
    *((GRU, options) for options in GRU_MODULE_INPUTS)], ids=[
    *(f"{options_id(o)}-{variant_id(v)}" for v in VARIANTS for o in LSTM_MODULE_INPUTS),
    *(f"{options_id(o)}-{GRU}" for o in GRU_MODULE_INPUTS)])
def test_module_info_gradgrad_lstm(variant, options):
    """Every sample of module_inputs_torch_nn_LSTM (bias x batch_first x bidirectional x
    proj_size x initial state), and of module_inputs_torch_nn_RNN_GRU for the GRU (the same
    without proj_size), in float64, training mode; fast-mode gradgradcheck (random
    projections of the Jacobians), as the full check of 32 x 6 two-layer modules would take
    minutes; the full check runs on the ops below. Where torch.nn has the module (the GRU, the
    vanilla LSTM), outputs, gradients and second derivatives are also nn.GRU's / nn.LSTM's
    with the same weights."""
    bias, batch_first, bidirectional, proj, with_state = options
    module_args, inputs = lstm_module_inputs(variant, bias, batch_first, bidirectional,
                                             2 if proj else 0, with_state)
    module = make_lstm(variant, **module_args, dtype=torch.float64)
    flat_inputs = torch.utils._pytree.tree_leaves(inputs)

    def run(x, *state):
        if variant == GRU:
            return module(x, state[0] if state else None)
        return module(x, tuple(state) if state else None)

    theirs = torch_twin(variant, module, torch_rnn, **module_args, dtype=torch.float64)
    if theirs is not None:
        assert_derivatives_are_torchs(module, theirs, lambda m, *args: m(*inputs), flat_inputs)
    assert module_gradgradcheck(module, run, flat_inputs, fast_mode=True)


@variant_and_gru_params
@pytest.mark.parametrize("bias", [False, True])
def test_module_info_gradgrad_lstmcell(variant, bias):
    """module_inputs_torch_nn_LSTMCell: unbatched input [5] and state ([10], [10]); for GRUCell,
    module_inputs_torch_nn_RNN_GRU_Cell: input [5] and h_0 [10]; fast-mode gradgradcheck (about
    1,000 parameters: the full check takes 10-20 s a variant here). Where torch.nn has the cell
    (GRUCell, the vanilla LSTMCell), also nn.GRUCell's / nn.LSTMCell's outputs, gradients and
    second derivatives."""
    cell = make_cell(variant, 5, 10, bias=bias, dtype=torch.float64)
    x, h, c = (torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (5, 10, 10))
    if variant == GRU:
        inputs, call = (x, h), lambda m, x, h: m(x, h)
    else:
        inputs, call = (x, h, c), lambda m, x, h, c: m(x, (h, c))
    theirs = torch_twin(variant, cell, torch_cell, 5, 10, bias=bias, dtype=torch.float64)
    if theirs is not None:
        assert_derivatives_are_torchs(cell, theirs, call, inputs)
    assert module_gradgradcheck(cell, lambda *args: call(cell, *args), inputs, fast_mode=True)


# --- double backward of the ops, every variant, float64 ----------------------------------------


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors if t is not None]


def check_double_backward(function, tensors):
    """The gradients of a backward that builds a graph (computed by recomputation) equal the
    fused first-order ones, and gradgradcheck passes on them. (gradgradcheck alone would accept
    a consistently wrong first derivative: it checks the derivative of the gradient.)"""
    def gradients(create_graph):
        outputs = function(*tensors)
        weights = [torch.ones_like(o) * (k + 1) for k, o in enumerate(outputs)]
        return torch.autograd.grad(outputs, tensors, weights, create_graph=create_graph)

    for plain, graphed in zip(gradients(False), gradients(True), strict=True):
        assert graphed.requires_grad
        torch.testing.assert_close(graphed, plain, rtol=1e-10, atol=1e-12)
    return torch.autograd.gradgradcheck(function, tensors)


@variant_params
@on_every_device
@pytest.mark.parametrize("proj", [0, 2])
def test_gradgradcheck_fused_cell(variant, device, proj):
    peephole, coupled = variant
    g = torch.Generator().manual_seed(1)
    params = make_params(3, 4, peephole=peephole, coupled=coupled, proj=proj, generator=g)
    x, h, c = (torch.randn(2, n, generator=g, dtype=torch.float64) for n in (3, proj or 4, 4))
    tensors = [t.to(device) for t in _leaves(x, h, c, *params)]

    def cell(x, h, c, *weights):
        it = iter(weights)
        full = [next(it) if p is not None else None for p in params]
        return functional.lstm_cell(x, h, c, *full, peephole=peephole, coupled=coupled)

    assert check_double_backward(cell, tensors)


@variant_params
@on_every_device
@pytest.mark.parametrize("packed, reverse, proj", [(False, False, 0), (False, True, 2),
                                                   (True, False, 2), (True, True, 0)],
                         ids=["padded", "padded-reverse-proj", "packed-proj", "packed-reverse"])
def test_gradgradcheck_fused_layer(variant, device, packed, reverse, proj):
    """gradgradcheck of functional.lstm_layer (T=3, B=3, I=2, H=3) with respect to the input,
    both states and every parameter."""
    peephole, coupled = variant
    g = torch.Generator().manual_seed(2)
    params = make_params(2, 3, peephole=peephole, coupled=coupled, proj=proj, generator=g)
    batch_sizes = [3, 2, 1] if packed else None
    x = torch.randn(6, 2, generator=g, dtype=torch.float64) if packed else torch.randn(
        3, 3, 2, generator=g, dtype=torch.float64)
    h, c = (torch.randn(3, n, generator=g, dtype=torch.float64) for n in (proj or 3, 3))
    tensors = [t.to(device) for t in _leaves(x, h, c, *params)]

    def layer(x, h, c, *weights):
        it = iter(weights)
        full = [next(it) if p is not None else None for p in params]
        out, (h_n, c_n) = functional.lstm_layer(x, h, c, *full, peephole=peephole,
                                                coupled=coupled, reverse=reverse,
                                                batch_sizes=batch_sizes)
        return out, h_n, c_n

    assert check_double_backward(layer, tensors)


@variant_params
def test_gradient_penalty_matches_the_reference(variant):
    """A gradient penalty (the input gradient's norm, differentiated again) of a 2-layer
    bidirectional packed LSTM gives the reference twin's parameter gradients."""
    lengths = [4, 3, 1]
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    ours = make_lstm(variant, 2, 3, num_layers=2, bidirectional=True, proj_size=2,
                     dtype=torch.float64)
    twin = make_lstm(variant, 2, 3, num_layers=2, bidirectional=True, proj_size=2,
                     dtype=torch.float64)
    twin.load_state_dict(ours.state_dict())
    twin._layer_fn = reference.lstm_layer
    grads = []
    for module in (ours, twin):
        data = x.clone().requires_grad_()
        out, _ = module(pack_padded_sequence(data, lengths))
        (grad_x,) = torch.autograd.grad(out.data.sin().sum(), data, create_graph=True)
        grads.append(torch.autograd.grad(grad_x.pow(2).sum(), list(module.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_first_order_backward_never_recomputes():
    """The recomputation is only for a backward that builds a graph: a plain backward of the
    layer and the cell runs the fused backward kernels alone."""
    lstm = lstm_fused.PeepholeLSTM(3, 4, num_layers=2)
    cell = lstm_fused.CoupledLSTMCell(3, 4, peephole="full")
    with mock.patch.object(_double_backward, "differentiable_gradients",
                           side_effect=AssertionError("recomputed")):
        lstm(torch.randn(5, 2, 3, requires_grad=True))[0].sum().backward()
        cell(torch.randn(2, 3, requires_grad=True))[0].sum().backward()
        with pytest.raises(AssertionError, match="recomputed"):  # and the patch is effective
            x = torch.randn(2, 3, requires_grad=True)
            torch.autograd.grad(cell(x)[0].sum(), x, create_graph=True)


# --- nn.LSTM's flat-weight attributes: test_rnn_weight_norm, test_rnn_pruning, and more --------


def count_parameters(module):
    return sum(isinstance(p, nn.Parameter) for p in module._flat_weights)


@variant_params
@pytest.mark.parametrize("proj_size", [0, 4])
def test_rnn_weight_norm(variant, proj_size):
    """weight_norm makes one _flat_weights entry a plain tensor; removing it restores the
    Parameter under its own name, without the _g/_v parts."""
    name = "weight_hr_l0" if proj_size else "weight_ih_l0"
    module = make_lstm(variant, 8, 8, proj_size=proj_size)
    num_params = len(list(module.parameters()))
    x = torch.randn(3, 2, 8)
    module = nn.utils.weight_norm(module, name=name)
    assert count_parameters(module) == num_params - 1
    module(x)  # the forward pre-hook recomputes the weight
    module = nn.utils.remove_weight_norm(module, name=name)
    assert count_parameters(module) == num_params
    assert name in module._parameters and module._parameters[name] is not None
    named = dict(module.named_parameters())
    assert name in named and named[name] is not None
    for part in (name + "_v", name + "_g"):
        assert part not in module._parameters and part not in named


@variant_params
def test_rnn_pruning(variant):
    module = make_lstm(variant, 8, 8)
    num_params = len(list(module.parameters()))
    prune.l1_unstructured(module, "weight_ih_l0", 0.5)
    assert count_parameters(module) == num_params - 1
    assert (module._flat_weights[0] == 0).float().mean() == 0.5  # the pruned weight is used
    prune.remove(module, "weight_ih_l0")
    assert count_parameters(module) == num_params
    assert module._parameters["weight_ih_l0"] is not None
    assert "weight_ih_l0_orig" not in module._parameters
    named = dict(module.named_parameters())
    assert named["weight_ih_l0"] is not None and "weight_ih_l0_orig" not in named


@pytest.mark.parametrize("options", [
    {}, {"bias": False}, {"proj_size": 2}, {"num_layers": 2, "bidirectional": True},
    {"num_layers": 2, "bias": False, "proj_size": 2, "bidirectional": True}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_flat_weights_are_those_of_nn_lstm(options):
    """For the vanilla variant the names, order and tensors are nn.LSTM's."""
    theirs = nn.LSTM(3, 4, **options)
    ours = lstm_fused.LSTM.from_torch(theirs)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights
    for a, b in zip(ours._flat_weights, theirs._flat_weights, strict=True):
        assert torch.equal(a, b)
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [
        [w.shape for w in ws] for ws in theirs.all_weights]
    assert ours.flatten_parameters() is None


@variant_params
def test_flat_weights_follow_replaced_parameters(variant):
    """_flat_weights and all_weights are the module's current tensors after to(),
    load_state_dict, assignment and a parametrization; peepholes sit before weight_hr."""
    module = make_lstm(variant, 3, 4, num_layers=2, proj_size=2)
    names = module._flat_weights_names
    assert set(names) == {name for name, _ in module.named_parameters()}
    assert ("weight_ch_l0" in names) == (variant[0] is not None)
    if variant[0] is not None:
        assert names.index("weight_ch_l0") == names.index("weight_hr_l0") - 1

    def in_sync():
        return all(a is getattr(module, n) for a, n in zip(module._flat_weights, names))

    module.to(torch.float64)
    assert in_sync() and module._flat_weights[0].dtype == torch.float64
    module.load_state_dict({k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()})
    assert in_sync() and all((w == 0.5).all() for w in module._flat_weights)
    module.weight_hh_l1 = nn.Parameter(torch.ones_like(module.weight_hh_l1))
    assert in_sync() and module.all_weights[1][1] is module.weight_hh_l1
    weight = module.weight_ih_l0.detach().clone()
    parametrizations.weight_norm(module, "weight_ih_l0")
    assert not isinstance(module._flat_weights[0], nn.Parameter)
    with torch.no_grad():
        module.parametrizations.weight_ih_l0.original0.mul_(2)  # the norms g
    torch.testing.assert_close(module._flat_weights[0], 2 * weight)


# --- isinstance and torch.ao.quantization ----------------------------------------------------


def test_modules_are_not_torch_rnn_subclasses():
    """Deliberate (README): torch code that dispatches on nn.LSTM / nn.RNNBase (quantization,
    ONNX export, cuDNN weight flattening) would treat a peephole or coupled module as the
    vanilla LSTM it is not."""
    assert not isinstance(lstm_fused.LSTM(3, 4), nn.RNNBase)
    assert not isinstance(lstm_fused.LSTMCell(3, 4), nn.RNNCellBase)
    assert not isinstance(lstm_fused.GRU(3, 4), nn.RNNBase)
    assert not isinstance(lstm_fused.GRUCell(3, 4), nn.RNNCellBase)


@variant_params
def test_quantize_dynamic_leaves_the_lstm_in_float_and_says_so(variant):
    """Default quantize_dynamic: the Linear is quantized, our module stays in floating point
    (same outputs) with a warning that says so."""
    model = nn.Sequential()
    model.add_module("lstm", make_lstm(variant, 3, 4))
    model.add_module("head", nn.Linear(4, 2))
    x = torch.randn(5, 2, 3)
    expected = model.lstm(x)[0]
    with pytest.warns(UserWarning, match=r"leaves lstm_fused\.LSTM .* in floating point"):
        quantized = quantize_dynamic(model)
    assert type(quantized.head) is torch.ao.nn.quantized.dynamic.Linear
    assert type(quantized.lstm) is lstm_fused.LSTM
    torch.testing.assert_close(quantized.lstm(x)[0], expected, rtol=0, atol=0)


@variant_params
@pytest.mark.parametrize("spec", ["our type", "global qconfig"])
def test_quantize_dynamic_refuses_to_quantize_our_modules(variant, spec):
    """Asked to quantize one of our modules, quantize_dynamic fails with a clear error instead
    of returning it unquantized."""
    for module in (make_lstm(variant, 3, 4), make_cell(variant, 3, 4)):
        qconfig_spec = {type(module)} if spec == "our type" else {"": default_dynamic_qconfig}
        with pytest.raises(NotImplementedError, match="cannot be quantized by torch.ao"):
            quantize_dynamic(nn.Sequential(module), qconfig_spec=qconfig_spec)


@pytest.mark.parametrize("module_class", [lstm_fused.GRU, lstm_fused.GRUCell])
def test_quantize_dynamic_and_the_gru(module_class):
    """The GRU as the LSTM: left in floating point with a warning by default, refused when asked
    for, and quantized by torch through to_torch()."""
    model = nn.Sequential(module_class(3, 4), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    expected = model[0](x)
    with pytest.warns(UserWarning, match=rf"leaves lstm_fused\.{module_class.__name__} in "):
        quantized = quantize_dynamic(model)
    assert type(quantized[0]) is module_class
    torch.testing.assert_close(quantized[0](x), expected, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="cannot be quantized by torch.ao"):
        quantize_dynamic(nn.Sequential(module_class(3, 4)), qconfig_spec={module_class})
    torch_class = getattr(torch.ao.nn.quantized.dynamic, module_class.__name__)
    converted = quantize_dynamic(nn.Sequential(module_class(3, 4).to_torch()),
                                 {getattr(nn, module_class.__name__)})
    assert type(converted[0]) is torch_class


def test_vanilla_model_quantizes_through_to_torch():
    """The way the error message advises for the vanilla variant."""
    ours = lstm_fused.LSTM(3, 4)
    quantized = quantize_dynamic(nn.Sequential(ours.to_torch()), {nn.LSTM})
    assert type(quantized[0]) is torch.ao.nn.quantized.dynamic.LSTM

