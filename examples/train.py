"""Train a peephole LSTM with lstm_fused, as you would torch.nn.LSTM: a small synthetic task.

Run it:  python examples/train.py [--steps 150] [--peephole diagonal|full|none] [--coupled]

The task: the input is a sequence of random values in 3 channels; the target at each step is the
running mean of channel 0 so far, which the network can only produce by remembering. The model is
`lstm_fused.LSTM` and a linear read-out; everything else (optimizer, loss, backward) is plain
PyTorch.
"""

import argparse

import torch
from torch import nn

import lstm_fused


class Model(nn.Module):
    def __init__(self, peephole, coupled):
        super().__init__()
        self.lstm = lstm_fused.LSTM(3, 32, batch_first=True, peephole=peephole, coupled=coupled)
        self.readout = nn.Linear(32, 1)

    def forward(self, x):  # x [B, T, 3] -> [B, T, 1]
        out, _ = self.lstm(x)
        return self.readout(out)


def batch(generator, size=32, steps=20):
    x = torch.randn(size, steps, 3, generator=generator)
    target = x[..., :1].cumsum(1) / torch.arange(1, steps + 1).view(1, steps, 1)
    return x, target


def main(argv=None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--peephole", default="diagonal", choices=["none", "diagonal", "full"])
    parser.add_argument("--coupled", action="store_true", help="coupled input/forget gates")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = Model(None if args.peephole == "none" else args.peephole, args.coupled)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(0)
    test_x, test_y = batch(torch.Generator().manual_seed(1), size=256)
    with torch.no_grad():
        first = nn.functional.mse_loss(model(test_x), test_y).item()
    for step in range(args.steps):
        x, y = batch(data)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d}  train MSE {loss.item():.4f}")
    with torch.no_grad():
        last = nn.functional.mse_loss(model(test_x), test_y).item()
    print(f"held-out MSE: {first:.4f} before training, {last:.4f} after {args.steps} steps")
    return first, last


if __name__ == "__main__":
    main()
