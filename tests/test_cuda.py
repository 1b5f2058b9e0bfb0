"""The CUDA suite (`make test-gpu`, pytest -m cuda): the CPU correctness checks on CUDA, CPU vs
CUDA agreement per dtype, autocast, a training step captured in a CUDA graph and replayed,
torch.compile(mode="reduce-overhead"), peak memory of a layer, and no host synchronisation; for
the LSTM variants and the GRU (its ops gru_layer_forward/backward and gru_cell_step, GRU and
GRUCell against the CPU, cuDNN's nn.GRU and the float32 reference).

Without a GPU every test here is reported as skipped, with the reason (pytest -rs)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TOLERANCES,
    VARIANTS,
    gradcheck_fused_cell,
    grid,
    layer_op_args,
    make_weight_ch,
    variant_id,
    variant_params,
)
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import reference
from lstm_fused.ops import BUILT_WITH_CUDA, OP_NAMES, ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device: torch.cuda.is_available() is False; these tests "
                              "run on a machine with a GPU (make test-gpu)"),
]

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# CPU vs CUDA: same kernels' math, different GEMM summation order; relative to the largest value.
AGREEMENT_TOL = TOLERANCES["devices"]


@pytest.fixture(autouse=True)
def ieee_float32():
    """No TF32 in cuBLAS/cuDNN, so float32 comparisons are against float32 math."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def to_device(value, device=CUDA):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def assert_agree(actual, expected, dtype, what, tol=None):
    """actual (CUDA) vs expected (CPU, cuDNN or the float32 reference), relative to the largest
    expected value; tol defaults to AGREEMENT_TOL[dtype]."""
    assert actual.dtype == dtype and actual.is_cuda, f"{what}: {actual.dtype} {actual.device}"
    assert actual.shape == expected.shape, f"{what}: {actual.shape} vs {expected.shape}"
    if expected.numel() == 0:
        return
    tol = AGREEMENT_TOL[dtype] if tol is None else tol
    expected = expected.to(actual.device, torch.float64)
    scale = expected.abs().max().clamp(min=1.0)
    error = (actual.double() - expected).abs().max()
    assert error <= tol * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"


def random_like(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in tensors]


# The modules of the module-level tests: every LSTM variant, and the GRU.
GRU = "gru"
MODULES = [*VARIANTS, GRU]
module_params = pytest.mark.parametrize("variant", MODULES,
                                        ids=[variant_id(v) for v in VARIANTS] + [GRU])


def make_module(variant, *args, **kwargs):
    """lstm_fused.GRU for variant GRU, else lstm_fused.LSTM with the variant's options."""
    if variant == GRU:
        return lstm_fused.GRU(*args, **kwargs)
    peephole, coupled = variant
    return lstm_fused.LSTM(*args, peephole=peephole, coupled=coupled, **kwargs)


def states_of(finals):
    """A module's final states as a tuple: (h_n, c_n) for an LSTM, (h_n,) for a GRU."""
    return (finals,) if isinstance(finals, torch.Tensor) else tuple(finals)


def gru_layer_op_args(dtype, packed, reverse, bias, generator, device="cpu"):
    """Arguments of torch.ops.lstm_fused.gru_layer_forward for a small layer (T=4, B=3, I=5,
    H=6), padded or packed (batch sizes 3, 3, 2, 1)."""
    T, B, I, H = 4, 3, 5, 6

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.5).to(dtype=dtype, device=device)

    batch_sizes = [3, 3, 2, 1] if packed else None
    x = rand(sum(batch_sizes), I) if packed else rand(T, B, I)
    biases = (rand(3 * H), rand(3 * H)) if bias else (None, None)
    return (x, rand(B, H), rand(3 * H, I), rand(3 * H, H), *biases, batch_sizes, reverse)


def test_every_op_has_a_cuda_kernel():
    assert BUILT_WITH_CUDA, "a GPU is present but lstm_fused was built without CUDA kernels"
    for name in (*OP_NAMES, "cell_step", "gru_cell_step"):  # and the cells' one-op steps
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{name}", "CUDA"), name


# --- CPU vs CUDA, op by op -------------------------------------------------------------------


@variant_params
@grid(dtype=DTYPES, batch=[1, 5], hidden=[3, 33, 257])
def test_cell_ops_agree_with_cpu(variant, dtype, batch, hidden):
    peephole, coupled = variant
    kind = peephole or "none"
    g = torch.Generator().manual_seed(batch * 1000 + hidden)
    G = 3 if coupled else 4
    gates = torch.randn(batch, G * hidden, generator=g).to(dtype)
    c_prev = torch.randn(batch, hidden, generator=g).to(dtype)
    weight_ch = make_weight_ch(peephole, coupled, hidden, g, dtype)
    args = (gates, c_prev, weight_ch, kind, coupled)
    expected = ops.cell_forward(*args)
    got = ops.cell_forward(*to_device(args))
    for a, b, name in zip(got, expected, ("h", "c", "gates_out")):
        assert_agree(a, b, dtype, name)

    _, c, gates_out = expected
    grad_h, grad_c = random_like([c, c], seed=1)
    for gh, gc in [(grad_h, grad_c), (None, grad_c), (grad_h, None)]:
        args = (gh, gc, gates_out, c_prev, c, weight_ch, kind, coupled)
        expected = ops.cell_backward(*args)
        got = ops.cell_backward(*to_device(args))
        for a, b, name in zip(got, expected, ("grad_gates", "grad_c_prev", "grad_weight_ch")):
            assert_agree(a, b, dtype, name)


