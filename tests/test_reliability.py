"""Inputs that are legal but unusual (strided, broadcast, empty, NaN/Inf, huge offsets), and
repeated or concurrent use: same answers every time, no crash, no memory growth; for every LSTM
variant and the GRU."""

import gc
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import VARIANTS, assert_close, load_host_shim, variant_id, variant_params
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from lstm_fused import reference
from lstm_fused.ops import ops

T, B, I, H = 6, 3, 4, 5

# The module-level tests run every LSTM variant and the GRU (variant GRU).
GRU = "gru"
module_params = pytest.mark.parametrize("variant", [*VARIANTS, GRU],
                                        ids=[variant_id(v) for v in VARIANTS] + [GRU])


def module_pair(peephole, coupled, dtype=torch.float64, **kwargs):
    """(fused module, the same module running the plain-PyTorch reference layer); the GRU for
    peephole == GRU (coupled ignored)."""
    torch.manual_seed(0)
    if peephole == GRU:
        fused = lstm_fused.GRU(I, H, dtype=dtype, **kwargs)
        twin = lstm_fused.GRU(I, H, dtype=dtype, **kwargs)
        twin._layer_fn = reference.gru_layer
    else:
        fused = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, dtype=dtype, **kwargs)
        twin = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled, dtype=dtype, **kwargs)
        twin._layer_fn = reference.lstm_layer
    twin.load_state_dict(fused.state_dict())
    return fused, twin


def unpack(variant):
    """(peephole, coupled) of a variant, (GRU, False) for the GRU: module_pair's arguments."""
    return (GRU, False) if variant == GRU else variant


def states_of(finals):
    """A module's final states as a tuple: (h_n, c_n) for an LSTM, (h_n,) for a GRU."""
    return (finals,) if isinstance(finals, torch.Tensor) else tuple(finals)


def outputs_and_grads(module, x, hx=None):
    """Forward, then gradients of a fixed weighting of all outputs w.r.t. x and parameters."""
    x = x.detach().requires_grad_()
    out, finals = module(x, hx)
    outputs = (out, *states_of(finals))
    weights = torch.Generator().manual_seed(1)
    loss = sum((t * torch.rand(t.shape, generator=weights, dtype=t.dtype)).sum()
               for t in outputs)
    grads = torch.autograd.grad(loss, [x, *module.parameters()], allow_unused=True)
    return [*outputs, *grads]


# --- layouts -----------------------------------------------------------------------------------


def strided_layouts(x, h0, c0):
    """The same values as (x, h0, c0) in non-contiguous and broadcast (stride 0) layouts."""
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)       # [T, B, I] with batch outermost
    x_step = torch.stack([x, -x], dim=-1).flatten(-2)[..., ::2]   # every other feature
    x_wide = torch.zeros(T, B, I + 3, dtype=x.dtype)[..., :I]   # rows longer than I
    x_wide.copy_(x)
    row = x[:, :1].expand(T, B, I)                               # one sequence broadcast to B
    state = h0[:, :1].expand_as(h0), c0[:, :1].expand_as(c0)
    return {"transposed": ((x_t, (h0, c0)), (x, (h0, c0))),
            "strided features": ((x_step, (h0, c0)), (x, (h0, c0))),
            "padded rows": ((x_wide, (h0, c0)), (x, (h0, c0))),
            "expanded input and state": ((row, state),
                                         (row.contiguous(), tuple(s.contiguous() for s in state)))}


@module_params
@pytest.mark.parametrize("layout", ["transposed", "strided features", "padded rows",
                                    "expanded input and state"])
def test_non_contiguous_and_expanded_inputs_give_the_contiguous_result(variant, layout):
    fused, _ = module_pair(*unpack(variant), num_layers=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, B, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(2, B, H, generator=g, dtype=torch.float64)
    (strided, strided_hx), (contiguous, contiguous_hx) = strided_layouts(x, h0, c0)[layout]
    assert not strided.is_contiguous()
    if variant == GRU:  # the GRU's state is h alone
        strided_hx, contiguous_hx = strided_hx[0], contiguous_hx[0]
    got = outputs_and_grads(fused, strided, strided_hx)
    want = outputs_and_grads(fused, contiguous, contiguous_hx)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, layout)


# --- empty batch and empty sequence, as nn.LSTM ------------------------------------------------


EMPTY_CASES = {"plain": (torch.nn.LSTM, {}), "batch_first": (torch.nn.LSTM, {"batch_first": True}),
               "bidirectional": (torch.nn.LSTM, {"bidirectional": True}),
               "projected-2-layers": (torch.nn.LSTM, {"proj_size": 2, "num_layers": 2}),
               "gru": (torch.nn.GRU, {}), "gru-batch_first": (torch.nn.GRU, {"batch_first": True}),
               "gru-bidirectional-2-layers": (torch.nn.GRU, {"bidirectional": True,
                                                             "num_layers": 2})}


