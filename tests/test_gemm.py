"""The time loops' CPU GEMMs (csrc/gemm.cpp, lstm_fused.cpu_gemm): every path (ATen, oneDNN,
MKL's packed GEMM) gives the reference's results, forward and backward, padded and packed; the
automatic choice is measured once per shape and cached; a forced path is used, deterministic and
overridable; inference (no_grad) saves nothing for backward and, projecting the input a chunk of
steps at a time, gives the training forward's outputs; the cell's latency path under no_grad gives
the general path's results."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, VARIANTS, assert_close, layer_op_args, variant_id, variant_params
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import _C, cpu_gemm, functional, reference

PATHS = ["aten", "onednn", "packed", "simd"]


def require(path, dtype=torch.float32):
    if path not in cpu_gemm.available(dtype):
        pytest.skip(f"the {path} GEMM path does not run {dtype} here "
                    f"(available: {cpu_gemm.available(dtype)})")


@pytest.fixture(autouse=True)
def restore_mode():
    previous = cpu_gemm.get_mode()
    yield
    cpu_gemm.set_mode(previous)


def forward_backward(module, x, lengths):
    x = x.clone().requires_grad_()
    inp = pack_padded_sequence(x, lengths) if lengths is not None else x
    out, (h, c) = module(inp)
    if lengths is not None:
        out = pad_packed_sequence(out)[0]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().add(h.square().sum()).add(c.sum()).backward()
    return [out, h, c, x.grad] + [p.grad for p in module.parameters()]


def twins(variant, input_size=5, hidden=7, **kwargs):
    peephole, coupled = variant
    torch.manual_seed(0)
    fused = lstm_fused.LSTM(input_size, hidden, peephole=peephole, coupled=coupled, **kwargs)
    ref = lstm_fused.LSTM(input_size, hidden, peephole=peephole, coupled=coupled, **kwargs)
    ref.load_state_dict(fused.state_dict())
    ref._layer_fn = reference.lstm_layer
    return fused, ref


@variant_params
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_each_cpu_gemm_path_matches_reference(variant, path, packed):
    require(path)
    cpu_gemm.set_mode(path)
    fused, ref = twins(variant, num_layers=2, bidirectional=True, proj_size=3)
    x = torch.randn(6, 4, 5)
    lengths = torch.tensor([6, 5, 3, 1]) if packed else None
    for a, b in zip(forward_backward(fused, x, lengths), forward_backward(ref, x, lengths)):
        assert_close(a, b, torch.float32, path)


@pytest.mark.parametrize("path", PATHS)
def test_each_path_at_a_blocked_size_matches_reference(path):
    """Sizes where the libraries take their blocked kernels (4H = 256 outputs, 16 rows)."""
    require(path)
    cpu_gemm.set_mode(path)
    fused, ref = twins(("full", False), input_size=48, hidden=64)
    x = torch.randn(5, 16, 48) * 0.5
    for a, b in zip(forward_backward(fused, x, None), forward_backward(ref, x, None)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def events(module, x):
    with torch.profiler.profile() as prof:
        module(x)[0].sum().backward()
    return {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("path", PATHS)
def test_a_forced_path_is_the_one_used(path):
    """Per step (T = 12): ATen adds with addmm, oneDNN runs _linear_pointwise; the packed path
    calls MKL directly, with no ATen GEMM op per step."""
    require(path)
    cpu_gemm.set_mode(path)
    module, x = lstm_fused.LSTM(16, 32), torch.randn(12, 4, 16)
    seen = events(module, x)
    linear, addmm = seen.get("mkldnn::_linear_pointwise", 0), seen.get("aten::addmm_", 0)
    if path == "onednn":
        assert linear >= 2 * 12
    elif path == "aten":
        assert addmm >= 12 and linear == 0
    else:
        assert addmm + linear + seen.get("aten::mm", 0) < 12, seen
    # simd: the forward's GEMM and pointwise step are one kernel per step
    assert (seen.get("lstm_fused::recurrent_step", 0) == 12) == (path == "simd"), seen


def test_a_forced_path_falls_back_to_aten_where_it_cannot_run_the_dtype():
    cpu_gemm.set_mode("packed")  # MKL's packed GEMM is float32 only
    module = lstm_fused.LSTM(4, 8).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert events(module, x).get("aten::addmm_", 0) >= 3
    assert "packed" not in cpu_gemm.available(torch.float64)


@pytest.mark.parametrize("batch", [1, 32, 33, 200])
def test_simd_path_runs_the_fused_step_at_every_batch_size(batch):
    """A layer's recurrent GEMM packs its weight once per call (the panel form), so the fused
    step is not limited to few rows (the dot form of one-off GEMMs is, to 32)."""
    cpu_gemm.set_mode("simd")
    module = lstm_fused.LSTM(8, 16)
    seen = events(module, torch.randn(3, batch, 8))
    assert seen.get("lstm_fused::recurrent_step", 0) == 3 and seen.get("aten::addmm_", 0) == 0


@pytest.mark.parametrize("steps, batch", [(1, 1), (32, 1), (33, 1), (16, 2), (17, 2), (8, 4),
                                          (9, 4), (3, 9), (4, 9), (1, 32), (1, 33)])
def test_a_short_call_reads_the_weights_as_stored(steps, batch):
    """A call of at most 32 rows in all (T * B: streaming inference, a short sequence at a small
    batch) takes dot products over W_ih as it is stored (the input projection, a one-off GEMM of
    T * B rows), and over W_hh too at batches up to 4 (the loop's recurrent GEMM, B rows T
    times), as the LSTMCell step does: packing 1 MiB of weight each (H = 256) at every call would
    cost more than the short forward itself. Otherwise each weight is packed, once per call. The
    choice says which form its simd path took."""
    require("simd")
    cpu_gemm.set_mode("simd")
    module, x = lstm_fused.LSTM(8, 16), torch.randn(steps, batch, 8)
    with torch.no_grad(), torch.profiler.profile() as prof:
        module(x)
    seen = {e.key: e.count for e in prof.key_averages()}
    few = steps * batch <= 32
    packs = (not few) + (not few or batch > 4)
    assert seen.get("lstm_fused::pack_weight", 0) == packs, seen
    assert seen.get("lstm_fused::recurrent_step", 0) == steps, seen
    cpu_gemm.set_mode("auto")  # a measured choice (forced paths are not) shows the form
    cpu_gemm.clear()
    with torch.no_grad():
        module(x)
    repeated = [c for c in cpu_gemm.choices() if c.repeated]
    assert [c.weight_as_stored for c in repeated] == [few and batch <= 4], repeated


@pytest.mark.parametrize("hidden, input_size, rows", [(7, 5, 1), (16, 16, 4), (37, 19, 16),
                                                      (64, 100, 3), (130, 33, 2), (20, 17, 5),
                                                      (33, 31, 7), (16, 16, 17), (65, 40, 31),
                                                      (9, 8, 32), (47, 9, 9), (48, 20, 13),
                                                      (49, 16, 24), (97, 12, 22)])
@pytest.mark.parametrize("variant", [(None, False), ("diagonal", False), ("diagonal", True),
                                     ("full", False)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_simd_kernels_match_the_reference_at_every_width(hidden, input_size, rows, variant,
                                                         packed):
    """Weight rows and K that are not multiples of the SIMD width: the dot kernel's partial
    tiles and masked K tail (one-off GEMMs of up to 32 rows, row blocks of 4, then 2 and 1), the
    panel kernel's zero-padded last panel of each gate and its tiles of 3, 2 and 1 panels by 1
    to 8 rows (the time loop's GEMMs, and one-off GEMMs of more rows: 6 * 22 and 6 * 24
    input rows, over 128, take its row-split form), forward and backward; full peepholes take
    the simd GEMM without the fused step. Packed input keeps h in a running state that the fused
    step reads from every thread: it must not be overwritten while the step runs."""
    cpu_gemm.set_mode("simd")
    fused, ref = twins(variant, input_size=input_size, hidden=hidden)
    x = torch.randn(6, rows, input_size)
    lengths = torch.arange(6, 6 - rows, -1).clamp(min=1) if packed else None
    for _ in range(3):  # a race shows only sometimes
        for a, b in zip(forward_backward(fused, x, lengths), forward_backward(ref, x, lengths)):
            assert_close(a, b, torch.float32, "simd")


def test_balanced_chunks_give_the_bits_of_one_thread_whoever_runs_them():
    """From 8 rows the fused step's chunks go to whichever thread is free (run_balanced): three
    threads on this machine's cores are descheduled in turn, so their chunks change hands from one
    call to the next; every output is still the one-thread result bit for bit, in the step and in
    the chunked input projection."""
    cpu_gemm.set_mode("simd")
    module, x = lstm_fused.LSTM(40, 200), torch.randn(12, 37, 40)
    threads = torch.get_num_threads()
    try:
        with cpu_gemm.projection_chunks(37 * 4), torch.no_grad():
            torch.set_num_threads(1)
            expected = module(x)[0]
            torch.set_num_threads(3)
            for _ in range(20):
                assert torch.equal(module(x)[0], expected)
    finally:
        torch.set_num_threads(threads)


def thread_team(threads, jobs, late_us=0, work_us=0, throw_at=-1, team_size=2):
    """_C._thread_team_test in a team of `team_size` threads: each job's runs per slot, and
    each job's slots that the calling thread ran (1) or another (0)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(team_size)
        counts = _C._thread_team_test(threads, jobs, late_us, work_us, throw_at)
    finally:
        torch.set_num_threads(before)
    per_job = [counts[j * threads:(j + 1) * threads] for j in range(2 * jobs)]
    return per_job[:jobs], per_job[jobs:]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_thread_team_runs_every_slot_once(threads):
    """A time loop's steps hand their shares to a team of threads kept for the whole loop
    (thread_team.h): every slot of every job runs exactly once, also slots past the team's
    threads (5 slots, 2 threads: the caller's thread runs those)."""
    runs, _ = thread_team(threads, jobs=50, work_us=20)
    assert runs == [[1] * threads] * 50