@variant_params
@grid(dtype=DTYPES, batch=[1, 5], hidden=[3, 33, 257])
def test_cell_step_agrees_with_cpu(variant, dtype, batch, hidden):
    """torch.ops.lstm_fused.cell_step (both GEMMs and the fused kernel, one op) on CUDA."""
    peephole, coupled = variant
    g = torch.Generator().manual_seed(batch * 1000 + hidden + 7)
    G, I = (3 if coupled else 4), 11

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype)

    args = (rand(batch, I), rand(batch, hidden), rand(batch, hidden), rand(G * hidden, I),
            rand(G * hidden, hidden), rand(G * hidden), rand(G * hidden),
            make_weight_ch(peephole, coupled, hidden, g, dtype), peephole or "none", coupled)
    expected = ops.cell_step(*args)
    got = ops.cell_step(*to_device(args))
    for a, b, name in zip(got, expected, ("h", "c")):
        assert_agree(a, b, dtype, name)


@variant_params
def test_cell_latency_path_runs_cell_step_on_cuda(variant):
    """LSTMCell under no_grad on CUDA: one cell_step op, the results of the general path."""
    peephole, coupled = variant
    torch.manual_seed(0)
    cell = lstm_fused.LSTMCell(12, 20, peephole=peephole, coupled=coupled).to(CUDA)
    x, state = torch.randn(3, 12, device=CUDA), (torch.randn(3, 20, device=CUDA),
                                                 torch.randn(3, 20, device=CUDA))
    expected = cell(x, state)
    with torch.profiler.profile() as prof, torch.no_grad():
        got = cell(x, state)
    assert "lstm_fused::cell_step" in {e.key for e in prof.key_averages()}
    for a, b, name in zip(got, expected, ("h", "c")):
        assert_agree(a, b.detach(), torch.float32, name)


def test_cell_step_under_cuda_autocast_runs_in_float16():
    """The autocast kernel casts every float32 argument to float16 (CUDA autocast's default)."""
    g = torch.Generator().manual_seed(4)
    args = [torch.randn(*shape, generator=g) * 0.5
            for shape in ((3, 8), (3, 16), (3, 16), (64, 8), (64, 16), (64,), (64,))]
    args = to_device(args)
    with torch.autocast("cuda"):
        h, c = ops.cell_step(*args, None, "none", False)
    assert h.dtype == c.dtype == torch.float16
    expected = ops.cell_step(*[a.half() for a in args], None, "none", False)
    assert torch.equal(h, expected[0]) and torch.equal(c, expected[1])


@variant_params
@grid(dtype=DTYPES, packed=[False, True], reverse=[False, True], proj=[0, 2])
def test_layer_ops_agree_with_cpu(variant, dtype, packed, reverse, proj):
    args = layer_op_args(variant, dtype, packed, reverse, proj, torch.Generator().manual_seed(2))
    expected = ops.layer_forward(*args)
    got = ops.layer_forward(*to_device(args))
    for a, b, name in zip(got, expected, ("output", "h_n", "c_n", "gates", "cells")):
        assert_agree(a, b, dtype, name)

    out, h_n, c_n, gates, cells = expected
    backward_args = (*random_like([out, h_n, c_n], seed=3), *args[:9], out, gates, cells,
                     *args[9:], True)
    expected = ops.layer_backward(*backward_args)
    got = ops.layer_backward(*to_device(backward_args))
    names = ("grad_input", "grad_h0", "grad_c0", "grad_weight_ih", "grad_weight_hh", "grad_bias",
             "grad_weight_ch", "grad_weight_hr")
    for a, b, name in zip(got, expected, names):
        assert_agree(a, b, dtype, name)


@grid(dtype=DTYPES, packed=[False, True], reverse=[False, True], bias=[True, False])
def test_gru_layer_ops_agree_with_cpu(dtype, packed, reverse, bias):
    args = gru_layer_op_args(dtype, packed, reverse, bias, torch.Generator().manual_seed(2))
    expected = ops.gru_layer_forward(*args)
    got = ops.gru_layer_forward(*to_device(args))
    for a, b, name in zip(got, expected, ("output", "h_n", "gates"), strict=True):
        assert_agree(a, b, dtype, name)

    out, h_n, gates = expected
    backward_args = (*random_like([out, h_n], seed=3), *args[:6], out, gates, *args[6:], True)
    expected = ops.gru_layer_backward(*backward_args)
    got = ops.gru_layer_backward(*to_device(backward_args))
    names = ("grad_input", "grad_h0", "grad_weight_ih", "grad_weight_hh", "grad_bias_ih",
             "grad_bias_hh")
    for a, b, name in zip(got, expected, names, strict=True):
        assert_agree(a, b, dtype, name)


