"""The cost of DropConnect (weight_dropout) and zoneout in lstm_fused.LSTM, forward + backward,
training mode.

    python benchmarks/regularizer_cost.py                       # T=100 B=64 I=H=256, p=0.3
    python benchmarks/regularizer_cost.py --size 10,4,16,16 --repeats 3   # a toy run (the test)

Candidates, each one training step (forward, sum of the output, backward) on the same input:
    fused                   lstm_fused.LSTM, weight_dropout=0 (the same model without it)
    fused + DropConnect     lstm_fused.LSTM(weight_dropout=p): one mask per call, fused time loop
    nn.LSTM + WeightDrop    what users do today (AWD-LSTM's WeightDrop): a wrapper that keeps the
                            raw weight_hh_l0 as its own parameter and, before each call, assigns
                            F.dropout(raw) to nn.LSTM's weight_hh_l0 attribute
    fused + zoneout         lstm_fused.LSTM(zoneout=z): masks drawn once per call, consumed by the
                            fused time loop and its backward
    nn.LSTMCell loop + zoneout  what users do today: a Python loop over time of torch.nn.LSTMCell,
                            each step's (h, c) mixed with the previous ones by the same masks

Reported: median ms over rotating rounds (every candidate timed once per round, so all see the
same machine noise) and four ratios, each the median of the per-round ratios: DropConnect / fused
and zoneout / fused (targets <= 1.10), DropConnect / WeightDrop and zoneout / the cell loop
(targets <= 0.5). And the GEMM floor: the FLOPs of the six GEMMs every LSTM training step
needs (forward x W_ih and h W_hh, backward dx, dh, dW_ih, dW_hh: 3 T B 4H (I + H) multiply-adds,
2 FLOPs each) at the fastest GEMM rate measured here (bench.py's GEMM peak: the step's GEMM
shapes through torch.mm and oneDNN, the best), so no implementation on this CPU can train faster
than it; floor / WeightDrop and floor / cell loop are the lowest ratios any could reach.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from onnx_vs_fused import cpu_name
from torch import nn

import lstm_fused

from bench import Timer, measure_gemm_peak  # benchmarks/, beside this script


class WeightDrop(nn.Module):
    """AWD-LSTM's weight-replacing DropConnect around torch.nn.LSTM (one layer): the parameter
    lives in the wrapper as `weight_hh_raw`; each forward assigns its dropped copy to the LSTM."""

    def __init__(self, lstm: nn.LSTM, p: float):
        super().__init__()
        self.lstm, self.p = lstm, p
        self.weight_hh_raw = nn.Parameter(lstm.weight_hh_l0.detach().clone())
        del lstm._parameters["weight_hh_l0"]
        lstm.weight_hh_l0 = self.weight_hh_raw.detach()  # a plain tensor in the parameter's slot

    def forward(self, x):
        # nn.LSTM.__setattr__ refreshes _flat_weights for a name in _flat_weights_names
        self.lstm.weight_hh_l0 = F.dropout(self.weight_hh_raw, p=self.p, training=self.training)
        return self.lstm(x)


class ZoneoutCellLoop(nn.Module):
    """Zoneout as users write it without lstm_fused: a Python loop over time of nn.LSTMCell, each
    step's new (h, c) mixed with the previous ones by Bernoulli(p) keep masks ([T, B, H] for
    h, then for c, drawn with torch's bernoulli_ as users do), the expectation in eval. `draw`
    replaces the draw (check_same_function gives it lstm_fused's)."""

    def __init__(self, cell: nn.LSTMCell, p: float):
        super().__init__()
        self.cell, self.p = cell, p
        self.draw = lambda like, size, p: like.new_empty(size).bernoulli_(p)

    def forward(self, x):
        T, B, _ = x.shape
        h = c = x.new_zeros(B, self.cell.hidden_size)
        if self.training:
            keep_h, keep_c = (self.draw(x, (T, B, self.cell.hidden_size), self.p)
                              for _ in range(2))
        outputs = []
        for t in range(T):
            h_new, c_new = self.cell(x[t], (h, c))
            if self.training:
                h, c = torch.lerp(h_new, h, keep_h[t]), torch.lerp(c_new, c, keep_c[t])
            else:
                h, c = torch.lerp(h_new, h, self.p), torch.lerp(c_new, c, self.p)
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))


def build(size, p, zoneout):
    _, _, I, H = size
    torch.manual_seed(0)
    plain = lstm_fused.LSTM(I, H)
    dropped = lstm_fused.LSTM(I, H, weight_dropout=p)
    dropped.load_state_dict(plain.state_dict())
    theirs = nn.LSTM(I, H)
    theirs.load_state_dict(plain.state_dict())
    wrapped = WeightDrop(theirs, p)
    zoned = lstm_fused.LSTM(I, H, zoneout=zoneout)
    zoned.load_state_dict(plain.state_dict())
    cell = nn.LSTMCell(I, H)
    cell.load_state_dict({name[:-3]: value for name, value in plain.state_dict().items()})
    return {"fused": plain, "fused + DropConnect": dropped, "nn.LSTM + WeightDrop": wrapped,
            "fused + zoneout": zoned, "nn.LSTMCell loop + zoneout": ZoneoutCellLoop(cell, zoneout)}


