"""The batch-1 forward against torch.nn.LSTM in several separate processes, and the spread.

    python benchmarks/batch1_spread.py                 # 5 processes, T=100 B=1 I=H=256, forward
    python benchmarks/batch1_spread.py --processes 3 --size 20,1,64,64

Each process is a fresh `benchmarks/bench.py --sizes SIZE --modes fwd --candidates nn,fused` run,
so each one measures its own CPU GEMM choice (csrc/gemm.cpp) from scratch: the spread over
processes shows whether one disturbed measurement can decide a process's speed (issue 25). Per
variant: each process's ratio (ours / nn.LSTM's, the median of same-round ratios), their min,
median and max, and the recurrent GEMM path each process chose. Writes spread.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_process(args, index: int) -> dict:
    out = os.path.join(args.out, f"process{index}")
    command = [sys.executable, os.path.join(HERE, "bench.py"), "--sizes", args.size,
               "--headline", args.size, "--modes", "fwd", "--candidates", "nn,fused",
               "--variants", args.variants, "--cell-sizes", "", "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--out", out]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "bench.json")) as f:
        return json.load(f)


def summarize(runs: list[dict]) -> dict:
    """variant -> {ratios: [per process], min, median, max, paths: [per process]}."""
    table = {}
    for run in runs:
        B, H = run["meta"]["sizes"][0][1], run["meta"]["sizes"][0][3]
        paths = sorted({c["path"] for c in run["meta"]["gemm_choices"]
                        if c["repeated"] and c["rows"] == B and c["k"] == H})
        for r in run["results"]:
            if r["kind"] == "fused" and r["status"] == "ok":
                entry = table.setdefault(r["variant"], {"ratios": [], "paths": []})
                entry["ratios"].append(r["ratio_vs_nn"])
                entry["paths"].append("/".join(paths))
    for entry in table.values():
        ratios = entry["ratios"]
        entry.update(min=min(ratios), median=statistics.median(ratios), max=max(ratios))
    return table


def format_spread(table: dict, processes: int, size: str) -> str:
    lines = [(f"batch-1 forward vs nn.LSTM in {processes} separate processes (T,B,I,H = {size}; "
             "ratio = ours / torch's, < 1 faster)"),
             f"{'variant':<18} {'min':>5} {'median':>6} {'max':>5}  per process (recurrent GEMM)"]
    for variant, e in table.items():
        each = ", ".join(f"{r:.2f} ({p})" for r, p in zip(e["ratios"], e["paths"]))
        lines.append(f"{variant:<18} {e['min']:>5.2f} {e['median']:>6.2f} {e['max']:>5.2f}  {each}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--size", default="100,1,256,256", help="T,B,I,H (default 100,1,256,256)")
    p.add_argument("--variants", default="vanilla,diagonal,coupled")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per process")
    p.add_argument("--out", default=os.path.join("results", "batch1-spread"))
    args = p.parse_args(argv)
    if args.processes < 1:
        p.error("--processes must be at least 1")
    os.makedirs(args.out, exist_ok=True)
    runs = [run_process(args, k) for k in range(args.processes)]
    table = summarize(runs)
    text = format_spread(table, args.processes, args.size)
    print(text)
    result = {"size": args.size, "processes": args.processes, "threads": args.threads,
              "cpu": runs[0]["meta"]["cpu"], "variants": table, "text": text}
    with open(os.path.join(args.out, "spread.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
