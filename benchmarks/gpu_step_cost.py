"""Expected cost per time step of one LSTM layer on a GPU: the model behind docs/gpu.md, and the
measurement that checks it on a GPU.

    python benchmarks/gpu_step_cost.py                  # print the model (tables of docs/gpu.md)
    python benchmarks/gpu_step_cost.py --measure        # on a GPU: time fused vs cuDNN, CUDA events

The counts come from the code, not from profiling: GEMM shapes from csrc/layer.cpp (one
recurrent GEMM per step, the input projection and weight gradients as GEMMs over all T*B rows),
values loaded and stored per element by forward_chunk/backward_chunk in csrc/pointwise.h, and
kernel launches per step from the time loops (tests/test_layer.py::test_device_operations_per_step
counts them with the profiler on the CPU). GEMM FLOPs come from the benchmark's model
(bench.gemm_flops).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from bench import gemm_flops  # benchmarks/bench.py, beside this script

T, B, I, H = 100, 64, 512, 512  # the configuration docs/gpu.md answers for

# H100 SXM5 datasheet peaks (dense, no sparsity), bytes/s and FLOP/s.
H100 = {"hbm_bytes_per_s": 3.35e12,
        "flops_per_s": {"float32": 66.9e12,     # FP32 on CUDA cores (PyTorch's default: no TF32)
                        "tf32": 494.7e12,      # TF32 tensor cores
                        "bfloat16": 989.4e12,  # BF16/FP16 tensor cores
                        "float16": 989.4e12}}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Variant:
    name: str
    peephole: str | None  # None, "diagonal", "full"
    coupled: bool

    @property
    def gates(self) -> int:  # G
        return 3 if self.coupled else 4

    @property
    def peepholes(self) -> int:  # P
        return 2 if self.coupled else 3


VARIANTS = [Variant("vanilla", None, False), Variant("diagonal", "diagonal", False),
            Variant("coupled", None, True), Variant("coupled+diagonal", "diagonal", True),
            Variant("full", "full", False), Variant("coupled+full", "full", True)]


def pointwise_values_per_element(v: Variant, direction: str) -> tuple[int, int]:
    """(loads, stores) per hidden unit and row in one step of the fused kernel(s) of
    csrc/pointwise.h, for padded input without projection (the layer's common case). Diagonal
    peephole weights are [P, H] per step, shared by all rows: cache hits, not counted here."""
    G = v.gates
    if direction == "forward":
        # All:   load c_prev, z (G blocks); store gates (G), c_out, c_state, h_out.
        # Full:  Update loads c_prev, z_i/z_f/z_g (G-1), stores G-1 gates, c_out, c_state;
        #        Output loads c_out, z_o, stores o, h_out.
        return (G + 1, G + 3) if v.peephole != "full" else (G + 2, G + 3)
    # All:   load dc_in, grad_h, grad_h2 (dh from the step's GEMM), o, c, the other G-1 gates,
    #        c_prev; store dz (G blocks), dc_prev.
    # Full:  Output loads dc_in, grad_h, grad_h2, o, c, stores dz_o, dc, zero into grad_h2;
    #        Update loads dc, G-1 gates, c_prev, stores G-1 dz blocks, dc_prev.
    return (G + 5, G + 1) if v.peephole != "full" else (G + 6, G + 3)


def launches_per_step(v: Variant, direction: str) -> int:
    """Kernels per time step in csrc/layer.cpp (cuBLAS may split a GEMM into 2 kernels)."""
    # forward: recurrent GEMM + pointwise; full: + Update part + output-peephole GEMM.
    # backward: pointwise + dh GEMM; full: + Output part + dc GEMM.
    return 4 if v.peephole == "full" else 2


def gemm_flops_per_step(v: Variant, direction: str) -> int:
    """GEMM FLOPs per step as layer.cpp executes them: the benchmark's FLOP model (bench.py,
    useful FLOPs; backward = 2x forward; work done once per sequence divided by T), plus, for full
    peepholes, the zero blocks that the stacked recurrent GEMM multiplies: [W_hh | W_c(i,f)] over
    [h, c] (layer.cpp) multiplies c by all G gate blocks where P - 1 carry peepholes, 2*B*H*H*(G -
    P + 1) = 4*B*H*H more FLOPs per step, in the forward and again in the backward."""
    useful = gemm_flops(1, B, I, H, (v.peephole, v.coupled), 0, "fwd")
    stacked_zero_blocks = 2 * B * H * H * (v.gates - v.peepholes + 1) if v.peephole == "full" else 0
    return useful * (1 if direction == "forward" else 2) + stacked_zero_blocks


def step_cost(v: Variant, dtype: str, direction: str) -> dict:
    loads, stores = pointwise_values_per_element(v, direction)
    e = ELEMENT_BYTES[dtype]
    pointwise_bytes = B * H * (loads + stores) * e
    flops = gemm_flops_per_step(v, direction)
    return {"flops": flops, "pointwise_bytes": pointwise_bytes, "loads": loads, "stores": stores,
            "launches": launches_per_step(v, direction),
            "gemm_us": flops / H100["flops_per_s"][dtype] * 1e6,
            "pointwise_us": pointwise_bytes / H100["hbm_bytes_per_s"] * 1e6}


HEADER = ("| variant | dtype | direction | GEMM MFLOP/step | pointwise loads+stores per element "
          "| pointwise KiB/step | launches/step | GEMM floor µs | pointwise floor µs |")
FOOTNOTE = ("float16 has bfloat16's numbers. Floors: GEMM FLOPs at the H100 SXM peak for the dtype "
            "(float32: 66.9 TFLOP/s on CUDA cores, PyTorch's default without TF32; "
            "bfloat16/float16: 989 TFLOP/s dense tensor cores), pointwise bytes at 3.35 TB/s HBM3.")


def render_markdown() -> str:
    """The tables of docs/gpu.md, between its cost-model markers."""
    lines = [f"T={T}, B={B}, I={I}, H={H}, one layer, one direction, padded input, no projection.",
             "", HEADER,
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        for dtype in ("float32", "bfloat16"):
            for direction in ("forward", "backward"):
                c = step_cost(v, dtype, direction)
                lines.append(f"| {v.name} | {dtype} | {direction} | {c['flops'] / 1e6:.1f} | "
                             f"{c['loads']}+{c['stores']} | {c['pointwise_bytes'] / 1024:.0f} | "
                             f"{c['launches']} | {c['gemm_us']:.2f} | {c['pointwise_us']:.2f} |")
    lines += ["", FOOTNOTE]
    return "\n".join(lines) + "\n"


# --- measurement (needs a GPU) ----------------------------------------------------------------


def measure(dtypes: list[str], repeats: int) -> None:
    import torch

    import lstm_fused

    if not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}; T={T} B={B} I={I} H={H}; median of {repeats}; "
          f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
          f"cuDNN {torch.backends.cudnn.allow_tf32}")
    print("| module | dtype | fwd µs/step | fwd+bwd µs/step |\n|---|---|---:|---:|")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=True)
        modules = {"nn.LSTM (cuDNN)": torch.nn.LSTM(I, H, device=device, dtype=dtype)}
        for v in VARIANTS:
            modules[f"lstm_fused {v.name}"] = lstm_fused.LSTM(
                I, H, peephole=v.peephole, coupled=v.coupled, device=device, dtype=dtype)
        for name, module in modules.items():
            fwd = _time_us(lambda m=module, x=x: m(x)[0], repeats, no_grad=True)
            fwdbwd = _time_us(lambda m=module, x=x: m(x)[0].sum().backward(), repeats,
                              no_grad=False)
            print(f"| {name} | {dtype_name} | {fwd / T:.1f} | {fwdbwd / T:.1f} |")


def kernels_per_step(module, batch: int, direction: str, steps=(10, 30)) -> tuple[float, dict]:
    """CUDA kernels per time step of `module` (an LSTM on a GPU) counted with torch.profiler:
    the kernels of a run of steps[1] steps minus those of steps[0] steps, divided by the
    difference, so per-call kernels cancel. direction "forward" profiles a no_grad forward,
    "backward" the backward of out.sum() (its forward unprofiled). Returns (kernels per step,
    {kernel name: per step}) for the names whose count changes with the length."""
    from collections import Counter

    import torch

    param = next(module.parameters())

    def kernels(length):
        x = torch.randn(length, batch, module.input_size, device=param.device, dtype=param.dtype,
                        requires_grad=direction == "backward")
        out = module(x)[0] if direction == "backward" else None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            if out is None:
                with torch.no_grad():
                    module(x)
            else:
                out.sum().backward()
            torch.cuda.synchronize()
        return Counter(e.name for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)

    short, long = kernels(steps[0]), kernels(steps[1])
    span = steps[1] - steps[0]
    names = {n: (long[n] - short[n]) / span for n in long | short if long[n] != short[n]}
    return (sum(long.values()) - sum(short.values())) / span, names


def _time_us(fn, repeats: int, no_grad: bool) -> float:
    import statistics

    import torch

    times = []
    for i in range(repeats + 3):  # 3 warm-up runs
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.set_grad_enabled(not no_grad):
            start.record()
            fn()
            end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="time on a GPU (CUDA events)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.dtypes.split(","), args.repeats)
    else:
        sys.stdout.write(render_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