@pytest.mark.parametrize("torch_class, options", EMPTY_CASES.values(), ids=EMPTY_CASES.keys())
def test_empty_batch_and_empty_sequence_behave_as_torch_lstm(torch_class, options):
    """As torch.nn.LSTM (torch.nn.GRU for the GRU)."""
    torch.manual_seed(0)
    theirs = torch_class(I, H, **options)
    ours = (lstm_fused.GRU if torch_class is torch.nn.GRU else lstm_fused.LSTM).from_torch(theirs)
    empty_batch = torch.randn(*((0, T) if options.get("batch_first") else (T, 0)), I,
                              requires_grad=True)
    results = []
    for module in (ours, theirs):
        out, finals = module(empty_batch)
        (out.sum() + sum(s.sum() for s in states_of(finals))).backward()
        results.append([out, *states_of(finals), empty_batch.grad,
                        *[p.grad for p in module.parameters()]])
        empty_batch.grad = None
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)  # outputs empty, parameter gradients zero
    empty_sequence = torch.randn(*((B, 0) if options.get("batch_first") else (0, B)), I)
    with pytest.raises(RuntimeError, match="sequence length"):
        theirs(empty_sequence)
    with pytest.raises(RuntimeError, match="sequence length"):
        ours(empty_sequence)


@variant_params
def test_empty_batch_of_every_variant_and_the_cell(variant):
    peephole, coupled = variant
    fused, twin = module_pair(peephole, coupled, bidirectional=True)
    for a, b in zip(outputs_and_grads(fused, torch.randn(T, 0, I, dtype=torch.float64)),
                    outputs_and_grads(twin, torch.randn(T, 0, I, dtype=torch.float64))):
        assert a.shape == b.shape
        assert_close(a, b, torch.float64, "empty batch")
    cell = lstm_fused.LSTMCell(I, H, peephole=peephole, coupled=coupled)
    h, c = cell(torch.randn(0, I))
    assert h.shape == c.shape == (0, H)


def test_empty_batch_of_the_gru_and_its_cell():
    fused, twin = module_pair(GRU, False, bidirectional=True, num_layers=2)
    for a, b in zip(outputs_and_grads(fused, torch.randn(T, 0, I, dtype=torch.float64)),
                    outputs_and_grads(twin, torch.randn(T, 0, I, dtype=torch.float64)),
                    strict=True):
        assert a.shape == b.shape
        assert_close(a, b, torch.float64, "empty batch")
    cell = lstm_fused.GRUCell(I, H)
    x = torch.randn(0, I, requires_grad=True)
    h = cell(x)
    assert h.shape == (0, H)
    h.sum().backward()
    assert x.grad.shape == (0, I) and all(not p.grad.any() for p in cell.parameters())
    with torch.no_grad():  # the one-op latency path
        assert cell(torch.randn(0, I), torch.randn(0, H)).shape == (0, H)


# --- NaN and Inf ---------------------------------------------------------------------------------


def poisoned_input():
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[1, 0, 0] = float("nan")
    x[2, 1, 1] = float("inf")
    x[3, 2, 2] = float("-inf")
    return x


@module_params
def test_nan_and_inf_propagate_as_in_the_reference(variant):
    fused, twin = module_pair(*unpack(variant), bidirectional=True)
    x = poisoned_input()
    got, want = outputs_and_grads(fused, x), outputs_and_grads(twin, x)
    assert got[0].isnan().any()  # the NaN did reach the output
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, equal_nan=True)


@pytest.mark.parametrize("torch_class", [torch.nn.LSTM, torch.nn.GRU], ids=["lstm", "gru"])
def test_nan_and_inf_propagate_as_in_torch_lstm(torch_class):
    torch.manual_seed(0)
    theirs = torch_class(I, H, num_layers=2, dtype=torch.float64)
    ours = (lstm_fused.GRU if torch_class is torch.nn.GRU else lstm_fused.LSTM).from_torch(theirs)
    x = poisoned_input()
    for a, b in zip(ours(x)[0], theirs(x)[0]):
        assert_close(a, b, torch.float64, equal_nan=True)


def test_nan_and_inf_propagate_through_the_gru_cell_as_in_torch():
    torch.manual_seed(0)
    theirs = torch.nn.GRUCell(I, H, dtype=torch.float64)
    ours = lstm_fused.GRUCell.from_torch(theirs)
    x = poisoned_input()
    h = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):
        got, want = ours(x[t], h), theirs(x[t], h)
        assert_close(got, want, torch.float64, f"step {t}", equal_nan=True)
        h = want
    assert h.isnan().any()


# --- index arithmetic past 2^31 ------------------------------------------------------------------


def strided_past_int32(rows):
    """rows [n, width] as a view whose row n-1 starts 2^31 * (n-1) elements after row 0 (8 GB
    of float32 reserved, only the touched pages are ever backed by memory)."""
    n, width = rows.shape
    stride = 2 ** 31
    base = torch.empty(stride * (n - 1) + width, dtype=rows.dtype)
    view = base.as_strided((n, width), (stride, 1))
    view.copy_(rows)
    return view


CELL_OPS = {"cpu kernels": lambda *args: ops.cell_forward(*args),
            "cuda kernels on the host shim":
                lambda *args: load_host_shim().cell_forward(*args, 0, 0)}