@grid(dtype=DTYPES, batch=[1, 5], hidden=[3, 33, 257], bias=[True, False])
def test_gru_cell_step_agrees_with_cpu(dtype, batch, hidden, bias):
    """torch.ops.lstm_fused.gru_cell_step (both GEMMs and the fused kernel, one op) on CUDA."""
    g = torch.Generator().manual_seed(batch * 1000 + hidden + 9)
    I = 11

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype)

    biases = (rand(3 * hidden), rand(3 * hidden)) if bias else (None, None)
    args = (rand(batch, I), rand(batch, hidden), rand(3 * hidden, I), rand(3 * hidden, hidden),
            *biases)
    assert_agree(ops.gru_cell_step(*to_device(args)), ops.gru_cell_step(*args), dtype, "h")


def test_gru_cell_latency_path_runs_gru_cell_step_on_cuda():
    """GRUCell under no_grad on CUDA: one gru_cell_step op, the results of the general path."""
    torch.manual_seed(0)
    cell = lstm_fused.GRUCell(12, 20).to(CUDA)
    x, h = torch.randn(3, 12, device=CUDA), torch.randn(3, 20, device=CUDA)
    expected = cell(x, h)
    with torch.profiler.profile() as prof, torch.no_grad():
        got = cell(x, h)
    assert "lstm_fused::gru_cell_step" in {e.key for e in prof.key_averages()}
    assert_agree(got, expected.detach(), torch.float32, "h")


@variant_params
@grid(dtype=[torch.float32, torch.float64], packed=[False, True], proj=[0, 2],
      layer_norm=[False, True])
def test_layer_ops_with_zoneout_agree_with_cpu(variant, dtype, packed, proj, layer_norm):
    """Zoneout's keep masks (and cell_clip) through the CUDA layer ops, forward and backward,
    without and with layer norm's rows."""
    g = torch.Generator().manual_seed(4)
    args = layer_op_args(variant, dtype, packed, False, proj, g)
    lead, R, H = args[0].shape[:-1], args[1].shape[-1], args[2].shape[-1]
    keeps = tuple((torch.rand(*lead, width, generator=g) < 0.5).to(dtype) for width in (R, H))
    gates = 3 if variant[1] else 4
    norm = ((1 + 0.2 * torch.randn(gates, H, generator=g)).to(dtype),) if layer_norm else ()
    extra = (True, 0.4, 0.0, *keeps, *norm)
    expected = ops.layer_forward(*args, *extra)
    got = ops.layer_forward(*to_device(args), *to_device(extra))
    for a, b, name in zip(got, expected, ("output", "h_n", "c_n", "gates", "cells")):
        assert_agree(a, b, dtype, name)
    out, h_n, c_n, gates, cells = expected
    backward_args = (*random_like([out, h_n, c_n], seed=3), *args[:9], out, gates, cells,
                     *args[9:], True, 0.4, 0.0, *keeps, *norm)
    expected = ops.layer_backward(*backward_args)
    got = ops.layer_backward(*to_device(backward_args))
    for k, (a, b) in enumerate(zip(got, expected)):
        assert_agree(a, b, dtype, f"gradient {k}")