def test_thread_team_threads_take_their_own_slots():
    """With its threads on time (spinning between jobs) each thread takes its own slot: the
    caller's thread slot 0, the other slot 1, in at least 15 of 20 jobs. Another process that
    holds the other thread off its core takes that from a run (its slots then run on the
    caller's thread, correctly): up to 5 runs, one must show it."""
    own = []
    for _ in range(5):
        runs, on_caller = thread_team(2, jobs=20, work_us=2000)
        assert runs == [[1, 1]] * 20
        own.append(sum(caller_ran == [1, 0] for caller_ran in on_caller))
        if own[-1] >= 15:
            return
    pytest.fail(f"jobs whose slots ran on their own threads, per run of 20: {own}")


def test_thread_team_does_not_wait_for_a_late_thread():
    """A slot whose thread has not taken it when the caller's thread is done runs there: a
    thread that starts 200 ms late (descheduled, say) holds no job up."""
    runs, on_caller = thread_team(2, jobs=10, late_us=200_000)
    assert runs == [[1, 1]] * 10 and on_caller == [[1, 1]] * 10


@pytest.mark.parametrize("threads", [2, 3], ids=["team-slot", "slot-past-the-team"])
def test_thread_team_passes_an_error_on_and_stops(threads):
    """An error in a job's slot (one of the team's threads', or one past the team that the
    caller's thread runs) reaches the caller after the job, the team's threads stop, and the
    next team works."""
    with pytest.raises(RuntimeError, match="job 3 threw"):
        thread_team(threads, jobs=10, work_us=50, throw_at=3)
    runs, _ = thread_team(threads, jobs=5, work_us=50)
    assert runs == [[1] * threads] * 5


