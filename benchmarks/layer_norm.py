"""The layer-normalised LSTM (lstm_fused.LSTM(layer_norm=True)) against what a user would write
in plain PyTorch, and against torch.nn.LSTM's vanilla LSTM, forward and forward + backward.

    python benchmarks/layer_norm.py                      # T=100 B=64 I=H=256 float32, CPU
    python benchmarks/layer_norm.py --size 6,3,4,8 --repeats 2 --no-compile   # a toy run (test)

Candidates (one layer, the same weights where the function is the same):
    fused LN-LSTM             lstm_fused.LSTM(I, H, layer_norm=True)
    loop of nn.LayerNorm      the best plain-PyTorch LN-LSTM: the input projection of all steps
                              as one GEMM, then per step h W_hhᵀ, one nn.LayerNorm per gate
                              (weight γ_k, bias = b_ih,k + b_hh,k, as TFLite), the activations
    the loop, compiled        the same module under torch.compile (default mode); compile time
                              is excluded (warm-up calls)
    nn.LSTM                   torch.nn.LSTM(I, H), vanilla, no norm (oneDNN/MKL on the CPU)

Reported: median ms over rotating rounds (every candidate once per round, so all see the same
noise) and the per-round-median ratios fused / compiled loop (target <= 0.5) and fused / nn.LSTM
(target <= 1.3), for "forward" (no_grad) and "fwd+bwd" (forward, sum, backward). And the GEMM
floor of each mode (regularizer_cost.gemm_floors: the layer's GEMM FLOPs at the best GEMM rate
measured in the run), below which no implementation on this CPU can run, with floor / compiled
loop: the lowest ratio any implementation could reach.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch
import torch.nn.functional as F
from onnx_vs_fused import cpu_name  # benchmarks/, beside this script
from regularizer_cost import gemm_floors, measure
from torch import nn

import lstm_fused


class LayerNormLSTMLoop(nn.Module):
    """A plain-PyTorch LN-LSTM (no peepholes), the equations of lstm_fused's layer_norm=True:
    ẑ_k = LayerNorm_k(W_ih,k x + W_hh,k h) with γ_k and the biases as the norm's shift."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        H = hidden_size
        self.hidden_size = H
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.norms = nn.ModuleList(nn.LayerNorm(H) for _ in range(4))

    def load_from(self, lstm: lstm_fused.LSTM) -> LayerNormLSTMLoop:
        with torch.no_grad():
            self.weight_ih.copy_(lstm.weight_ih_l0)
            self.weight_hh.copy_(lstm.weight_hh_l0)
            shift = (lstm.bias_ih_l0 + lstm.bias_hh_l0).chunk(4)
            for k, norm in enumerate(self.norms):
                norm.weight.copy_(lstm.weight_ln_l0[k])
                norm.bias.copy_(shift[k])
        return self

    def forward(self, x):
        T, B, _ = x.shape
        H = self.hidden_size
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        projected = F.linear(x, self.weight_ih)
        outputs = []
        for t in range(T):
            v = (projected[t] + F.linear(h, self.weight_hh)).chunk(4, 1)
            i = torch.sigmoid(self.norms[0](v[0]))
            f = torch.sigmoid(self.norms[1](v[1]))
            g = torch.tanh(self.norms[2](v[2]))
            o = torch.sigmoid(self.norms[3](v[3]))
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))


def build(size, compile_loop: bool) -> dict[str, nn.Module]:
    _, _, I, H = size
    torch.manual_seed(0)
    fused = lstm_fused.LSTM(I, H, layer_norm=True)
    with torch.no_grad():  # γ away from ones: the candidates must agree on a real γ
        fused.weight_ln_l0.uniform_(0.5, 1.5)
    loop = LayerNormLSTMLoop(I, H).load_from(fused)
    models = {"fused LN-LSTM": fused, "loop of nn.LayerNorm": loop}
    if compile_loop:
        models["the loop, compiled"] = torch.compile(LayerNormLSTMLoop(I, H).load_from(fused))
    vanilla = nn.LSTM(I, H)
    models["nn.LSTM (vanilla)"] = vanilla
    return models