# (ours, what users do today): pairs that draw the same masks from the same seed.
SAME_FUNCTION = (("fused + DropConnect", "nn.LSTM + WeightDrop"),
                 ("fused + zoneout", "nn.LSTMCell loop + zoneout"))


def check_same_function(models, x) -> float:
    """Each pair of SAME_FUNCTION draws the same masks from the same seed (the cell loop with
    lstm_fused's draw for this check): same output. Returns the largest difference (an
    AssertionError past 1e-4)."""
    loop = models["nn.LSTMCell loop + zoneout"]
    users_draw, loop.draw = loop.draw, lstm_fused.functional.keep_mask
    errors = []
    for pair in SAME_FUNCTION:
        outputs = []
        for name in pair:
            torch.manual_seed(1)
            with torch.no_grad():
                outputs.append(models[name](x)[0])
        error = (outputs[0] - outputs[1]).abs().max().item()
        if error > 1e-4:
            raise AssertionError(f"{pair[0]} and {pair[1]} differ by {error:.2e}")
        errors.append(error)
    loop.draw = users_draw
    return max(errors)


def step(model, x):
    model.zero_grad(set_to_none=True)
    out, _ = model(x)
    out.sum().backward()


def measure(models, call, warmup, repeats) -> dict[str, list[float]]:
    """{name: [ms of call(model) per round]}: `warmup` untimed rounds, then `repeats` rounds in
    which every model runs once, the order rotated each round (benchmarks/layer_norm.py too)."""
    names = list(models)
    for _ in range(warmup):
        for name in names:
            call(models[name])
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            start = time.perf_counter()
            call(models[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def gemm_floors(size) -> dict:
    """The GEMM floors of one LSTM layer at the best GEMM rate measured now (bench.py's GEMM
    peak): {"forward": ms, "fwd+bwd": ms, "gflops": the rate}. Forward: x W_ih and h W_hh,
    2 T B 4H (I + H) FLOPs; forward + backward three times that (dx, dh, dW_ih, dW_hh)."""
    T, B, I, H = size
    device = torch.device("cpu")
    peak = measure_gemm_peak(size, SimpleNamespace(device=device, dtype=torch.float32),
                             Timer(device))
    gflops = peak["peak_gflops"]
    forward_ms = 2 * T * B * 4 * H * (I + H) / (gflops * 1e9) * 1e3
    return {"forward": forward_ms, "fwd+bwd": 3 * forward_ms, "gflops": gflops}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/regularizer_cost.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=(100, 64, 256, 256), help="T,B,I,H (default 100,64,256,256)")
    parser.add_argument("--p", type=float, default=0.3, help="weight_dropout rate")
    parser.add_argument("--zoneout", type=float, default=0.1, help="zoneout rate (h and c)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    T, B, I, H = args.size
    models = build(args.size, args.p, args.zoneout)
    for model in models.values():
        model.train()
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(2))
    error = check_same_function(models, x)
    times = measure(models, lambda model: step(model, x), args.warmup, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    floors = gemm_floors(args.size)
    floor, gflops = floors["fwd+bwd"], floors["gflops"]
    def ratio(ours, other):
        return statistics.median(a / b for a, b in zip(times[ours], times[other], strict=True))

    result = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "size": {"T": T, "B": B, "I": I, "H": H}, "p": args.p, "zoneout": args.zoneout,
        "repeats": args.repeats, "median_ms": median, "max_abs_diff_vs_wrapper": error,
        "ratio_vs_plain": ratio("fused + DropConnect", "fused"),
        "ratio_vs_wrapper": ratio("fused + DropConnect", "nn.LSTM + WeightDrop"),
        "zoneout_ratio_vs_plain": ratio("fused + zoneout", "fused"),
        "zoneout_ratio_vs_cell_loop": ratio("fused + zoneout", "nn.LSTMCell loop + zoneout"),
        "gemm_gflops": gflops, "gemm_floor_ms": floor,
        "floor_ratio_vs_wrapper": floor / median["nn.LSTM + WeightDrop"],
        "floor_ratio_vs_cell_loop": floor / median["nn.LSTMCell loop + zoneout"],
    }
    print(f"{result['cpu']}, {result['threads']} threads, torch {torch.__version__}; "
          f"T={T} B={B} I={I} H={H}, weight_dropout={args.p}, zoneout={args.zoneout}, "
          f"forward + backward, {args.repeats} rounds")
    for name, ms in median.items():
        print(f"  {name:26s} {ms:9.2f} ms")
    print(f"  DropConnect / fused         {result['ratio_vs_plain']:.3f}x   (target <= 1.10)")
    print(f"  DropConnect / WeightDrop    {result['ratio_vs_wrapper']:.3f}x   (target <= 0.50)")
    print(f"  zoneout / fused             {result['zoneout_ratio_vs_plain']:.3f}x   "
          f"(target <= 1.10)")
    print(f"  zoneout / nn.LSTMCell loop  {result['zoneout_ratio_vs_cell_loop']:.3f}x   "
          f"(target <= 0.50)")
    print(f"  GEMM floor {floor:.1f} ms (the step's GEMM FLOPs at {gflops:.0f} GFLOP/s): "
          f"{result['floor_ratio_vs_wrapper']:.3f}x WeightDrop, "
          f"{result['floor_ratio_vs_cell_loop']:.3f}x the cell loop (the lowest reachable)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
