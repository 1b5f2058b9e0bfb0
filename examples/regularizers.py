"""Does DropConnect (weight_dropout), zoneout or a forget-gate bias help a small LSTM generalise?
A small, honest comparison on generated data (well under 2 minutes on a quiet 2-core CPU).

Run it:  python examples/regularizers.py [--steps N --seeds N --train N]

The task (noisy next-step prediction)
-------------------------------------
Each sequence is a sum of two sines with random frequencies, phases and amplitudes plus Gaussian
noise; the target at step t is the noise-free signal at step t + 1. The training set is small
(default 48 sequences), so an over-sized model can memorise its noise; the held-out set (512
sequences from the same generator, other seeds) measures what it learnt. Loss: mean squared error
against the noise-free next value.

The models: the same lstm_fused.LSTM (one layer, H = 64, linear readout) trained with Adam for the
same number of full-batch steps from the same initial weights, in five settings: plain,
weight_dropout=0.5, forget_bias=1.0, both, and zoneout=0.1 (h and c each keep a unit's previous
value with probability 0.1 in training; eval uses the expectation). Reported per setting: the final training loss (in
eval mode) and the held-out loss, mean and spread over --seeds runs. Whichever way it comes out,
that is what is printed: no setting is tuned to win.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

import lstm_fused

SETTINGS = {
    "plain": {},
    "weight_dropout=0.5": {"weight_dropout": 0.5},
    "forget_bias=1.0": {"forget_bias": 1.0},
    "both": {"weight_dropout": 0.5, "forget_bias": 1.0},
    "zoneout=0.1": {"zoneout": 0.1},
}


def noisy_sines(n: int, T: int, generator: torch.Generator, noise: float = 0.3):
    """(inputs [T, n, 1] noisy signal, targets [T, n, 1] the clean signal one step later)."""
    t = torch.arange(T + 1, dtype=torch.float32).view(-1, 1, 1)

    def uniform(low, high):
        return low + (high - low) * torch.rand(1, n, 2, generator=generator)

    frequency, phase, amplitude = uniform(0.05, 0.4), uniform(0, 2 * math.pi), uniform(0.3, 1.0)
    clean = (amplitude * torch.sin(frequency * t + phase)).sum(-1, keepdim=True)
    noisy = clean + noise * torch.randn(clean.shape, generator=generator)
    return noisy[:-1], clean[1:]


class Predictor(nn.Module):
    def __init__(self, hidden: int, **regularizers):
        super().__init__()
        self.lstm = lstm_fused.LSTM(1, hidden, **regularizers)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.readout(self.lstm(x)[0])


def train_one(setting: dict, data, args, seed: int) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = Predictor(args.hidden, **setting)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    for _ in range(args.steps):
        model.train()
        loss = nn.functional.mse_loss(model(x_train), y_train)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        return {"train": nn.functional.mse_loss(model(x_train), y_train).item(),
                "test": nn.functional.mse_loss(model(x_test), y_test).item()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python examples/regularizers.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per run")
    parser.add_argument("--seeds", type=int, default=1, help="runs per setting")
    parser.add_argument("--train", type=int, default=48, help="training sequences")
    parser.add_argument("--test", type=int, default=512, help="held-out sequences")
    parser.add_argument("--length", type=int, default=40, help="steps per sequence")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = (noisy_sines(args.train, args.length, torch.Generator().manual_seed(0)),
            noisy_sines(args.test, args.length, torch.Generator().manual_seed(1)))
    results = {}
    for name, setting in SETTINGS.items():
        runs = [train_one(setting, data, args, seed) for seed in range(args.seeds)]
        results[name] = {key: [run[key] for run in runs] for key in ("train", "test")}
    print(f"noisy next-step prediction: {args.train} training / {args.test} held-out sequences "
          f"of {args.length} steps, H={args.hidden}, {args.steps} Adam steps, {args.seeds} seeds")
    print(f"  {'setting':20s} {'train MSE':>18s} {'held-out MSE':>18s}")
    for name, losses in results.items():
        cells = []
        for key in ("train", "test"):
            values = losses[key]
            cells.append(f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        print(f"  {name:20s} {cells[0]:>18s} {cells[1]:>18s}")
    best = min(results, key=lambda name: statistics.mean(results[name]["test"]))
    print(f"  lowest mean held-out loss: {best}; {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
