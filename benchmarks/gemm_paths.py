"""The per-step recurrent GEMM of each CPU path side by side, by batch size, in one process.

    python benchmarks/gemm_paths.py                      # B = 1..32, I=H=256, 2 threads
    python benchmarks/gemm_paths.py --batches 4,8 --hidden 128 --threads 1
    python benchmarks/gemm_paths.py --weight-gradients --batches 16,64,256

For each batch size B: the measured choice's trial medians (csrc/gemm.cpp: interleaved rounds of
aten, onednn, packed and simd, each GEMM [B, H] x [4H, H]^T into the gates), the path it chose,
and per time step a whole forward step, lstm_fused.LSTM (auto) against torch.nn.LSTM (oneDNN),
both timed in alternating rounds on the same input (T steps, median per step).

--weight-gradients: the training backward's weight-gradient GEMM instead (dz^T x: [4H, I] summed
over the T*B rows, T = --steps), the paths that take transposed operands (ATen's mm, our simd
kernel) side by side: its measured choice made afresh --measurements times (each one interleaved
rounds of both paths, csrc/gemm.cpp), the medians of their trial medians, GFLOP/s and ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lstm_fused


def per_step_us(module, x, rounds: int) -> list[float]:
    times = []
    with torch.no_grad():
        module(x)
        for _ in range(rounds):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) / x.shape[0] * 1e6)
    return times


def weight_gradient_rows(args) -> list[dict]:
    H = args.hidden
    print(f"threads {args.threads}, I=H={H}, T={args.steps}, ATen "
          f"{torch.backends.cpu.get_cpu_capability()}; weight-gradient GEMM [4H, I] over T*B rows: "
          f"median over {args.measurements} measurements of each path's trial median")
    print(f"{'B':>4} {'rows':>6} {'aten ms':>8} {'simd ms':>8} {'aten GF/s':>9} {'simd GF/s':>9} "
          f"{'simd/aten':>9}")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        module, x = lstm_fused.LSTM(H, H), torch.randn(args.steps, B, H)
        seconds = {}
        for _ in range(args.measurements):
            lstm_fused.cpu_gemm.clear()
            module(x)[0].sum().backward()
            (choice,) = [c for c in lstm_fused.cpu_gemm.choices()
                         if c.transposed and (c.rows, c.n) == (4 * H, H)]
            for path, s in choice.seconds.items():
                seconds.setdefault(path, []).append(s)
        median = {path: statistics.median(s) for path, s in seconds.items()}
        flops = 2 * 4 * H * H * args.steps * B
        row = {"B": B, "rows": args.steps * B, "ms": {q: s * 1e3 for q, s in median.items()},
               "gflops": {q: flops / s / 1e9 for q, s in median.items()},
               "ratio": median.get("simd", float("nan")) / median["aten"]}
        rows.append(row)
        ms, gf = row["ms"], row["gflops"]
        print(f"{B:>4} {row['rows']:>6} {ms['aten']:>8.3f} {ms.get('simd', float('nan')):>8.3f} "
              f"{gf['aten']:>9.0f} {gf.get('simd', float('nan')):>9.0f} {row['ratio']:>9.3f}",
              flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,2,4,8,16,24,32")
    p.add_argument("--hidden", type=int, default=256, help="I = H")
    p.add_argument("--steps", type=int, default=50, help="T of the whole-step timing")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weight-gradients", action="store_true",
                   help="the weight-gradient GEMM of the backward instead (T = --steps)")
    p.add_argument("--measurements", type=int, default=5,
                   help="--weight-gradients: fresh measured choices per batch size")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.weight_gradients:
        return weight_gradient_rows(args)
    H = args.hidden
    paths = lstm_fused.cpu_gemm.available(torch.float32)
    print(f"threads {args.threads}, I=H={H}, ATen {torch.backends.cpu.get_cpu_capability()}; "
          "GEMM: trial median us per path; step: us per time step (median of rounds)")
    print(f"{'B':>3} " + " ".join(f"{q:>8}" for q in paths) + f" {'chosen':>8} {'fused':>8} "
          f"{'nn.LSTM':>8} {'ratio':>6}")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        theirs = torch.nn.LSTM(H, H)
        ours = lstm_fused.LSTM(H, H)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(args.steps, B, H)
        fused, nn_times = [], []
        for _ in range(args.rounds):  # alternating, so both see the same machine noise
            fused += per_step_us(ours, x, 1)
            nn_times += per_step_us(theirs, x, 1)
        (choice,) = [c for c in lstm_fused.cpu_gemm.choices()
                     if c.repeated and (c.rows, c.n, c.k) == (B, 4 * H, H)] or [None]
        seconds = choice.seconds if choice else {}
        ratio = statistics.median(a / b for a, b in zip(fused, nn_times))
        row = {"B": B, "gemm_us": {q: s * 1e6 for q, s in seconds.items()},
               "chosen": choice.path if choice else lstm_fused.cpu_gemm.get_mode(),
               "fused_us": statistics.median(fused), "nn_us": statistics.median(nn_times),
               "ratio": ratio}
        rows.append(row)
        gemm = " ".join(f"{row['gemm_us'].get(q, float('nan')):>8.2f}" for q in paths)
        print(f"{B:>3} {gemm} {row['chosen']:>8} {row['fused_us']:>8.2f} {row['nn_us']:>8.2f} "
              f"{ratio:>6.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
