"""Inference time of an exported model in onnxruntime against our fused forward.

    python benchmarks/onnx_vs_fused.py                      # headline size, every variant
    python benchmarks/onnx_vs_fused.py --size 20,16,64,64 --variants vanilla,diagonal --repeats 5

For each variant, one lstm_fused.LSTM (one layer, float32) is exported with lstm_fused.onnx.export
(none/diagonal peepholes: one standard LSTM node; full peepholes: a Scan) and run in an
onnxruntime CPU session with --threads intra-op threads, next to the module's own forward under
torch.no_grad() with torch.set_num_threads(--threads), on the same input. Rounds time each
candidate once in turn; reported are medians in ms and onnxruntime / fused (> 1: ours is faster),
after checking that both give the same output. On a machine busy with other jobs, set
OMP_WAIT_POLICY=PASSIVE: with OpenMP's default spinning wait, the fused forward's barriers compete
with the other jobs and the time measures the load (see the README's Deploying section).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import onnxruntime
import torch

import lstm_fused
import lstm_fused.onnx

HEADLINE = (100, 64, 256, 256)  # T, B, I, H, as benchmarks/bench.py
VARIANTS = {"vanilla": (None, False), "diagonal": ("diagonal", False), "coupled": (None, True),
            "diag+coupled": ("diagonal", True), "full": ("full", False)}


def session_for(lstm: lstm_fused.LSTM, x: torch.Tensor, threads: int, directory: str):
    """An onnxruntime session running the exported `lstm` (input x [T, B, I] -> output)."""
    path = os.path.join(directory, "lstm.onnx")
    small = x[:2, :2]  # export at another size than the timed one: the graph is dynamic
    lstm_fused.onnx.export(lstm, (small,), path, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle onnxruntime threads would otherwise spin and steal the cores from the fused forward.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def median_ms(fns: dict, warmup: int, repeats: int) -> dict:
    """{name: median ms} over `repeats` rounds, each timing every fn once in rotating order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    T, B, I, H = args.size
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        for name in args.variants:
            peephole, coupled = VARIANTS[name]
            torch.manual_seed(0)
            lstm = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled).eval()
            session = session_for(lstm, x, args.threads, directory)
            feed = {session.get_inputs()[0].name: x.numpy()}
            error = float(np.abs(session.run(None, feed)[0] - lstm(x)[0].numpy()).max())
            if error > 1e-4:
                raise AssertionError(f"{name}: onnxruntime and fused differ by {error:.2e}")
            ms = median_ms({"fused": functools.partial(lstm, x),
                            "onnxruntime": functools.partial(session.run, None, feed)},
                           args.warmup, args.repeats)
            rows.append({"variant": name, "fused_ms": ms["fused"], "onnxruntime_ms": ms["onnxruntime"],
                         "ratio": ms["onnxruntime"] / ms["fused"], "max_abs_diff": error})
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python benchmarks/onnx_vs_fused.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=HEADLINE, help="T,B,I,H (default the headline 100,64,256,256)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                        help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if len(args.size) != 4 or min(args.size) < 1:
        parser.error(f"--size must be T,B,I,H (positive ints), got {args.size}")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    rows = run(args)
    print(f"T, B, I, H = {args.size}, float32, {args.threads} threads, {cpu_name()}, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; median of {args.repeats}")
    print(f"{'variant':<14}{'fused ms':>10}{'onnxruntime ms':>16}{'ort / fused':>13}{'max |diff|':>12}")
    for row in rows:
        print(f"{row['variant']:<14}{row['fused_ms']:>10.1f}{row['onnxruntime_ms']:>16.1f}"
              f"{row['ratio']:>13.2f}{row['max_abs_diff']:>12.1e}")
    return rows


if __name__ == "__main__":
    main()