def thread_count_module(kind):
    if kind == "gru":
        return lstm_fused.GRU(40, 72)
    options = {"diagonal": {"peephole": "diagonal"}, "full": {"peephole": "full"},
               "layer_norm": {"layer_norm": True}, "zoneout": {"zoneout": 0.3}}[kind]
    return lstm_fused.LSTM(40, 72, **options)


@pytest.mark.parametrize("rows", [3, 6, 9, 21, 32, 50])
@pytest.mark.parametrize("kind", ["diagonal", "full", "layer_norm", "zoneout", "gru"])
def test_simd_results_do_not_depend_on_the_thread_count(kind, rows):
    """1, 2 and 3 threads give the same bits, forward (inference and training) and backward;
    with more than one, the time loops run in a thread team (thread_team.h): the fused step, or
    the GEMMs and pointwise kernels of full peepholes, layer norm, zoneout and the GRU."""
    cpu_gemm.set_mode("simd")
    torch.manual_seed(0)
    module, x = thread_count_module(kind), torch.randn(9, rows, 40, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(1)  # the same zoneout masks
            with torch.no_grad():
                inference = module(x)
            results.append([inference, weight_gradients(module, x)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(torch.utils._pytree.tree_leaves(results[0]),
                        torch.utils._pytree.tree_leaves(other)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["diagonal", "gru"])
def test_thread_teams_of_concurrent_calls_give_the_bits_of_one_call(kind):
    """Python threads calling a module at once each run their time loops in a thread team of
    their own (more spinning threads than cores): every call still gives the bits of a call
    alone, and none waits for ever."""
    from concurrent.futures import ThreadPoolExecutor

    cpu_gemm.set_mode("simd")
    torch.manual_seed(0)
    module = thread_count_module(kind)
    inputs = [torch.randn(20, 9, 40) for _ in range(3)]

    def gradients(x):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(module(x)[0].sum(), [x, *module.parameters()])

    expected = [gradients(x) for x in inputs]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lambda x=x: [gradients(x) for _ in range(5)]) for x in inputs]
        results = [future.result(timeout=300) for future in futures]
    for k, runs in enumerate(results):
        for got in runs:
            for a, b in zip(got, expected[k]):
                assert torch.equal(a, b), k


@pytest.mark.parametrize("coupled", [False, True], ids=["4gates", "3gates"])
def test_simd_results_do_not_depend_on_the_row_blocking(coupled):
    """Rows go through row tiles of the panel kernel of 1 to 8 rows (6 with AVX2) in the input
    projection, and with AVX-512 through tiles of every gate's units of up to 6 rows (8 for the
    3 coupled gates) in the time loop: kRows while 3 rows or more would be left, then one tile
    or two near-equal ones, in chunks of 16 rows from 8 rows (2; 5; 7 = 4 + 3; 8 = 4 + 4 (8);
    9 = 6 + 3 (5 + 4); 14 = 6 + 4 + 4 (8 + 6); 15; 31 = 16 + 15). Each output is summed in the
    same order in all of them: a sequence alone (batch 1) gives the bits it gives among the
    others. T = 40: more than 32 rows in all, so both weights are packed either way (fewer take
    the dot form, whose sums run in another order)."""
    cpu_gemm.set_mode("simd")
    module = lstm_fused.LSTM(24, 40, coupled=coupled)
    for batch in (2, 5, 7, 8, 9, 14, 15, 31):
        x = torch.randn(40, batch, 24)
        with torch.no_grad():
            together = module(x)[0]
            for b in range(batch):
                assert torch.equal(module(x[:, b:b + 1])[0], together[:, b:b + 1]), (batch, b)


# --- the weight gradients' transposed GEMM (gemm_tn: aᵀ·b over the T*B rows) ------------------

def weight_gradients(module, x):
    """The parameters' gradients after a backward of `module`'s output on x [T, B, I], and the
    input's (dz W_ih: the transposed kernel with a stored [m, rows]) where x requires grad."""
    module.zero_grad()
    x.grad = None
    out = module(x)[0]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return [p.grad.clone() for p in module.parameters()] + ([x.grad] if x.requires_grad else [])


def weight_gradient_modules(kind, input_size, hidden):
    torch.manual_seed(0)
    if kind == "gru":  # dW: [3H, I] and [3H, H]
        return lstm_fused.GRU(input_size, hidden)
    if kind == "projected":  # dW_hr [R, H]: R = 5 out rows (a tile of 4, then 1) where H > 5
        if hidden == 1:
            pytest.skip("a projection needs hidden_size > 1")
        return lstm_fused.LSTM(input_size, hidden, proj_size=min(5, hidden - 1))
    return lstm_fused.LSTM(input_size, hidden, coupled=kind == "coupled")  # [4H or 3H, I or H]


@pytest.mark.parametrize("kind", ["lstm", "coupled", "gru", "projected"])
@pytest.mark.parametrize("hidden, input_size, steps, batch", [
    (1, 1, 1, 1), (7, 17, 127, 1), (9, 16, 64, 2), (5, 15, 43, 3), (13, 47, 129, 1),
    (16, 48, 3, 43), (3, 49, 257, 1), (33, 100, 10, 30), (5, 7, 300, 4), (9, 80, 20, 7),
    (7, 24, 9, 15), (260, 8, 26, 5)])
def test_simd_weight_gradients_match_float64(kind, hidden, input_size, steps, batch):
    """The simd path's transposed kernel (forced) against the same module in float64 (ATen), for
    the weight gradients aᵀ·b: out rows (4H, 3H, R) in tiles of 8, then 4, 2 and 1 (coupled
    3 * 7 = 21 = 2 * 8 + 4 + 1, GRU 3 * 9 = 27 = 3 * 8 + 2 + 1), columns (I, H) in tiles of 3, 2
    and 1 panels, whole or not (I = 80: 3 + 2 whole panels with AVX-512; 24: 2 + 1 with AVX2),
    T*B summed rows in blocks of 128 (127, 128, 129, 257, 300), 4H = 1040 out rows in chunks of
    512 per thread (the copied values of a new chunk); and
    for the input gradient a·b (T*B out rows, over 32, each thread's in chunks of 512: 300 * 4 =
    1200 rows, summed over 4H or 3H). The error bound is relative to the largest gradient: one summed
    row left out, or added twice, is hundreds of times larger."""
    cpu_gemm.set_mode("simd")
    module = weight_gradient_modules(kind, input_size, hidden)
    exact = copy.deepcopy(module).double()
    x = torch.randn(steps, batch, input_size, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    names = [n for n, _ in module.named_parameters()] + ["input"]
    for name, a, b in zip(names, weight_gradients(module, x), weight_gradients(exact, x64),
                          strict=True):
        scale = b.abs().max().clamp(min=1.0)
        error = (a.double() - b).abs().max()
        assert error <= 2e-5 * scale, f"{name}: max error {error:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("kind, input_size, hidden", [("lstm", 40, 37), ("gru", 40, 37),
                                                     ("projected", 40, 37), ("lstm", 8, 260)])