def test_keep_mask_on_the_gpu_equals_the_cpu_bit_for_bit():
    """The same key gives the same zoneout mask on the GPU (its key stays in device memory) as
    on the CPU, in every dtype."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        seed = torch.tensor([-987654321987], dtype=torch.int64)
        expected = ops.keep_mask(seed, [33, 65, 7], 0.3, dtype)
        got = ops.keep_mask(seed.to(CUDA), [33, 65, 7], 0.3, dtype)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)


def test_zoneout_module_draws_masks_on_the_gpu_and_matches_cpu():
    """The masks come from the CUDA generator (torch.manual_seed seeds it): the same seed twice
    is bit-identical; eval (the rates) agrees with the CPU module."""
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(5, 16, num_layers=2, zoneout=(0.3, 0.5))
    x = torch.randn(7, 4, 5)
    gpu = copy.deepcopy(lstm).to(CUDA)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(gpu(x.to(CUDA))[0])
    assert torch.equal(runs[0], runs[1])
    lstm.eval()
    gpu.eval()
    with torch.no_grad():
        assert_agree(gpu(x.to(CUDA))[0], lstm(x)[0], torch.float32, "eval output")


def test_grid_stride_loop_beyond_the_maximum_grid():
    """More elements than 65535 blocks x 256 threads: each thread must loop."""
    rows, hidden = 2 * 65535, 257
    g = torch.Generator().manual_seed(4)
    gates = torch.randn(rows, 4 * hidden, generator=g).half()
    c_prev = torch.randn(rows, hidden, generator=g).half()
    expected = ops.cell_forward(gates, c_prev, None, "none", False)
    got = ops.cell_forward(gates.to(CUDA), c_prev.to(CUDA), None, "none", False)
    for a, b, name in zip(got, expected, ("h", "c", "gates_out")):
        assert_agree(a, b, torch.float16, name)


# --- the CPU correctness checks, on CUDA -----------------------------------------------------


@variant_params
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_layer_on_cuda(variant, packed):
    peephole, coupled = variant
    torch.manual_seed(0)
    module = lstm_fused.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2,
                             peephole=peephole, coupled=coupled, device=CUDA, dtype=torch.float64)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(3, 2, 2, device=CUDA, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, device=CUDA, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, device=CUDA, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *ps):
        inp = pack_padded_sequence(x, torch.tensor([3, 2])) if packed else x
        out, (h_n, c_n) = torch.func.functional_call(module, dict(zip(names, ps)), (inp, (h0, c0)))
        return (out.data if packed else out), h_n, c_n

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


@variant_params
def test_gradcheck_cell_on_cuda(variant):
    assert gradcheck_fused_cell(*variant, device=CUDA)


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_gru_on_cuda(packed):
    torch.manual_seed(0)
    module = lstm_fused.GRU(2, 3, num_layers=2, bidirectional=True, device=CUDA,
                            dtype=torch.float64)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(3, 2, 2, device=CUDA, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, device=CUDA, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *ps):
        inp = pack_padded_sequence(x, torch.tensor([3, 2])) if packed else x
        out, h_n = torch.func.functional_call(module, dict(zip(names, ps)), (inp, h0))
        return (out.data if packed else out), h_n

    assert torch.autograd.gradcheck(f, (x, h0, *params))


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_gru_cell_on_cuda(bias):
    torch.manual_seed(0)
    cell = lstm_fused.GRUCell(4, 5, bias=bias, device=CUDA, dtype=torch.float64)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x = torch.randn(3, 4, device=CUDA, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 5, device=CUDA, dtype=torch.float64, requires_grad=True)

    def f(x, h, *ps):
        return torch.func.functional_call(cell, dict(zip(names, ps)), (x, h))

    assert torch.autograd.gradcheck(f, (x, h, *params))


def run_module(module, x, lengths=None):
    """(padded output, h_n[, c_n]) and the gradients of a fixed random loss w.r.t. x and
    params (an LSTM's or a GRU's)."""
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, finals = module(inp)
    if lengths is not None:
        out = pad_packed_sequence(out)[0]
    outputs = (out, *states_of(finals))
    weights = random_like(outputs, seed=11)
    loss = sum((t.double() * w.double()).sum() for t, w in zip(outputs, weights))
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [*outputs, *grads]


@grid(dtype=[torch.float64, torch.float32], bidirectional=[False, True], proj=[0, 3],
      packed=[False, True])
def test_vanilla_matches_cudnn_lstm(dtype, bidirectional, proj, packed):
    torch.manual_seed(5)
    kwargs = {"num_layers": 2, "bidirectional": bidirectional, "proj_size": proj,
              "device": CUDA, "dtype": dtype}
    theirs = torch.nn.LSTM(7, 16, **kwargs)
    ours = lstm_fused.LSTM(7, 16, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 4, 7, device=CUDA, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([9, 3, 7, 5]) if packed else None
    names = ["output", "h_n", "c_n", "grad input"] + [n for n, _ in ours.named_parameters()]
    with torch.backends.cudnn.flags(enabled=True):
        expected = run_module(theirs, x, lengths)
    for a, b, name in zip(run_module(ours, x, lengths), expected, names):
        assert_agree(a, b, dtype, name)


@grid(dtype=[torch.float64, torch.float32], bidirectional=[False, True], packed=[False, True],
      bias=[True, False])
def test_gru_matches_cudnn_gru(dtype, bidirectional, packed, bias):
    torch.manual_seed(5)
    kwargs = {"num_layers": 2, "bidirectional": bidirectional, "bias": bias, "device": CUDA,
              "dtype": dtype}
    theirs = torch.nn.GRU(7, 16, **kwargs)
    ours = lstm_fused.GRU(7, 16, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 4, 7, device=CUDA, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([9, 3, 7, 5]) if packed else None
    names = ["output", "h_n", "grad input"] + [n for n, _ in ours.named_parameters()]
    with torch.backends.cudnn.flags(enabled=True):
        expected = run_module(theirs, x, lengths)
    got = run_module(ours, x, lengths)
    assert len(got) == len(expected) == len(names)
    for a, b, name in zip(got, expected, names):
        assert_agree(a, b, dtype, name)


@grid(bias=[True, False], batched=[True, False])
def test_gru_cell_matches_torch_gru_cell_on_cuda(bias, batched):
    torch.manual_seed(5)
    theirs = torch.nn.GRUCell(7, 16, bias=bias, device=CUDA, dtype=torch.float64)
    ours = lstm_fused.GRUCell.from_torch(theirs)
    x = torch.randn(4, 7, device=CUDA, dtype=torch.float64)
    h = torch.randn(4, 16, device=CUDA, dtype=torch.float64)
    if not batched:
        x, h = x[0], h[0]

    def run(cell):
        leaves = [x.clone().requires_grad_(), h.clone().requires_grad_()]
        out = cell(*leaves)
        loss = (out * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)).sum()
        return [out, *torch.autograd.grad(loss, [*leaves, *cell.parameters()])]

    for a, b in zip(run(ours), run(theirs), strict=True):
        assert_agree(a, b, torch.float64, "GRUCell vs nn.GRUCell")


@variant_params
@grid(dtype=DTYPES, proj=[0, 3])
def test_layer_matches_float32_reference_on_cuda(variant, dtype, proj):
    """Every variant in every dtype against the plain-PyTorch reference run in float32."""
    peephole, coupled = variant
    torch.manual_seed(6)
    kwargs = {"num_layers": 2, "bidirectional": True, "proj_size": proj, "peephole": peephole,
              "coupled": coupled, "device": CUDA}
    ours = lstm_fused.LSTM(5, 12, dtype=dtype, **kwargs)
    ref = lstm_fused.LSTM(5, 12, dtype=torch.float32, **kwargs)
    ref._layer_fn = reference.lstm_layer
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x = torch.randn(6, 3, 5, device=CUDA)
    got = run_module(ours, x.to(dtype).requires_grad_())
    expected = run_module(ref, x.clone().requires_grad_())
    names = ["output", "h_n", "c_n", "grad input"] + [n for n, _ in ours.named_parameters()]
    for a, b, name in zip(got, expected, names):
        assert_agree(a, b, dtype, name, tol=max(AGREEMENT_TOL[dtype], 1e-5))


@grid(dtype=DTYPES, packed=[False, True])
def test_gru_matches_float32_reference_on_cuda(dtype, packed):
    """The GRU in every dtype, padded and packed, against the plain-PyTorch reference run in
    float32 on CUDA; and the GRUCell."""
    torch.manual_seed(6)
    kwargs = {"num_layers": 2, "bidirectional": True, "device": CUDA}
    ours = lstm_fused.GRU(5, 12, dtype=dtype, **kwargs)
    ref = lstm_fused.GRU(5, 12, dtype=torch.float32, **kwargs)
    ref._layer_fn = reference.gru_layer
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x = torch.randn(6, 3, 5, device=CUDA)
    lengths = torch.tensor([6, 2, 4]) if packed else None
    got = run_module(ours, x.to(dtype).requires_grad_(), lengths)
    expected = run_module(ref, x.clone().requires_grad_(), lengths)
    names = ["output", "h_n", "grad input"] + [n for n, _ in ours.named_parameters()]
    assert len(got) == len(expected) == len(names)
    for a, b, name in zip(got, expected, names):
        assert_agree(a, b, dtype, name, tol=max(AGREEMENT_TOL[dtype], 1e-5))

    cell = lstm_fused.GRUCell(5, 12, device=CUDA, dtype=dtype)
    params = [p.float() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    h = torch.randn(3, 12, device=CUDA)
    assert_agree(cell(x[0].to(dtype), h.to(dtype)), reference.gru_cell(x[0], h, *params), dtype,
                 "GRUCell", tol=max(AGREEMENT_TOL[dtype], 1e-5))


@pytest.mark.parametrize("coupled", [False, True])
def test_full_peephole_with_diagonal_blocks_equals_diagonal_on_cuda(coupled):
    torch.manual_seed(7)
    kwargs = {"num_layers": 2, "coupled": coupled, "device": CUDA, "dtype": torch.float64}
    diag = lstm_fused.LSTM(4, 6, peephole="diagonal", **kwargs)
    full = lstm_fused.LSTM(4, 6, peephole="full", **kwargs)
    state = {k: (torch.cat([torch.diag(row) for row in v]) if k.startswith("weight_ch") else v)
             for k, v in diag.state_dict().items()}
    full.load_state_dict(state)
    x = torch.randn(5, 3, 4, device=CUDA, dtype=torch.float64, requires_grad=True)
    names = ["output", "h_n", "c_n", "grad input"]
    for a, b, name in zip(run_module(full, x)[:4], run_module(diag, x)[:4], names):
        assert_agree(a, b, torch.float64, name)


def test_coupled_layer_equals_standard_with_negated_forget_weights_on_cuda():
    """sigma(-z) = 1 - sigma(z): a coupled LSTM is nn.LSTM (cuDNN) whose input-gate weights and
    biases are minus the forget gate's."""
    torch.manual_seed(16)
    H = 6
    ours = lstm_fused.CoupledLSTM(4, H, num_layers=2, bidirectional=True, device=CUDA,
                                  dtype=torch.float64)
    theirs = torch.nn.LSTM(4, H, num_layers=2, bidirectional=True, device=CUDA,
                           dtype=torch.float64)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            getattr(theirs, name).copy_(torch.cat([-p[:H], p]))
    x = torch.randn(5, 3, 4, device=CUDA, dtype=torch.float64)
    out, (h_n, c_n) = ours(x)
    expected_out, (expected_h_n, expected_c_n) = theirs(x)
    for a, b, name in zip((out, h_n, c_n), (expected_out, expected_h_n, expected_c_n),
                          ("output", "h_n", "c_n")):
        assert_agree(a, b, torch.float64, name)


