"""The per-step recurrent GEMM of each CPU path side by side, by batch size, in one process.

    python benchmarks/gemm_paths.py                      # B = 1..32, I=H=256, 2 threads
    python benchmarks/gemm_paths.py --batches 4,8 --hidden 128 --threads 1
    python benchmarks/gemm_paths.py --weight-gradients --batches 16,64,256

For each batch size B: the measured choice's trial medians (csrc/gemm.cpp: interleaved rounds of
aten, onednn, packed and simd, each GEMM [B, H] x [4H, H]^T into the gates), the path it chose,
and per time step a whole forward step, lstm_fused.LSTM (auto) against torch.nn.LSTM (oneDNN),
both timed in alternating rounds on the same input (T steps, median per step).

--weight-gradients: the training backward's GEMMs after the loop instead, T = --steps: the weight
gradient dz^T x ([4H, I] summed over the T*B rows; ATen's mm or our simd kernel, the paths that
take transposed operands) and the input gradient dz W_ih ([T*B, I], every one-off path), each
measured choice made afresh --measurements times (each one interleaved rounds of its paths,
csrc/gemm.cpp): the medians of the trial medians, GFLOP/s and the simd/aten ratio.
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


# The backward's one-off GEMMs after the loop: (label, the choice's selector given H).
BACKWARD_GEMMS = (
    ("weight gradient dz^T x [4H, I]", lambda c, H: c.transposed and (c.rows, c.n) == (4 * H, H)),
    ("input gradient dz W_ih [T*B, I]",
     lambda c, H: not (c.repeated or c.transposed) and (c.n, c.k) == (H, 4 * H)),
)


def weight_gradient_rows(args) -> list[dict]:
    H = args.hidden
    print(f"threads {args.threads}, I=H={H}, T={args.steps}, ATen "
          f"{torch.backends.cpu.get_cpu_capability()}; the backward's GEMMs over T*B rows: median "
          f"over {args.measurements} measurements of each path's trial median, ms (GFLOP/s)")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        module = lstm_fused.LSTM(H, H)
        x = torch.randn(args.steps, B, H, requires_grad=True)
        seconds = {label: {} for label, _ in BACKWARD_GEMMS}
        for _ in range(args.measurements):
            lstm_fused.cpu_gemm.clear()
            module(x)[0].sum().backward()
            for label, selects in BACKWARD_GEMMS:
                (choice,) = [c for c in lstm_fused.cpu_gemm.choices() if selects(c, H)]
                for path, s in choice.seconds.items():
                    seconds[label].setdefault(path, []).append(s)
        flops = 2 * 4 * H * H * args.steps * B
        for label, _ in BACKWARD_GEMMS:
            median = {path: statistics.median(s) for path, s in seconds[label].items()}
            row = {"B": B, "rows": args.steps * B, "gemm": label,
                   "ms": {q: s * 1e3 for q, s in median.items()},
                   "gflops": {q: flops / s / 1e9 for q, s in median.items()},
                   "ratio": median.get("simd", float("nan")) / median["aten"]}
            rows.append(row)
            paths = "  ".join(f"{q} {row['ms'][q]:.3f} ({row['gflops'][q]:.0f})" for q in median)
            print(f"B={B:<4} {label:<32} {paths}  simd/aten {row['ratio']:.3f}", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,2,4,8,16,24,32")
    p.add_argument("--hidden", type=int, default=256, help="I = H")
    p.add_argument("--steps", type=int, default=50, help="T of the whole-step timing")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weight-gradients", action="store_true",
                   help="the backward's weight- and input-gradient GEMMs instead (T = --steps)")
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