def test_simd_weight_gradients_do_not_depend_on_the_thread_count(kind, input_size, hidden):
    """Each thread sums its own out rows (odd tile counts split unevenly), every output one chain
    over the summed rows in order: 1, 2 and 3 threads give the same bits (the input's gradient
    too; 4H = 1040 out rows: one chunk or more per thread)."""
    cpu_gemm.set_mode("simd")
    # T*B = 1200 rows: summed by the weight gradients, out rows of the input gradient (chunks
    # of 512 per thread)
    module = weight_gradient_modules(kind, input_size, hidden)
    x = torch.randn(60, 20, input_size, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(weight_gradients(module, x))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("hidden", [7, 16, 17, 33])
@pytest.mark.parametrize("variant", [(None, False), ("diagonal", False), (None, True),
                                     ("diagonal", True)], ids=variant_id)
def test_bias_and_peephole_gradients_summed_in_the_step_do_not_depend_on_the_thread_count(
        variant, hidden, packed):
    """The CPU's backward step sums the bias gradient and the diagonal peepholes' per block of
    units over the rows in order (BackwardStep::bias_sums, backward_by_units), whichever thread
    runs the block: 1, 2 and 3 threads give the same bits, and the sums are the reference's
    (column sums of dz, and of dz times c_{t-1} / c_t) within float32 rounding. Widths below,
    at and past the SIMD registers; packed rows read c_{t-1} of new sequences from c_0. The
    GEMM path is forced: a measured choice is made per thread count, and another path's dh (so
    dz) need not have the same bits."""
    cpu_gemm.set_mode("simd")
    peephole = variant[0]
    fused, ref = twins(variant, input_size=5, hidden=hidden)
    x = torch.randn(9, 6, 5)
    lengths = torch.tensor([9, 9, 8, 5, 5, 2])
    if packed:
        x = pack_padded_sequence(x, lengths)
    state = (torch.randn(1, 6, hidden), torch.randn(1, 6, hidden))

    def gradients(module, threads):
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            module.zero_grad()
            out, (h, c) = module(x, state)
            out = out.data if packed else out
            (out.square().sum() + h.sum() + c.square().sum()).backward()
        finally:
            torch.set_num_threads(before)
        return [module.bias_ih_l0.grad.clone(), module.bias_hh_l0.grad.clone()] + (
            [module.weight_ch_l0.grad.clone()] if peephole else [])

    one = gradients(fused, 1)
    for threads in (2, 3):
        for a, b in zip(gradients(fused, threads), one):
            assert torch.equal(a, b), threads
    for a, b in zip(one, gradients(ref, 1)):
        assert_close(a, b, torch.float32, "bias / peephole gradient")


def test_weight_gradient_gemm_is_measured_between_aten_and_simd():
    """In training, the weight gradients' GEMM (aᵀ·b: out rows 4H, columns I or H, summed over
    T*B rows, keyed by the power of two above) is its own measured choice, between the two paths
    that take transposed operands."""
    require("simd")  # (a choice of one candidate is not measured, nor kept)
    cpu_gemm.set_mode("auto")
    cpu_gemm.clear()
    module = lstm_fused.LSTM(24, 40)
    weight_gradients(module, torch.randn(3, 9, 24))
    transposed = [c for c in cpu_gemm.choices() if c.transposed]
    assert {(c.rows, c.n, c.k) for c in transposed} == {(160, 24, 32), (160, 40, 32)}, transposed
    candidates = {"aten", "simd"}
    for choice in transposed:
        assert set(choice.seconds) == candidates and choice.path in candidates, choice
        assert not choice.repeated and not choice.accumulate
    assert not any(c.transposed for c in cpu_gemm.choices() if c.repeated)


def test_input_gradient_is_measured_apart_from_the_input_projection():
    """With I = 4H the input projection x W_ih^T (W_ih as stored: packed panels) and the input
    gradient dz W_ih (the transposed view: read as stored by the transposed kernel) have one
    shape; they take different simd routes, so each has its own measured choice."""
    require("simd")
    cpu_gemm.set_mode("auto")
    cpu_gemm.clear()
    module = lstm_fused.LSTM(40, 10)  # 4H = I = 40, T*B = 45 rows: more than the dot form's 32
    weight_gradients(module, torch.randn(5, 9, 40, requires_grad=True))
    one_off = [c for c in cpu_gemm.choices()
               if not (c.repeated or c.transposed) and (c.n, c.k) == (40, 40)]
    assert sorted(c.weight_transposed for c in one_off) == [False, True], one_off


@pytest.mark.parametrize("path", PATHS + ["auto"])
def test_repeated_runs_of_a_path_are_bit_identical(path):
    if path != "auto":
        require(path)
    cpu_gemm.set_mode(path)
    module, x = lstm_fused.LSTM(32, 64, peephole="full"), torch.randn(7, 5, 32)
    first = forward_backward(module, x, None)
    module.zero_grad()
    second = forward_backward(module, x, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_automatic_choice_is_measured_once_and_cached():
    """The first layer call of a shape times every available path (the choice is the fastest of
    them, or the default where none beats it by 5%: simd for the recurrent weight in gate groups);
    later calls reuse it without measuring again."""
    cpu_gemm.set_mode("auto")
    cpu_gemm.clear()
    module, x = lstm_fused.LSTM(24, 40), torch.randn(3, 9, 24)
    with torch.no_grad():
        module(x)
    first = cpu_gemm.choices()
    step = [c for c in first if c.repeated and (c.rows, c.n, c.k) == (9, 160, 40)]
    assert len(step) == 1, first
    (choice,) = step
    assert set(choice.seconds) == set(cpu_gemm.available(torch.float32))
    fastest = min(choice.seconds, key=choice.seconds.get)
    default = "simd" if choice.column_groups > 1 else "aten"
    assert choice.column_groups == 4  # the loop's recurrent GEMM: one group per gate
    margin = choice.seconds[fastest] < 0.95 * choice.seconds[default]
    assert choice.path == (fastest if margin else default), choice
    assert choice.measurements == 1
    assert choice.threads == torch.get_num_threads() and choice.dtype == torch.float32
    with torch.no_grad():
        module(x)
    assert cpu_gemm.choices() == first  # same entries, same timings: nothing measured again


# --- the robust choice: its logic under deterministic timings (cpu_gemm._test_times) ----------

ROUNDS = 25  # the most rounds a measurement takes: every round's trial seconds are given


def step_choice(module, x):
    """The measured choice of the layer's recurrent GEMM (rows B, n 4H, k H), after a no_grad
    call of `module` on `x` [T, B, I]."""
    with torch.no_grad():
        module(x)
    hidden = module.hidden_size
    (choice,) = [c for c in cpu_gemm.choices()
                 if c.repeated and (c.rows, c.n, c.k) == (x.shape[1], 4 * hidden, hidden)]
    return choice


def two_candidates():
    """The paths of a layer's recurrent GEMM, its default (simd, for a weight in one column group
    per gate, where this CPU has it; else ATen) and a challenger of it."""
    paths = cpu_gemm.available(torch.float32)
    if len(paths) < 2:
        pytest.skip(f"one CPU GEMM path only here ({paths}): nothing to choose")
    default = "simd" if "simd" in paths else "aten"
    return paths, default, [p for p in paths if p != default][-1]


def trial_times(paths, seconds, **disturbed):
    """Every path's trial seconds per round: `seconds[path]` (default 1.0) in every round, except
    disturbed={path: (round, seconds)}."""
    times = {p: [seconds.get(p, 1.0)] * ROUNDS for p in paths}
    for path, (round_, value) in disturbed.items():
        times[path][round_] = value
    return times


def test_one_disturbed_trial_does_not_change_the_choice():
    """A challenger twice as fast as every other path wins; a 100x slower first trial of it, or a
    lucky 1000x faster first trial of a slower path, does not change that (the first trial alone,
    a mean or a minimum would)."""
    cpu_gemm.set_mode("auto")
    paths, slow, fast = two_candidates()
    module, x = lstm_fused.LSTM(24, 40), torch.randn(3, 9, 24)
    for disturbed in ({}, {fast: (0, 100.0)}, {slow: (0, 0.001)},
                      {fast: (0, 100.0), slow: (1, 0.001)}):
        cpu_gemm.clear()
        with cpu_gemm._test_times(trial_times(paths, {fast: 0.5}, **disturbed)):
            choice = step_choice(module, x)
        assert choice.path == fast, (disturbed, choice)
        assert choice.seconds[fast] == 0.5 and choice.seconds[slow] == 1.0, choice


@pytest.mark.parametrize("ratio, expected", [(0.97, "default"), (0.9, "challenger")])
def test_a_near_tie_keeps_the_default_path(ratio, expected):
    """A challenger only 3 % faster than the default (within the 5 % margin) leaves the default
    chosen; 10 % faster takes over."""
    cpu_gemm.set_mode("auto")
    paths, default, fast = two_candidates()
    module, x = lstm_fused.LSTM(24, 40), torch.randn(3, 9, 24)
    cpu_gemm.clear()
    others_slower = {p: 2.0 for p in paths if p not in (default, fast)}
    with cpu_gemm._test_times(trial_times(paths, {fast: ratio, **others_slower})):
        choice = step_choice(module, x)
    assert choice.path == (default if expected == "default" else fast), choice


@pytest.mark.parametrize("grouped", [True, False])
def test_simd_is_the_default_for_a_weight_in_gate_groups(grouped):
    """The recurrent weight of a vanilla layer (and its input weight under no_grad, which the loop
    reads a chunk of steps at a time) is split between the threads in one column group per gate,
    as the fused step splits the hidden units: there simd is the default, and ATen 3 % faster in
    its trials does not take over. The full peepholes' recurrent GEMM has one group: ATen stays
    the default there, and simd 3 % faster does not take over."""
    cpu_gemm.set_mode("auto")
    paths = cpu_gemm.available(torch.float32)
    if "simd" not in paths:
        pytest.skip(f"no simd path here ({paths})")
    hidden, steps, batch = 40, 30, 9
    module = lstm_fused.LSTM(24, hidden, peephole="diagonal" if grouped else "full")
    x = torch.randn(steps, batch, 24)
    cpu_gemm.clear()
    tie = {"aten": 0.97} if grouped else {"simd": 0.97}
    with (cpu_gemm._test_times(trial_times(paths, tie)), cpu_gemm.projection_chunks(batch * 5),
          torch.no_grad()):
        module(x)
    repeated = [c for c in cpu_gemm.choices() if c.repeated]
    groups = {c.column_groups for c in repeated}
    if grouped:  # the recurrent GEMM (batch rows) and the input projection (5 steps' rows)
        assert sorted(c.rows for c in repeated) == [batch, batch * 5] and groups == {4}, repeated
        assert all(c.path == "simd" for c in repeated), repeated
    else:
        recurrent = [c for c in repeated if c.column_groups == 1 and c.rows == batch]
        assert recurrent and all(c.path == "aten" for c in recurrent), repeated


def test_a_choice_that_runs_far_slower_than_its_trial_is_measured_again():
    """Every 16th step is timed: 8 samples in a row over 3x the trial's median mark the choice
    stale, the next call measures again (and may choose another path); samples as fast as the
    trial never do, and a shape is measured at most 4 times."""
    cpu_gemm.set_mode("auto")
    paths, _, fast = two_candidates()
    module, x = lstm_fused.LSTM(8, 16), torch.randn(8 * 16 + 2, 3, 8)
    cpu_gemm.clear()
    with cpu_gemm._test_times(trial_times(paths, {fast: 0.5}), run_seconds=0.5 * 2.9):
        assert step_choice(module, x).path == fast
        assert step_choice(module, x).measurements == 1  # not 3x slower: still the first
    cpu_gemm.clear()
    with cpu_gemm._test_times(trial_times(paths, {fast: 0.5}), run_seconds=0.5 * 3.1):
        first = step_choice(module, x)  # measured, then 8 slow samples: stale
        assert (first.path, first.measurements) == (fast, 1)
    with cpu_gemm._test_times(trial_times(paths, {"aten": 0.1}), run_seconds=0.5 * 3.1):
        again = step_choice(module, x)
        assert (again.path, again.measurements) == ("aten", 2), again
        # aten's trial says 0.1 s: 1.55 s samples are slow again, but measuring stops at 4
        assert [step_choice(module, x).measurements for _ in range(4)] == [3, 4, 4, 4]


def test_forced_mode_is_overridable_and_validated():
    cpu_gemm.set_mode("aten")
    assert cpu_gemm.get_mode() == "aten"
    with cpu_gemm.mode("auto"):
        assert cpu_gemm.get_mode() == "auto"
    assert cpu_gemm.get_mode() == "aten"
    with pytest.raises(ValueError, match="mode must be one of"):
        cpu_gemm.set_mode("fastest")


def run_python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "LSTM_FUSED_CPU_GEMM"}
    environment.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                          text=True, timeout=300, check=False)