@variant_params
def test_strided_and_broadcast_inputs_on_cuda(variant):
    """The kernels read rows with any stride, even a broadcast (stride 0) cell state."""
    peephole, coupled = variant
    kind = peephole or "none"
    g = torch.Generator().manual_seed(17)
    B, H, G = 5, 9, (3 if coupled else 4)
    gates = torch.randn(B, 2 * G * H, generator=g).to(CUDA)[:, ::2]
    c_row = torch.randn(1, H, generator=g).to(CUDA)
    weight_ch = to_device(make_weight_ch(peephole, coupled, H, g))
    got = ops.cell_forward(gates, c_row.expand(B, H), weight_ch, kind, coupled)
    expected = ops.cell_forward(gates.contiguous(), c_row.repeat(B, 1), weight_ch, kind, coupled)
    for a, b, name in zip(got, expected, ("h", "c", "gates_out")):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@variant_params
def test_kernels_per_time_step_on_cuda(variant):
    """CUDA kernels per step, counted by the profiler, are those docs/gpu.md counts (one more per
    GEMM allowed: cuBLAS may split a GEMM in two)."""
    import gpu_step_cost  # benchmarks/, on sys.path above

    peephole, coupled = variant
    module = lstm_fused.LSTM(8, 16, peephole=peephole, coupled=coupled, device=CUDA)
    model_variant = next(v for v in gpu_step_cost.VARIANTS
                         if (v.peephole, v.coupled) == (peephole, coupled))
    for direction in ("forward", "backward"):
        expected = gpu_step_cost.launches_per_step(model_variant, direction)
        per_step, kernels = gpu_step_cost.kernels_per_step(module, 4, direction)
        assert expected <= per_step <= 1.5 * expected, (direction, per_step, expected, kernels)


