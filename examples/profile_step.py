"""Profile a training step and an inference step with torch.profiler: which lstm_fused ops run,
and where the time goes.

Run it:  python examples/profile_step.py [--trace trace.json]

Every op shows as its own range (`lstm_fused::layer_forward`, `lstm_fused::layer_backward`, the
fused kernel as `lstm_fused::pointwise_forward`, ...), on the CPU as on CUDA (where NVTX ranges of
the same names show in Nsight Systems). Open the trace in chrome://tracing or Perfetto.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import lstm_fused


def main(argv=None) -> set[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", help="write a chrome trace to this file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    lstm = lstm_fused.PeepholeLSTM(32, 64, num_layers=2).to(device)
    cell = lstm_fused.LSTMCell(32, 64).to(device)
    x = torch.randn(50, 16, 32, device=device)
    lstm(x)[0].sum().backward()  # warm-up: the first call measures the CPU GEMM paths

    with profile(activities=activities) as prof:
        out, _ = lstm(x)  # training step: forward and backward
        out.sum().backward()
        with torch.inference_mode():  # the latency path: one op per cell step
            h = c = torch.zeros(16, 64, device=device)
            for t in range(x.shape[0]):
                h, c = cell(x[t], (h, c))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace}")
    names = {e.key for e in prof.key_averages() if e.key.startswith("lstm_fused::")}
    print("lstm_fused ops seen:", ", ".join(sorted(names)))
    return names


if __name__ == "__main__":
    main()