def test_environment_variable_sets_the_initial_mode():
    code = "import lstm_fused; print(lstm_fused.cpu_gemm.get_mode())"
    assert run_python(code, LSTM_FUSED_CPU_GEMM="packed").stdout.strip() == "packed"
    assert run_python(code).stdout.strip() == "auto"
    bad = run_python("import torch, lstm_fused; lstm_fused.LSTM(2, 3)(torch.randn(2, 1, 2))",
                     LSTM_FUSED_CPU_GEMM="fastest")
    assert bad.returncode != 0 and "LSTM_FUSED_CPU_GEMM must be auto, aten" in bad.stderr


def test_half_types_run_on_an_avx2_cpu_in_every_mode():
    """oneDNN has no bfloat16 inner product without AVX-512 bf16: capped at AVX2 it is not a
    candidate for bfloat16, and forcing it falls back to ATen instead of failing."""
    code = """
import torch, lstm_fused
assert "onednn" not in lstm_fused.cpu_gemm.available(torch.bfloat16), lstm_fused.cpu_gemm.available(torch.bfloat16)
for mode in ("auto", "onednn", "packed", "aten"):
    lstm_fused.cpu_gemm.set_mode(mode)
    for dtype in (torch.bfloat16, torch.float16):
        m = lstm_fused.LSTM(256, 256, dtype=dtype)
        x = torch.randn(5, 3, 256, dtype=dtype, requires_grad=True)
        out = m(x)[0]
        out.float().sum().backward()
        ref = lstm_fused.LSTM(256, 256).float()
        ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        torch.testing.assert_close(out.float(), ref(x.detach().float())[0], rtol=0.05, atol=0.05)
print("ok")
"""
    result = run_python(code, ONEDNN_MAX_CPU_ISA="AVX2")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# --- inference: nothing saved for backward ---------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@variant_params