@module_params
def test_zero_length_and_empty_batch_on_cuda(variant):
    """An empty batch runs (empty outputs, zero-row states); an empty sequence raises what
    torch.nn.LSTM / nn.GRU raise (as on the CPU, test_reliability.py), before any kernel runs."""
    m = make_module(variant, 3, 4, device=CUDA)
    out, finals = m(torch.randn(5, 0, 3, device=CUDA))
    assert out.shape == (5, 0, 4) and out.is_cuda
    assert all(s.shape == (1, 0, 4) and s.is_cuda for s in states_of(finals))
    with pytest.raises(RuntimeError, match="sequence length"):
        m(torch.randn(0, 2, 3, device=CUDA))


def test_gru_layer_op_on_an_empty_sequence_returns_h0_on_cuda():
    args = to_device(gru_layer_op_args(torch.float32, False, False, True,
                                       torch.Generator().manual_seed(7)))
    out, h_n, _ = ops.gru_layer_forward(args[0][:0], *args[1:])
    assert out.shape == (0, 3, 6) and out.is_cuda
    torch.testing.assert_close(h_n, args[1], rtol=0, atol=0)


@variant_params
def test_opcheck_every_op_on_cuda(variant):
    args = to_device(layer_op_args(variant, torch.float32, True, False, 2,
                                   torch.Generator().manual_seed(8)))
    differentiable = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                      for a in args]
    torch.library.opcheck(ops.layer_forward, args)
    torch.library.opcheck(ops.layer_forward, differentiable)
    out, h_n, c_n, gates, cells = ops.layer_forward(*args)
    torch.library.opcheck(ops.layer_backward, (*random_like([out, h_n, c_n], seed=9), *args[:9],
                                               out, gates, cells, *args[9:], True))
    peephole, coupled = variant
    G, H = (3 if coupled else 4), 6
    g = torch.Generator().manual_seed(10)
    gates = torch.randn(3, G * H, generator=g).to(CUDA)
    c_prev = torch.randn(3, H, generator=g).to(CUDA)
    weight_ch = to_device(make_weight_ch(peephole, coupled, H, g))
    kind = peephole or "none"
    torch.library.opcheck(ops.cell_forward, (gates, c_prev, weight_ch, kind, coupled))
    _, c, gates_out = ops.cell_forward(gates, c_prev, weight_ch, kind, coupled)
    torch.library.opcheck(ops.cell_backward, (*random_like([c, c], seed=12), gates_out, c_prev, c,
                                              weight_ch, kind, coupled))


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_gru_ops_on_cuda(packed):
    args = to_device(gru_layer_op_args(torch.float32, packed, False, True,
                                       torch.Generator().manual_seed(8)))
    differentiable = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                      for a in args]
    torch.library.opcheck(ops.gru_layer_forward, args)
    torch.library.opcheck(ops.gru_layer_forward, differentiable)
    out, h_n, gates = ops.gru_layer_forward(*args)
    torch.library.opcheck(ops.gru_layer_backward, (*random_like([out, h_n], seed=9), *args[:6],
                                                   out, gates, *args[6:], True))
    x, h0, weight_ih, weight_hh, bias_ih, bias_hh = args[:6]
    step_input = x if packed else x[0]
    torch.library.opcheck(ops.gru_cell_step, (step_input[:3], h0, weight_ih, weight_hh, bias_ih,
                                              bias_hh))


