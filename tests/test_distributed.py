"""lstm_fused.LSTM and lstm_fused.GRU under DistributedDataParallel, FSDP2 (fully_shard) and
torch.compile(DDP).

The tests share one run of 2 worker processes (this file run as a script) on CPU with the gloo
backend over loopback, killed if they outlive TIMEOUT; each test checks its scenario's part of
their output (importing torch dominates a worker's runtime). Each worker runs every variant
(conftest.VARIANTS: plain, peephole, coupled, both) in its shapes (CONFIGS: 2-layer bidirectional
with projection; 1 layer; clipped; layer norm) and the GRU (GRU_CONFIGS), trains a few SGD steps on its half of a batch and checks the parameters
against single-process training on the whole batch (gradients are averaged across ranks and
the losses are batch means, so the math is the same), plus cross-rank consistency and
state_dict / checkpoint round trips.

    pytest tests/test_distributed.py                      # DDP, no_sync, FSDP2, compile(aot_eager)
    LSTM_FUSED_TEST_INDUCTOR=1 pytest tests/test_distributed.py   # + compile(inductor), slow

Workers run with faulthandler and glibc's malloc checks (a past CI run aborted once in FSDP2 with
`malloc(): unaligned tcache chunk detected`); a failure names the scenario and each rank's exit
code or signal, with the tail of its output. tests/asan/fsdp2_loop.py loops a scenario, also
under the sanitized build.

FSDP1 (FullyShardedDataParallel) is not tested: on a machine without an accelerator it refuses
to construct ("FSDP needs a non-CPU accelerator device"), even with device_id=None.
"""

from __future__ import annotations

import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import TOLERANCES, VARIANTS, variant_id
from torch import nn

import lstm_fused

WORLD = 2
TIMEOUT = 240  # seconds for the workers (all scenarios): then they are killed, the tests fail
REPO = Path(__file__).resolve().parent.parent
# The workers import the lstm_fused this process imported (e.g. the sanitized build of tests/asan).
PACKAGE_ROOT = str(Path(lstm_fused.__file__).resolve().parent.parent)

# Model and data sizes: small, so that the whole file stays well under a minute on 2 cores.
I, H, O, T, B_LOCAL, STEPS = 5, 6, 2, 7, 4, 4
CONFIGS = {
    "stack": {"num_layers": 2, "bidirectional": True, "proj_size": 3},  # 2 layers x 2 directions
    "single": {"num_layers": 1},
    "clipped": {"proj_size": 3, "cell_clip": 0.5, "proj_clip": 0.4},  # TensorFlow's state clips
    "layer_norm": {"layer_norm": True, "bidirectional": True},  # weight_ln_l{k} parameters too
}
# lstm_fused.GRU, run as one more "variant" (GRU) beside conftest.VARIANTS.
GRU = "gru"
GRU_CONFIGS = {
    "stack": {"num_layers": 2, "bidirectional": True},  # 2 layers x 2 directions
    "single": {"num_layers": 1, "bias": False},
}
RTOL = ATOL = TOLERANCES["reference"][torch.float32]
pytestmark = pytest.mark.slow  # worker processes: torch import, process groups, compiles