def test_inference_writes_nothing_for_backward_and_gives_the_same_outputs(variant, packed):
    args = layer_op_args(variant, torch.float32, packed, False, 0, torch.Generator().manual_seed(3))
    training = torch.ops.lstm_fused.layer_forward(*args, need_backward=True)
    inference = torch.ops.lstm_fused.layer_forward(*args, need_backward=False)
    for a, b in zip(training[:3], inference[:3]):
        assert torch.equal(a, b)
    assert training[3].numel() > 0 and training[4].numel() > 0
    assert inference[3].numel() == 0 and inference[4].numel() == 0


# Inference projects the input a chunk of steps at a time (StepPreactivations, layer.cpp).
CHUNK_CASES = {
    "plain": {},
    "layer-norm": {"layer_norm": True},
    "projection+zoneout": {"proj_size": 3, "zoneout": 0.3},
    "two-layers-bidirectional": {"num_layers": 2, "bidirectional": True},
}


def inference_outputs(module, x, chunk_rows):
    with torch.no_grad(), cpu_gemm.projection_chunks(chunk_rows):
        out, state = module(x)
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    return [out, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
@variant_params
def test_inference_in_chunks_of_steps_gives_the_training_outputs(variant, case, packed):
    """Chunks of one step, of a few steps with a shorter last one, of steps that do not divide
    the rows (the chunk holds whole steps), and one chunk for all: with the simd path (panels
    for every chunk and for the whole projection: 40 rows; the bias added in the tiles) bit for
    bit the training forward's outputs; every other path (each adds the bias its own way) and the
    measured choice within float32 rounding."""
    fused, _ = twins(variant, **CHUNK_CASES[case])
    fused.eval()  # zoneout: its expectation, the same in both
    x = torch.randn(10, 4, 5)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([10, 10, 9, 5]))  # 34 rows
    for path in [*cpu_gemm.available(torch.float32), "auto"]:
        cpu_gemm.set_mode(path)
        out, state = fused(x)  # training forward (the parameters require grad)
        expected = [out.data if packed else out, *state]
        for rows in (1, 4, 7, 12, 4096):
            for a, b in zip(inference_outputs(fused, x, rows), expected):
                if path == "simd":
                    assert torch.equal(a, b.detach()), (path, rows)
                else:
                    assert_close(a, b.detach(), torch.float32, f"{path}, {rows} rows")