@module_params
def test_training_on_cuda_reduces_loss(variant):
    torch.manual_seed(0)
    model = make_module(variant, 1, 16, num_layers=2, batch_first=True, device=CUDA)
    head = torch.nn.Linear(16, 1, device=CUDA)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    x = torch.randn(64, 12, 1, device=CUDA)
    y = x.cumsum(1) / torch.arange(1, 13, device=CUDA).view(1, 12, 1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(head(model(x)[0]), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    assert losses[-1] < 0.25 * losses[0], (losses[0].item(), losses[-1].item())


# --- autocast ----------------------------------------------------------------------------------


@module_params
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_runs_in_the_autocast_dtype(variant, dtype):
    torch.manual_seed(13)
    model = make_module(variant, 8, 32, num_layers=2, device=CUDA)
    head = torch.nn.Linear(32, 1, device=CUDA)
    x = torch.randn(10, 4, 8, device=CUDA, requires_grad=True)
    params = [x, *model.parameters(), *head.parameters()]
    expected_out = model(x)[0]
    expected = torch.autograd.grad(head(expected_out).sum(), params)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)[0]
        loss = head(out).float().sum()
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), expected_out, rtol=tol, atol=tol)
    for got, want in zip(torch.autograd.grad(loss, params), expected):
        assert got.dtype == torch.float32  # gradients of float32 leaves stay float32
        torch.testing.assert_close(got, want, rtol=5 * tol, atol=5 * tol)


def test_cuda_autocast_cell_with_float32_state():
    cell = lstm_fused.PeepholeLSTMCell(5, 16, device=CUDA)
    x, h, c = (torch.randn(4, n, device=CUDA) for n in (5, 16, 16))
    with torch.autocast("cuda"):  # float16 is CUDA autocast's default
        h1, c1 = cell(x, (h, c))
    assert h1.dtype == c1.dtype == torch.float16


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_cuda_autocast_gru_cell_with_float32_state(grad):
    """GRUCell under CUDA autocast with a float32 state, on the training path (gru_layer_forward)
    and the no_grad latency path (gru_cell_step): float16 out, close to the float32 cell."""
    torch.manual_seed(1)
    cell = lstm_fused.GRUCell(5, 16, device=CUDA)
    x, h = torch.randn(4, 5, device=CUDA), torch.randn(4, 16, device=CUDA)
    with torch.no_grad():
        expected = cell(x, h)
    with torch.set_grad_enabled(grad), torch.autocast("cuda"):
        got = cell(x, h)
    assert got.dtype == torch.float16
    assert_agree(got, expected, torch.float16, "GRUCell under autocast",
                 tol=TOLERANCES["autocast"][torch.float16])


# --- CUDA graphs and torch.compile -------------------------------------------------------------


def make_training_setup(variant):
    torch.manual_seed(14)
    model = torch.nn.ModuleDict({
        "lstm": make_module(variant, 8, 32, num_layers=2, device=CUDA),
        "head": torch.nn.Linear(32, 1, device=CUDA)})

    def loss_fn(x, y):
        return torch.nn.functional.mse_loss(model["head"](model["lstm"](x)[0]), y)

    return model, loss_fn


def batches(count):
    g = torch.Generator().manual_seed(15)
    return [(torch.randn(20, 16, 8, generator=g).to(CUDA),
             torch.randn(20, 16, 1, generator=g).to(CUDA)) for _ in range(count)]