@pytest.mark.parametrize("kernels", list(CELL_OPS))
@variant_params
def test_row_offsets_past_2_to_the_31_elements(variant, kernels):
    """The kernels compute row offsets in 64 bits: a row 2^31 elements away is read from there
    (a 32-bit product would wrap to a negative offset and read or crash elsewhere)."""
    peephole, coupled = variant
    g = torch.Generator().manual_seed(4)
    G = 3 if coupled else 4
    gates, c_prev = torch.randn(2, G * H, generator=g), torch.randn(2, H, generator=g)
    weight_ch = {"diagonal": torch.randn((G - 1), H, generator=g),
                 "full": torch.randn((G - 1) * H, H, generator=g)}.get(peephole)
    far_gates, far_c_prev = strided_past_int32(gates), strided_past_int32(c_prev)
    assert far_gates.stride(0) * far_gates.element_size() > 2 ** 32
    run = CELL_OPS[kernels]
    got = run(far_gates, far_c_prev, weight_ch, peephole or "none", coupled)
    want = run(gates, c_prev, weight_ch, peephole or "none", coupled)
    for a, b in zip(got, want):  # full peepholes: BLAS may round a strided GEMM differently
        assert_close(a, b, torch.float32, kernels)


# --- determinism -----------------------------------------------------------------------------


@module_params
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_repeated_runs_are_bit_identical(variant, packed):
    options = {} if variant == GRU else {"proj_size": 2}
    fused, _ = module_pair(*unpack(variant), dtype=torch.float32, num_layers=2,
                           bidirectional=True, **options)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(5)).requires_grad_()
    lengths = torch.tensor([T, T - 2, 1])

    def run():
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, finals = fused(inp)
        out = out.data if packed else out
        loss = ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
                + sum(s.sum() for s in states_of(finals)))
        return [out, *states_of(finals), *torch.autograd.grad(loss, [x, *fused.parameters()])]

    first = run()
    for _ in range(3):
        for a, b in zip(run(), first):
            assert torch.equal(a, b)


# --- long runs ---------------------------------------------------------------------------------


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_2000_forward_backward_calls_do_not_grow_resident_memory():
    torch.manual_seed(0)
    # Sizes where a tensor kept alive by every call (e.g. the saved gates, 5*32*4*32 floats)
    # would add up to well over the bound, while each call still takes about a millisecond.
    models = [lstm_fused.LSTM(16, 32, peephole=p, coupled=c, bidirectional=c, proj_size=8 * c)
              for p, c in VARIANTS] + [lstm_fused.GRU(16, 32, bidirectional=True)]
    cell = lstm_fused.LSTMCell(16, 32, peephole="full")
    gru_cell = lstm_fused.GRUCell(16, 32)
    x = torch.randn(5, 32, 16, requires_grad=True)
    lengths = torch.arange(32, 0, -1).clamp(max=5)

    def call(i):
        """One forward+backward: the cell, or a layer variant on padded or packed input."""
        if i % (len(models) + 1) == len(models):
            outputs = (*cell(x[0]), gru_cell(x[0]))
            with torch.no_grad():  # and the GRUCell's one-op latency path
                gru_cell(x[0])
        else:
            out, finals = models[i % (len(models) + 1)](
                pack_padded_sequence(x, lengths) if i % 2 else x)
            outputs = (out.data, *states_of(finals))
        sum(t.sum() for t in outputs).backward()

    # One intra-op thread: the calls are tiny, and on a busy machine waking a thread pool for
    # each of them costs more than the work (a leak is a leak on any number of threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(100):  # warm-up: allocator caches, oneDNN primitives, lazy initialisation
            call(i)
        gc.collect()
        before = resident_bytes()
        for i in range(2000):
            call(i)
        gc.collect()
        growth = resident_bytes() - before
    finally:
        torch.set_num_threads(threads)
    print(f"resident memory growth over 2000 calls: {growth / 2 ** 20:.2f} MB")
    assert growth < 10 * 2 ** 20, f"resident memory grew by {growth / 2 ** 20:.1f} MB"


# --- threads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [("diagonal", True), GRU], ids=["diagonal-coupled", GRU])
def test_concurrent_forwards_from_threads_match_the_single_threaded_result(variant):
    model, _ = module_pair(*unpack(variant), num_layers=2, bidirectional=True)
    inputs = [torch.randn(T, B, I, dtype=torch.float64) for _ in range(4)]
    expected = [outputs_and_grads(model, x) for x in inputs]
    start = threading.Barrier(len(inputs))

    def worker(k):
        start.wait()  # all threads inside the op at once, not one after another
        return [outputs_and_grads(model, inputs[k]) for _ in range(10)]

    with ThreadPoolExecutor(len(inputs)) as pool:
        futures = [pool.submit(worker, k) for k in range(len(inputs))]
        results = [future.result() for future in futures]  # re-raises a thread's exception
    for k, runs in enumerate(results):
        assert len(runs) == 10
        for got in runs:
            for a, b in zip(got, expected[k]):
                assert_close(a, b, torch.float64, f"thread {k}")