TRAINING_CHUNK_CASES = {
    **{f"lstm-{variant_id(v)}": {"peephole": v[0], "coupled": v[1]} for v in VARIANTS},
    "lstm-layer-norm-diagonal": {"peephole": "diagonal", "layer_norm": True},
    "lstm-projection+zoneout": {"proj_size": 3, "zoneout": 0.3},
    "gru": {"family": "gru"},
}


@pytest.mark.parametrize("hidden", [7, 16, 18, 32])
@pytest.mark.parametrize("case", list(TRAINING_CHUNK_CASES))
def test_training_projects_in_chunks_with_the_results_of_one_projection(case, hidden):
    """On the CPU training projects the input a chunk of steps at a time, as inference does, and
    the kernel writes the saved rows apart, past the caches (stream_saved: whole aligned
    registers of float32; H = 16 and 32 give those, H = 18 rows that are not all aligned, H = 7
    none): in chunks of 1, 4 and 7 rows and in one, the simd path gives the outputs and the
    gradients of every parameter and of the input bit for bit, inference the same outputs, and
    they are the reference's within float32 rounding."""
    kwargs = dict(TRAINING_CHUNK_CASES[case])
    gru = kwargs.pop("family", "lstm") == "gru"
    torch.manual_seed(0)
    module = (lstm_fused.GRU(5, hidden, num_layers=2, bidirectional=True) if gru
              else lstm_fused.LSTM(5, hidden, num_layers=2, bidirectional=True, **kwargs))
    x = torch.randn(10, 4, 5, requires_grad=True)
    cpu_gemm.set_mode("simd")

    def training(rows):
        module.zero_grad()
        x.grad = None
        torch.manual_seed(1)  # zoneout's masks
        with cpu_gemm.projection_chunks(rows):
            out, state = module(x)
        states = state if isinstance(state, tuple) else (state,)
        (out.square().sum() + sum(s.sum() for s in states)).backward()
        return [out.detach(), *(s.detach() for s in states), x.grad.clone(),
                *(p.grad.clone() for p in module.parameters())]

    whole = training(0)
    for rows in (1, 4, 7, 4096):
        for a, b in zip(training(rows), whole):
            assert torch.equal(a, b), rows
        module.eval()  # zoneout: its expectation in inference
        if not kwargs.get("zoneout"):
            for a, b in zip(inference_outputs(module, x.detach(), rows), whole):
                assert torch.equal(a, b), rows
        module.train()
    module._layer_fn = reference.gru_layer if gru else reference.lstm_layer
    for a, b in zip(training(0), whole):
        if kwargs.get("layer_norm"):  # the norm's divisions: test_layer_norm.py's tolerance
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert_close(a, b, torch.float32, case)
    # Training does chunk: the measured choices show the chunk's GEMM (2 steps of 4 rows).
    cpu_gemm.set_mode("auto")
    cpu_gemm.clear()
    del module._layer_fn
    training(8)
    gates = 3 if gru else 3 if kwargs.get("coupled") else 4
    assert any(c.repeated and c.rows == 8 and c.n == gates * hidden for c in cpu_gemm.choices())


def test_projection_chunks_follow_the_l2_cache_unless_forced():
    chunk = cpu_gemm.projection_chunk_rows(4096)
    assert chunk >= 1
    assert cpu_gemm.projection_chunk_rows(2048) in (2 * chunk, 2 * chunk + 1)  # as many bytes
    assert cpu_gemm.projection_chunk_rows(1 << 40) == 1  # at least one row
    with cpu_gemm.projection_chunks(3):
        assert cpu_gemm.projection_chunk_rows(4096) == cpu_gemm.projection_chunk_rows(8) == 3
        with cpu_gemm.projection_chunks(0):
            assert cpu_gemm.projection_chunk_rows(4096) == chunk
        assert cpu_gemm.projection_chunk_rows(4096) == 3
    assert cpu_gemm.projection_chunk_rows(4096) == chunk
    with pytest.raises(ValueError, match="projection chunk rows must be >= 0"):
        cpu_gemm.set_projection_chunk_rows(-1)
    with pytest.raises(TypeError, match="rows must be an int"):
        cpu_gemm.set_projection_chunk_rows(2.5)
    assert cpu_gemm.projection_chunk_rows(4096) == chunk
    # A forced size is used: the measured choices show the chunk's GEMM (2 steps of 4 rows).
    cpu_gemm.set_mode("auto")
    cpu_gemm.clear()
    inference_outputs(lstm_fused.LSTM(5, 7), torch.randn(10, 4, 5), 8)
    assert any(c.repeated and c.rows == 8 and c.n == 28 for c in cpu_gemm.choices())