@module_params
def test_training_step_captured_in_a_cuda_graph(variant):
    """Forward, backward and optimizer step of an LSTM (or GRU), captured once and replayed on
    new data, give the same losses and weights as the same steps run eagerly."""
    model, loss_fn = make_training_setup(variant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:
            opt.zero_grad(set_to_none=True)
            loss_fn(x, y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)

    eager_model = copy.deepcopy(model)
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)

    def eager_loss_fn(x, y):
        return torch.nn.functional.mse_loss(eager_model["head"](eager_model["lstm"](x)[0]), y)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_fn(static_x, static_y)
        static_loss.backward()
        opt.step()

    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        eager_opt.zero_grad(set_to_none=True)
        eager_loss = eager_loss_fn(x, y)
        eager_loss.backward()
        eager_opt.step()
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[4], GRU],
                         ids=["standard", "coupled-diag", "gru"])
def test_torch_compile_reduce_overhead(variant):
    """mode="reduce-overhead" runs the step through CUDA graph trees: the fused ops must not make
    inductor skip cudagraphs, and results equal eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, loss_fn = make_training_setup(variant)
    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    for x, y in batches(4):
        expected = loss_fn(x, y)
        expected_grads = torch.autograd.grad(expected, list(model.parameters()))
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(x, y)
        grads = torch.autograd.grad(got, list(model.parameters()))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


# --- memory and synchronisation ----------------------------------------------------------------


def layer_design_bytes(T, B, I, H, G, P, peephole, element_size, param_bytes):
    """Peak bytes a one-layer fwd+bwd allocates beyond its inputs, counted from the design
    (docs/design.md section 4, csrc/layer.cpp). Per row of the N = T*B rows, in the storage dtype:
    forward, kept for backward: gates G*H, cells H, output H; backward: the incoming output
    gradient H, grad_z G*H, the previous outputs H (for dW_hh), grad_input I; with peepholes
    also the previous cells H and peephole_grad's float temporaries (the products, P*H; for
    half types also the float copies of dz and c it multiplies, 2*H at its peak). Plus
    parameter gradients."""
    N = T * B
    per_row = (2 * G * H + 4 * H + I) * element_size
    if peephole:
        products = P * H if element_size == 4 else (P + 2) * H
        per_row += H * element_size + products * 4
    return N * per_row + param_bytes


@variant_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_of_layer_forward_backward(variant, dtype):
    """Peak allocated bytes of a layer fwd+bwd stay within 25% (+2 MiB of allocator rounding and
    per-step buffers) of the design count, and above what must be saved."""
    peephole, coupled = variant
    T, B, I, H = 50, 32, 64, 256
    G, P = (3, 2) if coupled else (4, 3)
    module = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, device=CUDA, dtype=dtype)
    x = torch.randn(T, B, I, device=CUDA, dtype=dtype, requires_grad=True)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    # Warm-up: cuBLAS allocates its workspace (through PyTorch's allocator) on a stream's first
    # GEMM; it must be in the baseline, not counted as the layer's peak.
    module(x)[0].sum().backward()
    x.grad = None
    module.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    out, _ = module(x)
    out.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    element = x.element_size()
    saved = T * B * (G * H + H) * element
    assert peak >= saved, (peak, saved)  # the gates and cells really are kept for backward
    bound = 1.25 * layer_design_bytes(T, B, I, H, G, P, peephole, element, param_bytes) + (2 << 20)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"


@module_params
@pytest.mark.parametrize("packed", [False, True])
def test_no_host_synchronisation_in_layer_forward_backward(variant, packed):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call (including
    copies from pageable host memory) made while the ops run."""
    module = make_module(variant, 4, 8, num_layers=2, bidirectional=True, device=CUDA)
    x = torch.randn(6, 3, 4, device=CUDA, requires_grad=True)
    inp = pack_padded_sequence(x, torch.tensor([6, 4, 2])) if packed else x
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, finals = module(inp)
        data = out.data if packed else out
        (data.sum() + sum(s.sum() for s in states_of(finals))).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and x.grad.is_cuda


def test_kernels_show_in_the_cuda_profiler_with_their_names():
    module = lstm_fused.LSTM(4, 8, peephole="diagonal", coupled=True, device=CUDA)
    x = torch.randn(5, 2, 4, device=CUDA, requires_grad=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        module(x)[0].sum().backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert {"lstm_fused::layer_forward", "lstm_fused::layer_backward"} <= names
    for direction in ("forward", "backward"):
        assert any(f"lstm_fused_pointwise_{direction}<float, " in n
                   and "coupled_diagonal_peephole" in n for n in names), sorted(names)


def test_gru_kernels_show_in_the_cuda_profiler_with_their_names():
    module = lstm_fused.GRU(4, 8, device=CUDA)
    x = torch.randn(5, 2, 4, device=CUDA, requires_grad=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        module(x)[0].sum().backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert {"lstm_fused::gru_layer_forward", "lstm_fused::gru_layer_backward"} <= names
    for direction in ("forward", "backward"):
        assert any(f"lstm_fused_gru_{direction}<float>" in n for n in names), sorted(names)