# --- parent side: pytest ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(scenarios: list[str], tmp_path: Path, timeout: float) -> dict[str, str]:
    """Runs the scenarios, in order, in one group of WORLD worker processes (torch's import
    dominates a worker's runtime). Returns {scenario: None if it passed on every rank, else the
    failure report}; a scenario after a failed one does not run (its report says so)."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
                   **_diagnostic_env())
        log = open(tmp_path / f"rank{rank}.log", "w+")  # noqa: SIM115  (closed below)
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, ",".join(scenarios), str(tmp_path)], env=env, stdout=log,
            stderr=subprocess.STDOUT, cwd=str(REPO)))
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    print(outputs[0])  # shown with pytest -s or on failure

    def section(out, scenario):
        begin = out.find(f"@@ BEGIN {scenario}\n")
        return out[begin:] if begin >= 0 else out
    results = {}
    for scenario in scenarios:
        if all(f"@@ PASS {scenario}\n" in out for out in outputs):
            results[scenario] = None
            continue
        why = (f"workers killed after {timeout}s" if timed_out else
               "; ".join(f"rank {r}: {_exit_status(p.returncode)}" for r, p in enumerate(procs)))
        started = any(f"@@ BEGIN {scenario}\n" in out for out in outputs)
        results[scenario] = (
            f"{scenario} {'failed' if started else 'did not run'} ({why}):\n" + "\n".join(
                f"----- rank {r} -----\n{section(out, scenario)[-6000 if started else -1500:]}"
                for r, out in enumerate(outputs)))
    return results


def _diagnostic_env() -> dict[str, str]:
    """Makes a worker's crash say where it happened: faulthandler prints every thread's Python
    stack on a fatal signal, and glibc's malloc checks (level 3: report and abort) stop at the
    first heap inconsistency instead of a later, unrelated allocation. glibc >= 2.34 needs
    libc_malloc_debug.so preloaded for them; under ASan (tests/asan) its allocator checks instead."""
    env = {"PYTHONFAULTHANDLER": "1"}
    preload = os.environ.get("LD_PRELOAD", "")
    if "libasan" in preload:
        return env
    env["MALLOC_CHECK_"] = "3"
    debug = ctypes.util.find_library("c_malloc_debug")
    if debug:
        env["LD_PRELOAD"] = f"{preload}:{debug}" if preload else debug
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"),
                                                       "glibc.malloc.check=3"]))
    return env


def _exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _check(results: dict, scenario: str) -> None:
    if results[scenario] is not None:
        pytest.fail(results[scenario], pytrace=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """DDP, FSDP2 and compile(aot_eager) in one spawn of the workers; each test checks its part."""
    return run_workers(["ddp", "fsdp2", "compile:aot_eager"],
                       tmp_path_factory.mktemp("distributed"), TIMEOUT)


def test_ddp(results):
    """DDP (find_unused_parameters=False): parameters after N steps equal single-process
    training on the concatenated batch; identical on both ranks; no_sync gradient
    accumulation; state_dict saved on rank 0 and loaded on every rank."""
    _check(results, "ddp")


def test_fsdp2(results):
    """FSDP2 fully_shard on CPU/gloo: same parameters as single-process training; full and
    sharded (torch.distributed.checkpoint) state dicts round-trip across ranks."""
    _check(results, "fsdp2")


def test_compile_ddp_aot_eager(results):
    """torch.compile(DDP(model), backend="aot_eager"): every layer inside the compiled graph
    (only DDP's own wrapper graph-breaks), same parameters as single-process eager training."""
    _check(results, "compile:aot_eager")


def test_compile_ddp_inductor(tmp_path):
    """Same with backend="inductor": it generates and compiles C++ for the CPU, which takes
    ~75 s for all cases on 2 cores with a warm inductor cache (longer on a first run)."""
    if os.environ.get("LSTM_FUSED_TEST_INDUCTOR") != "1":
        pytest.skip("slow on CPU; set LSTM_FUSED_TEST_INDUCTOR=1 to run")
    _check(run_workers(["compile:inductor"], tmp_path, timeout=1800), "compile:inductor")


# --- worker side -----------------------------------------------------------------------------


def _worker_main(scenarios: str, tmp_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    for scenario in scenarios.split(","):
        print(f"@@ BEGIN {scenario}", flush=True)
        run = {"ddp": _scenario_ddp, "fsdp2": _scenario_fsdp2}.get(scenario.split(":")[0],
                                                                  _scenario_compile)
        run(scenario, Path(tmp_dir))
        _check_all_ok(scenario)  # raises: the scenario lacks PASS, and the worker exits
        print(f"@@ PASS {scenario}", flush=True)
    dist.destroy_process_group()  # on success only: after a failure the worker just exits


def _check_all_ok(scenario: str) -> None:
    """Every case of the scenario printed its OK line (guards against a silently empty loop)."""
    configs = _compile_configs if scenario.startswith("compile") else _configs
    expected = sum(len(configs(v)) for v in _variants())
    assert _ok_lines[scenario] == expected, f"{scenario}: {_ok_lines[scenario]} of {expected} OK"


_ok_lines: dict[str, int] = {}


def _ok(scenario: str, message: str) -> None:
    _ok_lines[scenario] = _ok_lines.get(scenario, 0) + 1
    print(f"OK {message}", flush=True)


class Net(nn.Module):
    """The recurrent encoder (an LSTM variant, or the GRU for variant GRU) and a linear head
    on its last step; forward returns (prediction, the last state: c_n, or h_n for the GRU)."""

    def __init__(self, variant, config):
        super().__init__()
        if variant == GRU:
            self.lstm = lstm_fused.GRU(I, H, batch_first=True, **config)
        else:
            peephole, coupled = variant
            self.lstm = lstm_fused.LSTM(I, H, batch_first=True, peephole=peephole,
                                        coupled=coupled, **config)
        directions = 2 if self.lstm.bidirectional else 1
        self.head = nn.Linear(directions * (self.lstm.proj_size or H), O)

    def forward(self, x):
        out, states = self.lstm(x)
        last_state = states if isinstance(states, torch.Tensor) else states[1]
        return self.head(out[:, -1]), last_state


def loss_fn(model, x, y):
    # Batch means only, so that averaging per-rank gradients gives the full-batch gradient.
    pred, state = model(x)
    return F.mse_loss(pred, y) + 0.1 * state.pow(2).mean()


def make_net(variant, config, seed=0):
    torch.manual_seed(seed)
    return Net(variant, config)


def data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(WORLD * B_LOCAL, T, I, generator=g)
    y = torch.randn(WORLD * B_LOCAL, O, generator=g)
    return x, y


def local(t):
    rank = dist.get_rank()
    return t[rank * B_LOCAL:(rank + 1) * B_LOCAL]


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def reference(variant, config):
    """Single process, whole batch: (trained model, grads after the first backward)."""
    model = make_net(variant, config)
    opt = sgd(model)
    x, y = data()
    first_grads = None
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return model, first_grads


def assert_close_f32(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what}: {m}")


def max_diff(named_a, b_dict):
    return max((a.detach() - b_dict[n].detach()).abs().max().item() for n, a in named_a)


def assert_same_on_all_ranks(tensors, what):
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for r, other in enumerate(gathered):
        assert torch.equal(other, flat), f"{what}: rank {r} differs from rank {dist.get_rank()}"


def _variant_id(variant) -> str:
    return GRU if variant == GRU else variant_id(variant)


def _variants():
    """conftest.VARIANTS and the GRU, or only those whose ids (conftest.variant_id, "gru") are
    listed, comma-separated, in LSTM_FUSED_TEST_DIST_VARIANTS (tests/asan/fsdp2_loop.py loops
    one variant)."""
    every = [*VARIANTS, GRU]
    wanted = os.environ.get("LSTM_FUSED_TEST_DIST_VARIANTS")
    if not wanted:
        return every
    chosen = [v for v in every if _variant_id(v) in wanted.split(",")]
    assert chosen, f"LSTM_FUSED_TEST_DIST_VARIANTS={wanted!r} names no variant"
    return chosen


def _configs(variant):
    return GRU_CONFIGS if variant == GRU else CONFIGS


def cases(configs_of=_configs):
    for variant in _variants():
        for name, config in configs_of(variant).items():
            yield f"{_variant_id(variant)}/{name}", variant, config


def _scenario_ddp(scenario, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = data()
    xl, yl = local(x), local(y)
    for case, variant, config in cases():
        start = time.perf_counter()
        ref, ref_grads = reference(variant, config)
        ref_params = dict(ref.named_parameters())

        # 1. Plain DDP, one backward per step. A different seed on rank 1: DDP must broadcast.
        model = DDP(make_net(variant, config, seed=dist.get_rank()),
                    find_unused_parameters=False)
        opt = sgd(model)
        for step in range(STEPS):
            opt.zero_grad()
            loss_fn(model, xl, yl).backward()
            if step == 0:
                for n, p in model.module.named_parameters():
                    assert p.grad is not None, f"{case}: {n} got no gradient"
                    assert_close_f32(p.grad, ref_grads[n], f"{case}: all-reduced grad of {n}")
            opt.step()
        for n, p in model.module.named_parameters():
            assert_close_f32(p, ref_params[n], f"{case}: DDP parameter {n} after {STEPS} steps")
        assert_same_on_all_ranks(list(model.parameters()), f"{case}: DDP parameters")
        diff = max_diff(model.module.named_parameters(), ref_params)

        # 2. Gradient accumulation: two micro-batches per step, the first under no_sync().
        acc = DDP(make_net(variant, config), find_unused_parameters=False)
        opt = sgd(acc)
        half = B_LOCAL // 2
        for _ in range(STEPS):
            opt.zero_grad()
            with acc.no_sync():
                (loss_fn(acc, xl[:half], yl[:half]) / 2).backward()
            (loss_fn(acc, xl[half:], yl[half:]) / 2).backward()
            opt.step()
        for n, p in acc.module.named_parameters():
            assert_close_f32(p, ref_params[n], f"{case}: no_sync accumulation, {n}")

        # 3. state_dict: rank 0 saves, every rank loads into a fresh (differently seeded) model.
        path = tmp / f"ddp-{case.replace('/', '-')}.pt"
        if dist.get_rank() == 0:
            torch.save(model.module.state_dict(), path)
        dist.barrier()
        fresh = make_net(variant, config, seed=100 + dist.get_rank())
        fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
        expected_keys = set(dict(model.module.named_parameters()))
        assert set(fresh.state_dict()) == expected_keys, f"{case}: state_dict keys"
        if variant != GRU and variant[0] == "diagonal":
            assert "lstm.weight_ch_l0" in expected_keys, f"{case}: no weight_ch_l0"
        fresh = DDP(fresh, find_unused_parameters=False)
        with torch.no_grad():
            torch.testing.assert_close(fresh(xl)[0], model(xl)[0], rtol=0, atol=0)
        # ... and keeps training in lockstep with the original.
        for m in (model, fresh):
            opt = sgd(m)
            opt.zero_grad()
            loss_fn(m, xl, yl).backward()
            opt.step()
        for (n, a), b in zip(model.module.named_parameters(), fresh.module.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{case}: reloaded {n}")
        _ok(scenario, f"{case}: DDP max |param - single process| = {diff:.2e} "
                      f"({time.perf_counter() - start:.1f}s)")


def _scenario_fsdp2(scenario, tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def sharded_net(variant, config, seed=0):
        net = make_net(variant, config, seed)  # same seed on all ranks: same full params
        fully_shard(net.lstm)
        fully_shard(net)
        return net

    def full_params(net):
        return {n: p.full_tensor() for n, p in net.named_parameters()}

    x, y = data()
    xl, yl = local(x), local(y)
    for case, variant, config in cases():
        start = time.perf_counter()
        ref, ref_grads = reference(variant, config)
        ref_params = dict(ref.named_parameters())

        model = sharded_net(variant, config)
        assert all(isinstance(p, DTensor) for p in model.parameters()), f"{case}: not sharded"
        opt = sgd(model)
        for step in range(STEPS):
            opt.zero_grad()
            loss_fn(model, xl, yl).backward()
            if step == 0:
                for n, p in model.named_parameters():
                    assert p.grad is not None, f"{case}: {n} got no gradient"
                    assert_close_f32(p.grad.full_tensor(), ref_grads[n],
                                     f"{case}: reduce-scattered grad of {n}")
            opt.step()
        trained = full_params(model)
        for n, p in trained.items():
            assert_close_f32(p, ref_params[n], f"{case}: FSDP2 parameter {n} after {STEPS} steps")
        diff = max_diff(trained.items(), ref_params)
        with torch.no_grad():
            out = model(xl)[0]

        # Full state dict, gathered to rank 0 (CPU), loads into a plain lstm_fused model, and
        # back into a fresh sharded model by broadcast from rank 0.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(model, options=opts)
        if dist.get_rank() == 0:
            plain = make_net(variant, config, seed=7)
            plain.load_state_dict(full, strict=True)
            for n, p in plain.named_parameters():
                torch.testing.assert_close(p, trained[n], rtol=0, atol=0, msg=f"{case}: {n}")
        else:
            assert full == {}, f"{case}: cpu_offload full state dict should be rank 0 only"
        fresh = sharded_net(variant, config, seed=100 + dist.get_rank())
        set_model_state_dict(fresh, full, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        for n, p in full_params(fresh).items():
            torch.testing.assert_close(p, trained[n], rtol=0, atol=0, msg=f"{case}: bcast {n}")

        # Sharded checkpoint with torch.distributed.checkpoint: each rank writes its shards.
        ckpt = tmp / f"dcp-{case.replace('/', '-')}"
        dcp.save(get_model_state_dict(model), checkpoint_id=str(ckpt))
        again = sharded_net(variant, config, seed=200 + dist.get_rank())
        state = get_model_state_dict(again)
        dcp.load(state, checkpoint_id=str(ckpt))
        set_model_state_dict(again, state)
        for n, p in full_params(again).items():
            torch.testing.assert_close(p, trained[n], rtol=0, atol=0, msg=f"{case}: dcp {n}")
        with torch.no_grad():
            torch.testing.assert_close(again(xl)[0], out, rtol=0, atol=0)
        _ok(scenario, f"{case}: FSDP2 max |param - single process| = {diff:.2e} "
                      f"({time.perf_counter() - start:.1f}s)")


def _compile_configs(variant):
    """Compiling dominates the runtime: every variant, as "stack" only."""
    return {"stack": _configs(variant)["stack"]}


def _scenario_compile(scenario, tmp):
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The wrapper records which lstm_fused ops each compiled graph holds. DDP's own forward
    # graph-breaks by design (dynamo skips DistributedDataParallel internals and compiles the
    # wrapped module; DDPOptimizer then splits that graph at gradient-bucket boundaries), so the
    # check is that every layer of the model is inside a compiled graph.
    name = scenario.split(":")[1]
    inner_backend = torch._dynamo.lookup_backend(name)
    compiled_ops = []

    def backend(gm, example_inputs):
        compiled_ops.extend(str(node.target) for node in gm.graph.nodes
                            if node.op == "call_function" and "lstm_fused" in str(node.target))
        return inner_backend(gm, example_inputs)

    x, y = data()
    xl, yl = local(x), local(y)
    for case, variant, config in cases(_compile_configs):
        start = time.perf_counter()
        torch._dynamo.reset()
        counters.clear()
        ref, _ = reference(variant, config)
        ref_params = dict(ref.named_parameters())
        ddp = DDP(make_net(variant, config), find_unused_parameters=False)
        model = torch.compile(ddp, backend=backend)
        opt = sgd(ddp)
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model, xl, yl).backward()
            opt.step()
        layers = ddp.module.lstm.num_layers * (2 if ddp.module.lstm.bidirectional else 1)
        op = "gru_layer_forward" if variant == GRU else "layer_forward"
        assert len(compiled_ops) == layers and all(
            name.split(".")[1] == op for name in compiled_ops), (
            f"{case}: expected {layers} lstm_fused.{op} calls in the compiled graphs "
            f"(compiled once), got {compiled_ops}; graph breaks: {dict(counters['graph_break'])}")
        compiled_ops.clear()
        for n, p in ddp.module.named_parameters():
            assert_close_f32(p, ref_params[n], f"{case}: compiled DDP parameter {n}")
        assert_same_on_all_ranks(list(ddp.parameters()), f"{case}: compiled DDP params")
        diff = max_diff(ddp.module.named_parameters(), ref_params)
        _ok(scenario, f"{case}: compile({name}) DDP max |param - single process| = {diff:.2e}"
                      f" ({counters['stats']['unique_graphs']} graph(s), "
                      f"{time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    try:
        _worker_main(sys.argv[1], sys.argv[2])
    except BaseException:  # noqa: BLE001  (report anything, then exit without cleanup)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # don't wait in destroy_process_group for a peer that may be stuck