def test_layer_asks_for_backward_buffers_only_when_a_gradient_is_needed(monkeypatch):
    calls = []
    real = functional.ops.layer_forward
    schema = torch.ops.lstm_fused.layer_forward.default._schema
    need_backward = [a.name for a in schema.arguments].index("need_backward")

    class Recording:
        def __getattr__(self, name):
            return getattr(torch.ops.lstm_fused, name)

        @staticmethod
        def layer_forward(*args):
            calls.append(args[need_backward])
            return real(*args)

    monkeypatch.setattr(functional, "ops", Recording())
    module, x = lstm_fused.LSTM(3, 4), torch.randn(2, 1, 3)
    module(x)
    with torch.no_grad():
        module(x)
    with torch.inference_mode():
        module(x)
    module.requires_grad_(False)
    module(x)
    assert calls == [True, False, False, False]


def test_backward_through_an_inference_call_is_refused():
    args = list(layer_op_args((None, False), torch.float32, False, False, 0,
                              torch.Generator().manual_seed(0)))
    args[3] = args[3].requires_grad_()
    with pytest.raises(RuntimeError, match="need_backward=False"):
        torch.ops.lstm_fused.layer_forward(*args, need_backward=False)


# --- the cell's latency path ------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("hx", [False, True])
def test_cell_latency_path_matches_the_general_path(variant, no_grad, hx):
    peephole, coupled = variant
    torch.manual_seed(0)
    cell = lstm_fused.LSTMCell(6, 5, peephole=peephole, coupled=coupled)
    x = torch.randn(3, 6)
    state = (torch.randn(3, 5), torch.randn(3, 5)) if hx else None
    expected = cell(x, state)  # with grad: the general path
    with torch.profiler.profile() as prof, no_grad():
        got = cell(x, state)
    assert "lstm_fused::cell_step" in {e.key for e in prof.key_averages()}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        assert not a.requires_grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch, hidden, input_size", [(1, 64, 64), (1, 37, 21), (5, 20, 33),
                                                       (17, 16, 8), (32, 24, 9), (33, 16, 8)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cell_step_on_each_gemm_path_matches_the_reference_cell(path, batch, hidden, input_size,
                                                                variant):
    """The one-op cell step under each forced path; with simd (up to 32 rows, peephole none or
    diagonal) its kernel adds h W_hh^T per block of units before activating them."""
    require(path)
    cpu_gemm.set_mode(path)
    peephole, coupled = variant
    torch.manual_seed(1)
    cell = lstm_fused.LSTMCell(input_size, hidden, peephole=peephole, coupled=coupled)
    x, state = torch.randn(batch, input_size), (torch.randn(batch, hidden),
                                                torch.randn(batch, hidden))
    with torch.profiler.profile() as prof, torch.inference_mode():
        got = cell(x, state)
    seen = {e.key for e in prof.key_averages()}
    assert "lstm_fused::cell_step" in seen
    fused_step = path == "simd" and batch <= 32 and peephole != "full"
    assert ("lstm_fused::recurrent_step" in seen) == fused_step, seen
    expected = reference.lstm_cell(x, *state, *cell._parameters_for(""), peephole=peephole,
                                   coupled=coupled)
    for a, b in zip(got, expected):
        assert_close(a, b.detach(), torch.float32, path)


def test_cell_latency_path_leaves_bad_input_to_the_general_checks():
    cell = lstm_fused.LSTMCell(6, 5)
    with torch.no_grad():
        # torch.nn.LSTMCell's errors, from the general path's checks (lstm_fused._checks)
        with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 7"):
            cell(torch.randn(3, 7))
        with pytest.raises(RuntimeError, match="Input batch size 3 doesn't match hidden0 batch"):
            cell(torch.randn(3, 6), (torch.randn(2, 5), torch.randn(3, 5)))
        assert cell(torch.randn(6))[0].shape == (5,)  # unbatched: the general path


@pytest.mark.parametrize("cell_class", [lstm_fused.LSTMCell, lstm_fused.GRUCell])
@pytest.mark.parametrize("case", ["input_size", "batch", "state_width", "state_dtype",
                                  "input_dtype", "state_not_a_tensor"])
def test_cell_latency_path_raises_what_the_general_path_raises(cell_class, case):
    """Under no_grad the cells call their one op without checking the arguments first; where
    the op refuses them the general path runs and raises its error (torch.nn's): the same
    exception and message as with autograd on."""
    cell = cell_class(6, 5)
    x, h = torch.randn(3, 6), torch.randn(3, 5)
    x, h = {"input_size": (torch.randn(3, 7), h), "batch": (x, torch.randn(2, 5)),
            "state_width": (x, torch.randn(3, 4)), "state_dtype": (x, h.double()),
            "input_dtype": (x.double(), h), "state_not_a_tensor": (x, h.tolist())}[case]
    hx = (h, torch.randn(3, 5)) if cell_class is lstm_fused.LSTMCell else h
    with pytest.raises(Exception) as with_grad:
        cell(x, hx)
    with pytest.raises(Exception) as without_grad, torch.no_grad():
        cell(x, hx)
    assert type(without_grad.value) is type(with_grad.value)
    assert str(without_grad.value) == str(with_grad.value)


def test_cell_latency_path_follows_replaced_parameters():
    """Pruning or a parametrization replaces a parameter by a computed tensor (the module's
    _parameters no longer hold it): the latency path must not read a pruned bias as absent."""
    from torch.nn.utils import parametrizations, prune

    x = torch.randn(3, 4)
    pruned = lstm_fused.PeepholeLSTMCell(4, 5)
    prune.l1_unstructured(pruned, "bias_ih", amount=0.5)
    normed = lstm_fused.LSTMCell(4, 5)
    parametrizations.weight_norm(normed, "weight_hh")
    for cell in (pruned, normed):
        expected = cell(x)  # with grad: the general path
        with torch.no_grad():
            got = cell(x)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
