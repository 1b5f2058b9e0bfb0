"""Our inference forward in several configurations against torch.nn.LSTM, alternating for a
while in one process, with the host's state shown: the A/B check behind docs/batch-sweep.md.

    python benchmarks/forward_ab.py                                # B=16, chunk sizes, 60 s
    python benchmarks/forward_ab.py --batch 64 --chunk-rows 64,256 --seconds 120
    python benchmarks/forward_ab.py --gemm-modes simd,onednn --split-ms 9.6

Each round times nn.LSTM and every configuration (an input-projection chunk size,
`lstm_fused.cpu_gemm.projection_chunks`, times a forced GEMM path, `cpu_gemm.set_mode`), in an
order rotated from round to round, each over --calls calls, and keeps each configuration's ratio to that round's nn.LSTM time: the host
changes speed within minutes (its other tenants), and alternating lets every configuration see
the same host. It prints each configuration's median ratio and quartiles, and nn.LSTM's time
quartiles; with --split-ms the rounds where nn.LSTM took less and more than that many ms per
call are summarized apart (on the Zen 4 of 2026-12 the host moved between two states, nn.LSTM
at about 8.8 and 10.0 ms at B=16, and our forward slowed more than nn.LSTM's in the slow one).
T=100 I=H=256 float32, vanilla (--peephole diagonal for the peephole cell), --threads 2.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import lstm_fused
from lstm_fused import cpu_gemm

from bench import _cpu_name  # benchmarks/bench.py, beside this script


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256, help="I = H")
    parser.add_argument("--peephole", choices=["none", "diagonal"], default="none")
    parser.add_argument("--chunk-rows", default="0",
                        help="input-projection chunk sizes in rows (0: from the L2 cache size)")
    parser.add_argument("--gemm-modes", default="auto", help="cpu_gemm modes (auto, simd, ...)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--calls", type=int, default=3, help="calls per timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split-ms", type=float, default=0,
                        help="summarize rounds with nn.LSTM below / above this time apart")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    T, B, H = args.steps, args.batch, args.hidden
    x = torch.randn(T, B, H)
    reference = torch.nn.LSTM(H, H)
    peephole = None if args.peephole == "none" else args.peephole
    ours = lstm_fused.LSTM(H, H, peephole=peephole)
    configs = list(itertools.product([int(r) for r in args.chunk_rows.split(",")],
                                     args.gemm_modes.split(",")))

    def timed(module) -> float:
        start = time.perf_counter()
        for _ in range(args.calls):
            module(x)
        return (time.perf_counter() - start) / args.calls

    def run_ours(rows: int, mode: str) -> float:
        cpu_gemm.set_mode(mode)
        with cpu_gemm.projection_chunks(rows):
            return timed(ours)

    rounds = []  # (nn seconds, [ratio per config])
    with torch.no_grad():
        timed(reference)
        for config in configs:  # warm-up, and each forced path's weight preparation measured once
            run_ours(*config)
        # Each round starts one place further along the list (nn.LSTM, then the configurations):
        # the first after another model runs with that model's data in the caches, so a fixed
        # order favours the later ones (up to 5% at B = 1 on the Zen 4).
        runs = [lambda: timed(reference)] + [lambda c=c: run_ours(*c) for c in configs]
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            start = len(rounds) % len(runs)
            times = [0.0] * len(runs)
            for i in list(range(start, len(runs))) + list(range(start)):
                times[i] = runs[i]()
            rounds.append((times[0], [t / times[0] for t in times[1:]]))
    cpu_gemm.set_mode("auto")

    print(f"{_cpu_name()}, torch {torch.__version__}, "
          f"{args.threads} threads; T={T} B={B} I=H={H} {args.peephole}, forward under no_grad; "
          f"{len(rounds)} rounds of {args.calls} calls; chunk rows 0 = "
          f"{cpu_gemm.projection_chunk_rows(4 * H * 4)} here")
    groups = [("all rounds", rounds)]
    if args.split_ms > 0:
        groups += [(f"nn.LSTM < {args.split_ms} ms", [r for r in rounds if r[0] * 1e3 < args.split_ms]),
                   (f"nn.LSTM >= {args.split_ms} ms",
                    [r for r in rounds if r[0] * 1e3 >= args.split_ms])]
    for name, chosen in groups:
        if not chosen:
            print(f"{name}: no rounds")
            continue
        q = quartiles([r[0] * 1e3 for r in chosen])
        print(f"{name}: {len(chosen)} rounds, nn.LSTM {q[1]:.2f} ms per call "
              f"(quartiles {q[0]:.2f}-{q[2]:.2f})")
        for i, (rows, mode) in enumerate(configs):
            r = quartiles([round_[1][i] for round_ in chosen])
            print(f"  chunk rows {rows or 'auto':>5}  gemm {mode:<7} ratio {r[1]:.3f} "
                  f"(quartiles {r[0]:.3f}-{r[2]:.3f})")


if __name__ == "__main__":
    main()