def check_same_function(models, x) -> float:
    """The fused LN-LSTM and the loops compute the same function: the largest difference of the
    outputs (an AssertionError past 1e-4)."""
    with torch.no_grad():
        expected = models["fused LN-LSTM"](x)[0]
        error = max((models[name](x)[0] - expected).abs().max().item()
                    for name in models if name.startswith(("loop", "the loop")))
    if error > 1e-4:
        raise AssertionError(f"the fused LN-LSTM and the plain loop differ by {error:.2e}")
    return error


def run(model, x, mode):
    if mode == "forward":
        with torch.no_grad():
            model(x)
        return
    model.zero_grad(set_to_none=True)
    out, _ = model(x)
    out.sum().backward()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/layer_norm.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=(100, 64, 256, 256), help="T,B,I,H (default 100,64,256,256)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile candidate (compiling takes a while)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    T, B, I, H = args.size
    models = build(args.size, not args.no_compile)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(2))
    error = check_same_function(models, x)
    result = {"cpu": cpu_name(), "isa": {"torch": torch.backends.cpu.get_cpu_capability(),
                                         "lstm_fused": torch.ops.lstm_fused.cpu_kernel_isa()},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "size": {"T": T, "B": B, "I": I, "H": H}, "repeats": args.repeats,
              "max_abs_diff_vs_loop": error, "modes": {}}
    print(f"{result['cpu']} (kernels {result['isa']['lstm_fused']}, ATen "
          f"{result['isa']['torch']}), {result['threads']} threads, torch {torch.__version__}; "
          f"T={T} B={B} I={I} H={H} float32, {args.repeats} rounds")
    print(f"  {'':22s} {'forward ms':>12s} {'fwd+bwd ms':>12s}")
    for mode in ("forward", "fwd+bwd"):
        times = measure(models, functools.partial(run, x=x, mode=mode), args.warmup,
                        args.repeats)
        def ratio(other, times=times):
            return statistics.median(a / b for a, b in zip(times["fused LN-LSTM"], times[other],
                                                           strict=True))

        result["modes"][mode] = {
            "median_ms": {name: statistics.median(t) for name, t in times.items()},
            "ratio_vs_compiled_loop": (ratio("the loop, compiled")
                                       if "the loop, compiled" in times else None),
            "ratio_vs_loop": ratio("loop of nn.LayerNorm"),
            "ratio_vs_nn_lstm": ratio("nn.LSTM (vanilla)"),
        }
    for name in models:
        row = [result["modes"][m]["median_ms"][name] for m in ("forward", "fwd+bwd")]
        print(f"  {name:22s} {row[0]:12.2f} {row[1]:12.2f}")
    for key, label, target in (("ratio_vs_compiled_loop", "fused / compiled loop", "<= 0.50"),
                               ("ratio_vs_loop", "fused / eager loop", ""),
                               ("ratio_vs_nn_lstm", "fused / nn.LSTM", "<= 1.30")):
        values = [result["modes"][m][key] for m in ("forward", "fwd+bwd")]
        if values[0] is None:
            continue
        print(f"  {label:22s} {values[0]:11.3f}x {values[1]:11.3f}x"
              + (f"   (target {target})" if target else ""))
    floors = gemm_floors(args.size)
    result["gemm_floor"] = floors
    print(f"  {'GEMM floor':22s} {floors['forward']:12.2f} {floors['fwd+bwd']:12.2f}"
          f"   (at {floors['gflops']:.0f} GFLOP/s)")
    if "the loop, compiled" in models:
        lowest = [floors[m] / result["modes"][m]["median_ms"]["the loop, compiled"]
                  for m in ("forward", "fwd+bwd")]
        result["floor_ratio_vs_compiled_loop"] = dict(zip(("forward", "fwd+bwd"), lowest))
        print(f"  {'floor / compiled loop':22s} {lowest[0]:11.3f}x {lowest[1]:11.3f}x"
              "   (the lowest reachable)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
