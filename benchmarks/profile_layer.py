"""Where a fused layer's time goes: torch.profiler's table of operators for a few calls of one
variant at one size, forward under no_grad or forward+backward (the profiles behind the README's
"CPU performance" notes).

    python benchmarks/profile_layer.py --variant diagonal --mode fwd        # T=100 B=64 I=H=256
    python benchmarks/profile_layer.py --variant full --mode fwdbwd --size 100,1,256,256

Self time of lstm_fused::layer_forward / layer_backward includes the GEMMs that do not go through
an ATen operator (MKL's packed GEMM, our simd kernels); lstm_fused::recurrent_step is the simd
path's fused step.
"""

from __future__ import annotations

import argparse

import torch

import lstm_fused

VARIANTS = {"vanilla": (None, False), "diagonal": ("diagonal", False),
            "coupled": (None, True), "full": ("full", False)}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="diagonal")
    parser.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwd",
                        help="fwd: forward under no_grad; fwdbwd: forward and backward")
    parser.add_argument("--size", default="100,64,256,256", help="T,B,I,H")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5, help="profiled calls (after 3 warm-up)")
    parser.add_argument("--rows", type=int, default=12, help="rows of the table")
    args = parser.parse_args(argv)
    try:
        T, B, I, H = (int(v) for v in args.size.split(","))
    except ValueError:
        parser.error(f"--size must be T,B,I,H (four integers), got {args.size!r}")
    torch.set_num_threads(args.threads)
    peephole, coupled = VARIANTS[args.variant]
    torch.manual_seed(0)
    module = lstm_fused.LSTM(I, H, peephole=peephole, coupled=coupled)
    x = torch.randn(T, B, I, requires_grad=args.mode == "fwdbwd")

    def call():
        if args.mode == "fwd":
            with torch.no_grad():
                module(x)
        else:
            module(x)[0].sum().backward()

    for _ in range(3):
        call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            call()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                      max_name_column_width=60)
    print(f"{args.variant}, {args.mode}, T={T} B={B} I={I} H={H}, {args.threads} threads, "
          f"{args.calls} calls, CPU kernels {torch.ops.lstm_fused.cpu_kernel_isa()}, "
          f"GEMM mode {lstm_fused.cpu_gemm.get_mode()}")
    print(table)
    return table


if __name__ == "__main__":
    main()
