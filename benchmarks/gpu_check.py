"""First contact with a GPU: one command that proves the CUDA path and measures it, in under 8 min.

    make gpu-check OUT=dir                        # = python3 benchmarks/gpu_check.py --out dir

With the machine's own python3 and torch (no virtual environment, no downloads), on a host with a
CUDA GPU it:

  0. builds the extension for the visible GPUs' architecture only (MAX_JOBS=16, object files under
     a temporary folder, the library in place);
  1. runs the CUDA suite, `pytest tests -m cuda` (parallel with pytest-xdist where installed),
     JUnit XML into OUT/junit.xml;
  2. runs compute-sanitizer memcheck, racecheck and initcheck on a small forward+backward of every
     variant and the GRU, float32 and bfloat16, cell and layer, padded and packed (the GRUCell's
     no_grad step too) (--sanitizer-driver below),
     alongside counting the CUDA kernels per time step with the profiler against docs/gpu.md's
     cost model (benchmarks/gpu_step_cost.py; --launches below);
  3. runs the benchmark (benchmarks/bench.py --device cuda) against torch.nn.LSTM (cuDNN), and the
     fused GRU against torch.nn.GRU (cuDNN), at a few sizes, float32 and bfloat16, TF32 off on both
     sides, JSON into OUT/bench.json;
  4. writes OUT/summary.md: GPU, driver, torch, each step's result (first lines of each failure),
     kernels per step against the model (LSTM variants), time ratios against cuDNN.

Every step runs in its own process under a deadline (--budget seconds in all, 470 by default); a
failing or timed-out step does not stop the others, and summary.md is rewritten after each phase,
so a kit killed from outside still leaves what it learned. OUT holds at most 8 files (summary.md,
junit.xml, bench.json, build.log, pytest.log, sanitizer.log, bench.log, each log cut to its tail).

Without a GPU it builds nothing, writes "no GPU" and what it would have run into OUT/summary.md,
and exits 0. With a GPU it exits 0 when every step passed, 1 otherwise.

Its parts, also usable alone:
    python3 benchmarks/gpu_check.py --sanitizer-driver [--device cpu]   # the sanitized workload
    python3 benchmarks/gpu_check.py --launches FILE.json                # kernels per step, CUDA
    python3 benchmarks/gpu_check.py --bench ARGS...    # bench.py ARGS with TF32 off in cuDNN too
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

BUDGET_S = 470  # the whole kit: 8 minutes less a margin for the host's own start and transfers
BUILD_S = 240  # at most, of the budget; a 16-core host builds one architecture in about 2 min
BENCH_RESERVE_S = 130  # kept for the two benchmark runs after the correctness phase
MIN_CORRECTNESS_S = 60  # the build stops early enough to leave the tests this much
MIN_BENCH_S = 15  # a benchmark run left less than this is not started (import and warm-up alone)
BENCH_SIZES = "100,64,512,512;100,1,256,256;50,256,1024,1024"  # T,B,I,H: docs/gpu.md's, latency, big
BENCH_DTYPES = ("float32", "bfloat16")
BENCH_CANDIDATES = "nn,fused,gru"  # bench.py's: nn.LSTM, the fused variants, nn.GRU + fused GRU
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck")
SANITIZER_ERROR_EXIT = 7  # compute-sanitizer's exit code when it found errors (--error-exitcode)
LOG_TAIL_LINES = 400  # per log copied into OUT


# --- what the machine is ---------------------------------------------------------------------


def _run_text(cmd: list[str], timeout: float = 30) -> str | None:
    """stdout of cmd, or None if it is missing or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH or in a toolkit folder (compute-sanitizer lives in its own subfolder)."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    for home in filter(None, homes):
        for path in (Path(home) / "bin" / name, Path(home) / name / name):
            if path.exists():
                return str(path)
    return None


def describe_machine() -> dict:
    """Python, torch (or why it does not import), the GPUs torch sees, the driver, nvcc and
    compute-sanitizer; `gpus` is empty where there is no usable GPU."""
    info = {"python": f"{platform.python_version()} ({sys.executable})", "gpus": [],
            "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means: no torch here
        info["torch"] = f"not importable: {type(exc).__name__}: {exc}".splitlines()[0]
    else:
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                     "memory_mib": p.total_memory // 2**20,
                                     "multiprocessors": p.multi_processor_count})
    smi = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = smi.splitlines()[0] if smi else None
    nvcc = find_tool("nvcc")
    version = _run_text([nvcc, "--version"]) if nvcc else None
    info["nvcc"] = next((ln for ln in (version or "").splitlines() if "release" in ln), None)
    info["compute_sanitizer"] = find_tool("compute-sanitizer")
    info["commit"] = _run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return info


def build_arch_list(gpus: list[dict]) -> str:
    """TORCH_CUDA_ARCH_LIST for the visible GPUs only, e.g. "9.0" (fastest build)."""
    return ";".join(sorted({g["capability"] for g in gpus}, key=lambda a: tuple(map(int, a.split(".")))))


# --- steps: processes under a deadline -------------------------------------------------------


@dataclass
class Step:
    """One command of the kit, its log and its outcome."""

    name: str
    cmd: list[str]
    log: Path
    env: dict = field(default_factory=dict)
    status: str = "pending"  # passed | failed (exit N) | timed out after S s | not run: why
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)  # first lines of what failed
    proc: subprocess.Popen | None = None
    started: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def command_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = " ".join(shlex.quote(c if c != sys.executable else "python3") for c in self.cmd)
        return f"{env} {cmd}".strip().replace(str(ROOT) + "/", "")

    def start(self) -> bool:
        """Start the process (in its own session, so a timeout kills its children too); False
        if it cannot start (e.g. the tool is not installed), with the reason as its status."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            try:
                self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             env={**os.environ, **self.env})
            except OSError as exc:
                self.status = f"failed to start: {exc}"
                return False
        return True

    def finish(self, deadline: float) -> bool:
        """True once the process has ended (killed, with its children, at the deadline)."""
        if self.proc.poll() is None and time.monotonic() < deadline:
            return False
        if self.proc.poll() is None:
            _kill_group(self.proc)
            self.status = f"timed out after {time.monotonic() - self.started:.0f} s"
        else:
            code = self.proc.returncode
            self.status = "passed" if code == 0 else f"failed (exit {code})"
        self.seconds = time.monotonic() - self.started
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_parallel(steps: list[Step], deadline: float) -> None:
    """Start every step, wait until all ended or the deadline passed (then kill the rest)."""
    pending = [step for step in steps if step.start()]
    while pending:
        pending = [s for s in pending if not s.finish(deadline)]
        if pending:
            time.sleep(0.5)


def skip(steps: list[Step], why: str) -> None:
    for step in steps:
        step.status = f"not run: {why}"


# --- reading what the steps left ---------------------------------------------------------------


def tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def build_errors(log: Path, limit: int = 12) -> list[str]:
    """The compiler's error lines (or the log's last lines if it printed none)."""
    lines = tail(log, 5000)
    errors = [ln.strip() for ln in lines if re.search(r"\berror\b|Error:|FAILED:", ln)]
    return (errors or [ln.strip() for ln in lines[-limit:]])[:limit]


def junit_results(path: Path, limit: int = 15) -> tuple[dict, list[str]]:
    """Counts (tests, failures, errors, skipped) and 'nodeid: first line of the message' for each
    failed or erroring test case, from pytest's JUnit XML."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts, failed
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for outcome in ("failure", "error"):
            node = case.find(outcome)
            if node is None:
                continue
            message = (node.get("message") or node.text or "").strip().splitlines()
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failed.append(f"{name} ({outcome}): {message[0][:200] if message else ''}")
    return counts, failed[:limit] + ([f"... and {len(failed) - limit} more"]
                                     if len(failed) > limit else [])


_SANITIZER_SUMMARY = re.compile(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:error|hazard)")
_SANITIZER_REPORT = re.compile(r"^=+ +(Invalid|Uninitialized|Race|Error|Program hit|Malloc|"
                               r"Warning|Leaked|Barrier|Misaligned|Out-of-range)")
_SANITIZER_AT = re.compile(r"^=+ +at (?:0x[0-9a-f]+ in )?(.+?)(?:\+0x[0-9a-f]+)?$")


def sanitizer_findings(log: Path, limit: int = 6) -> tuple[int | None, list[str]]:
    """(errors reported by compute-sanitizer, or None if it printed no summary; the first
    distinct reports as 'what, at where')."""
    lines = tail(log, 200000)
    errors = None
    for line in lines:
        if m := _SANITIZER_SUMMARY.search(line):
            errors = (errors or 0) + int(m.group(1))
    reports, seen = [], set()
    for i, line in enumerate(lines):
        if not _SANITIZER_REPORT.match(line):
            continue
        what = re.sub(r"^=+ +", "", line).strip()
        where = next((m.group(1) for ln in lines[i + 1:i + 4] if (m := _SANITIZER_AT.match(ln))), "")
        report = f"{what}, at {where}" if where else what
        if report not in seen:
            seen.add(report)
            reports.append(report[:240])
    return errors, reports[:limit]


def step_details(step: Step, out: Path) -> None:
    """Fill step.details (the first lines of what failed) from its log or report."""
    if step.name == "build":
        step.details = [] if step.passed else build_errors(step.log)
    elif step.name == "pytest -m cuda":
        counts, failed = junit_results(out / "junit.xml")
        step.details = [(f"{counts['tests']} tests: {counts['failures']} failed, "
                         f"{counts['errors']} errors, {counts['skipped']} skipped"), *failed]
        if not step.passed and not failed:
            step.details += tail(step.log, 12)
    elif step.name.startswith("compute-sanitizer"):
        errors, reports = sanitizer_findings(step.log)
        head = ("no ERROR SUMMARY printed (the tool did not finish)" if errors is None
                else f"{errors} error(s) reported")
        step.details = [head] + reports
        if not step.passed and not reports:
            step.details += tail(step.log, 8)
    elif not step.passed:
        step.details = tail(step.log, 12)


# --- the summary ---------------------------------------------------------------------------------


def _machine_table(info: dict) -> list[str]:
    gpus = info["gpus"]
    gpu = (", ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_mib']} MiB, "
                     f"{g['multiprocessors']} SMs)" for g in gpus) if gpus else "none visible")
    torch_line = info["torch"]
    if info.get("torch_cuda") is not None or info.get("cudnn") is not None:
        torch_line += f" (CUDA {info.get('torch_cuda')}, cuDNN {info.get('cudnn')})"
    rows = [("GPU", gpu), ("driver", info.get("driver") or "unknown (no nvidia-smi)"),
            ("torch", torch_line), ("python", info["python"]),
            ("nvcc", info.get("nvcc") or "not found"),
            ("compute-sanitizer", info.get("compute_sanitizer") or "not found"),
            ("host", f"{info['host']}, {info['cpus']} CPUs"),
            ("commit", info.get("commit") or "unknown")]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def launches_table(launches: list[dict]) -> list[str]:
    """Kernels per time step measured against the cost model's launches (docs/gpu.md)."""
    if not launches:
        return []
    lines = ["## Kernels per time step vs docs/gpu.md's cost model", "",
             ("Measured with torch.profiler (kernels at T=30 minus T=10, over 20 steps) at the "
              "model's B=64, I=H=512; the model counts GEMMs as one kernel each (cuBLAS may split "
              "one in two)."), "",
             "| variant | dtype | direction | model | measured | kernels per step |",
             "|---|---|---|---:|---:|---|"]
    for r in launches:
        kernels = "; ".join(f"{n:g}x {k}" for k, n in r["kernels"].items())
        lines.append(f"| {r['variant']} | {r['dtype']} | {r['direction']} | {r['model']} | "
                     f"{r['measured']:g} | {kernels[:300]} |")
    return lines + [""]


def ratio_tables(bench: dict) -> list[str]:
    """Per dtype: nn.LSTM's time and the fused variants' time ratios (ours / cuDNN's)."""
    lines = []
    for dtype, result in bench.items():
        rows = result.get("results", []) if isinstance(result, dict) else []
        fused = [r for r in rows if r.get("kind") == "fused"]
        names = list(dict.fromkeys(r["variant"] for r in fused))
        if not names:
            continue
        if not lines:
            lines += ["## Time vs torch.nn.LSTM (cuDNN)", "",
                      ("Median over rounds of (our time / nn.LSTM's time in the same round): "
                       "below 1 is faster. TF32 off for both (IEEE float32 GEMMs on each side)."),
                      ""]
        lines += [f"**{dtype}**", "",
                  "| T, B, I, H | mode | nn.LSTM ms | nn.LSTM µs/step | " + " | ".join(names) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(names)]
        points = list(dict.fromkeys((r["T"], r["B"], r["I"], r["H"], r["mode"]) for r in rows))
        for T, B, I, H, mode in points:
            at = [r for r in rows if (r["T"], r["B"], r["I"], r["H"], r["mode"]) == (T, B, I, H, mode)]
            base = next((r for r in at if r.get("kind") == "nn" and r.get("status") == "ok"), None)
            base_ms = f"{base['median_ms']:.3f}" if base else "-"
            per_step = f"{base['median_ms'] * 1e3 / T:.1f}" if base else "-"
            cells = []
            for name in names:
                r = next((x for x in at if x.get("kind") == "fused" and x["variant"] == name), None)
                ok = r is not None and r.get("status") == "ok" and r.get("ratio_vs_nn") is not None
                cells.append(f"{r['ratio_vs_nn']:.2f}" if ok else "-")
            lines.append(f"| {T}, {B}, {I}, {H} | {mode} | {base_ms} | {per_step} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return lines + gru_ratio_tables(bench)


def gru_ratio_tables(bench: dict) -> list[str]:
    """Per dtype: nn.GRU's time and the fused GRU's time ratio (ours / cuDNN's nn.GRU), from
    bench.py's rows of kind "nn-gru" (the baseline) and "gru"."""
    lines = []
    for dtype, result in bench.items():
        rows = result.get("results", []) if isinstance(result, dict) else []
        if not any(r.get("kind") == "gru" for r in rows):
            continue
        if not lines:
            lines += ["## Time vs torch.nn.GRU (cuDNN)", "",
                      ("Median over rounds of (lstm_fused.GRU's time / nn.GRU's time in the same "
                       "round): below 1 is faster. TF32 off for both."), ""]
        lines += [f"**{dtype}**", "",
                  "| T, B, I, H | mode | nn.GRU ms | nn.GRU µs/step | lstm_fused.GRU |",
                  "|---|---|---:|---:|---:|"]
        points = list(dict.fromkeys((r["T"], r["B"], r["I"], r["H"], r["mode"]) for r in rows
                                    if r.get("kind") in ("gru", "nn-gru")))
        for T, B, I, H, mode in points:
            at = [r for r in rows if (r["T"], r["B"], r["I"], r["H"], r["mode"]) == (T, B, I, H, mode)]
            base = next((r for r in at if r.get("kind") == "nn-gru" and r.get("status") == "ok"),
                        None)
            ours = next((r for r in at if r.get("kind") == "gru"), None)
            ok = (ours is not None and ours.get("status") == "ok"
                  and ours.get("ratio_vs_nn") is not None)
            lines.append(f"| {T}, {B}, {I}, {H} | {mode} | "
                         f"{base['median_ms']:.3f} | {base['median_ms'] * 1e3 / T:.1f} | "
                         if base else f"| {T}, {B}, {I}, {H} | {mode} | - | - | ")
            lines[-1] += (f"{ours['ratio_vs_nn']:.2f} |" if ok else "- |")
        lines.append("")
    return lines


def render_summary(info: dict, steps: list[Step], launches: list[dict], bench: dict,
                   elapsed: float, finished: bool) -> str:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# lstm_fused GPU check, {date}", ""]
    if not info["gpus"]:
        why = ("torch sees no CUDA device" if not info["torch"].startswith("not importable")
               else f"torch is {info['torch']}")
        lines += [(f"**no GPU**: {why} with {info['python']}, so nothing was built or run; the "
                   "steps below are what a GPU host runs."), ""]
    else:
        passed = sum(s.passed for s in steps)
        state = "" if finished else " (still running when this was written)"
        lines += [f"**{passed} of {len(steps)} steps passed** in {elapsed:.0f} s{state}.", ""]
    lines += _machine_table(info) + ["", "## Steps", "", "| step | result | s | command |",
                                     "|---|---|---:|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | `{s.command_line()}` |")
    lines.append("")
    detailed = [s for s in steps if s.details]
    if detailed:
        lines += ["## What each step reported (first lines of each failure)", ""]
        for s in detailed:
            lines += [f"**{s.name}** ({s.status})", "", "```", *s.details, "```", ""]
    lines += launches_table(launches) + ratio_tables(bench)
    return "\n".join(lines) + "\n"


# --- the kit -----------------------------------------------------------------------------------


def plan(out: Path, work: Path, info: dict) -> dict[str, list[Step]]:
    """The kit's steps by phase (commands only; nothing runs here)."""
    py = sys.executable
    build = Step("build", [py, "setup.py", "build_ext", "--inplace", "--build-temp",
                           str(work / "build")], work / "build.log",
                 env={"TORCH_CUDA_ARCH_LIST": build_arch_list(info["gpus"]) or "(visible GPU)",
                      "MAX_JOBS": "16", "LSTM_FUSED_BUILD": "cuda"})
    pytest = [py, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rfEs", "--durations=15",
              "-p", "no:cacheprovider", f"--junitxml={out / 'junit.xml'}"]
    if importlib.util.find_spec("xdist"):
        pytest += ["-n", "8"]
    if importlib.util.find_spec("pytest_timeout"):
        pytest += ["--timeout", "180"]
    correctness = [Step("pytest -m cuda", pytest, work / "pytest.log")]
    sanitizer = info.get("compute_sanitizer") or "compute-sanitizer"
    for tool in SANITIZER_TOOLS:
        # Without PyTorch's caching allocator every tensor is its own cudaMalloc, so an access
        # past a tensor's end is outside any allocation and memcheck sees it.
        correctness.append(Step(
            f"compute-sanitizer {tool}",
            [sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT),
             "--print-limit", "20", py, str(THIS), "--sanitizer-driver"],
            work / f"sanitizer_{tool}.log", env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    correctness.append(Step("kernels per step", [py, str(THIS), "--launches",
                                                 str(work / "launches.json")],
                            work / "launches.log"))
    bench = [Step(f"benchmark {dtype}",
                  [py, str(THIS), "--bench", "--device", "cuda", "--dtype", dtype,
                   "--sizes", BENCH_SIZES, "--candidates", BENCH_CANDIDATES, "--warmup", "2",
                   "--repeats", "10", "--point-budget", "4", "--out", str(work / f"bench_{dtype}")],
                  work / f"bench_{dtype}.log") for dtype in BENCH_DTYPES]
    return {"build": [build], "correctness": correctness, "bench": bench}


def collect(out: Path, work: Path, steps: list[Step]) -> tuple[list[dict], dict]:
    """Copy the logs' tails into OUT (one file per kind) and read the launch counts and the
    benchmark JSON."""
    kinds = {"build.log": ["build"], "pytest.log": ["pytest -m cuda", "kernels per step"],
             "sanitizer.log": [s.name for s in steps if s.name.startswith("compute-sanitizer")],
             "bench.log": [s.name for s in steps if s.name.startswith("benchmark")]}
    for filename, names in kinds.items():
        parts = []
        for s in steps:
            if s.name in names and s.log.exists():
                parts += [f"===== {s.name}: {s.status} =====", *tail(s.log, LOG_TAIL_LINES), ""]
        if parts:
            (out / filename).write_text("\n".join(parts) + "\n")
    launches = []
    if (work / "launches.json").exists():
        launches = json.loads((work / "launches.json").read_text())
    bench = {}
    for dtype in BENCH_DTYPES:
        path = work / f"bench_{dtype}" / "bench.json"
        if path.exists():
            bench[dtype] = json.loads(path.read_text())
    if bench or launches:
        (out / "bench.json").write_text(json.dumps({"launches": launches, **bench}, indent=1))
    return launches, bench


def run_kit(out: Path, budget: float) -> int:
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    info = describe_machine()
    work = Path(tempfile.mkdtemp(prefix="lstm_fused_gpu_check_"))
    phases = plan(out, work, info)
    steps = [s for phase in phases.values() for s in phase]

    def write(finished: bool) -> None:
        for s in steps:
            if s.proc is not None and s.seconds:
                step_details(s, out)
        launches, bench = collect(out, work, steps)
        (out / "summary.md").write_text(render_summary(info, steps, launches, bench,
                                                       time.monotonic() - t0, finished))

    if not info["gpus"]:
        skip(steps, "no GPU")
        write(finished=True)
        shutil.rmtree(work, ignore_errors=True)
        print(f"gpu_check: no GPU; wrote {out / 'summary.md'}")
        return 0

    def stop(signum, frame):  # killed from outside: end the steps' process groups too
        for s in steps:
            if s.proc is not None and s.proc.poll() is None:
                _kill_group(s.proc)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    end = t0 + budget
    try:
        run_parallel(phases["build"], min(time.monotonic() + BUILD_S,
                                          end - BENCH_RESERVE_S - MIN_CORRECTNESS_S))
        write(finished=False)
        if phases["build"][0].passed:
            run_parallel(phases["correctness"], end - BENCH_RESERVE_S)
            write(finished=False)
            for step in phases["bench"]:  # one at a time: timings need the GPU alone
                remaining = end - time.monotonic()
                if remaining < MIN_BENCH_S:
                    skip([step], "out of time")
                    continue
                last = step is phases["bench"][-1]
                run_parallel([step], end if last else time.monotonic() + remaining / 2)
        else:
            skip(phases["correctness"] + phases["bench"], "the build failed")
    finally:
        write(finished=True)
        shutil.rmtree(work, ignore_errors=True)
    failed = [s.name for s in steps if not s.passed]
    print(f"gpu_check: {len(steps) - len(failed)} of {len(steps)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; wrote {out / 'summary.md'}")
    return 1 if failed else 0


# --- the parts run in their own processes ------------------------------------------------------


def sanitizer_driver(device: str) -> int:
    """A small forward+backward of every variant in float32 and bfloat16: a cell, a padded
    bidirectional layer and a packed bidirectional layer with projection (T=5, B=3, I=4, H=8);
    then the GRU likewise (GRUCell, its no_grad one-op step, padded and packed bidirectional
    GRU). Prints one line per case; the sanitizer checks every kernel these launch."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    sys.path.insert(0, str(ROOT))
    import lstm_fused

    variants = [(p, c) for c in (False, True) for p in (None, "diagonal", "full")]
    cases = 0
    for peephole, coupled in variants:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            kw = {"peephole": peephole, "coupled": coupled, "device": device, "dtype": dtype}
            x = torch.randn(5, 3, 4, device=device, dtype=dtype, requires_grad=True)
            cell = lstm_fused.LSTMCell(4, 8, **kw)
            h, c = cell(x[0])
            (h.float().sum() + c.float().sum()).backward()
            ran = ["cell"]
            layers = {"padded": (lstm_fused.LSTM(4, 8, bidirectional=True, **kw), x),
                      "packed": (lstm_fused.LSTM(4, 8, bidirectional=True, proj_size=3, **kw),
                                 pack_padded_sequence(x, torch.tensor([5, 3, 2])))}
            for form, (layer, inp) in layers.items():
                out, (h_n, c_n) = layer(inp)
                data = out.data if form == "packed" else out
                (data.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
                ran.append(f"{form} layer")
            if device != "cpu":
                torch.cuda.synchronize()
            name = f"{peephole or 'none'}{'+coupled' if coupled else ''}"
            print(f"case {name} {str(dtype).replace('torch.', '')}: {', '.join(ran)}", flush=True)
            cases += len(ran)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        kw = {"device": device, "dtype": dtype}
        x = torch.randn(5, 3, 4, device=device, dtype=dtype, requires_grad=True)
        cell = lstm_fused.GRUCell(4, 8, **kw)
        cell(x[0]).float().sum().backward()
        ran = ["cell"]
        with torch.no_grad():  # GRUCell's latency path: one gru_cell_step op
            cell(x[0], torch.randn(3, 8, **kw))
        ran.append("no_grad cell step")
        gru = lstm_fused.GRU(4, 8, bidirectional=True, **kw)
        for form, inp in (("padded", x), ("packed", pack_padded_sequence(x, torch.tensor([5, 3, 2])))):
            out, h_n = gru(inp)
            data = out.data if form == "packed" else out
            (data.float().sum() + h_n.float().sum()).backward()
            ran.append(f"{form} layer")
        if device != "cpu":
            torch.cuda.synchronize()
        print(f"case gru {str(dtype).replace('torch.', '')}: {', '.join(ran)}", flush=True)
        cases += len(ran)
    print(f"sanitizer driver: {cases} forward+backward cases on {device}")
    return 0


def count_launches(path: str) -> int:
    """Kernels per time step of every variant, float32 and bfloat16, at the cost model's size,
    against gpu_step_cost.launches_per_step; JSON list into `path`."""
    import torch

    sys.path.insert(0, str(ROOT))
    import lstm_fused

    import gpu_step_cost as model

    if not torch.cuda.is_available():
        raise SystemExit("--launches needs a CUDA GPU")
    rows = []
    for dtype in ("float32", "bfloat16"):
        for v in model.VARIANTS:
            module = lstm_fused.LSTM(model.I, model.H, peephole=v.peephole, coupled=v.coupled,
                                     device="cuda", dtype=getattr(torch, dtype))
            for direction in ("forward", "backward"):
                total, kernels = model.kernels_per_step(module, model.B, direction)
                rows.append({"variant": v.name, "dtype": dtype, "direction": direction,
                             "model": model.launches_per_step(v, direction), "measured": total,
                             "kernels": kernels})
                print(rows[-1], flush=True)
    Path(path).write_text(json.dumps(rows, indent=1))
    return 0


def bench_without_tf32(argv: list[str]) -> int:
    """benchmarks/bench.py with cuDNN's TF32 off too, so float32 is IEEE float32 on both sides
    (PyTorch's defaults allow TF32 in cuDNN but not in cuBLAS matmuls)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    sys.path.insert(0, str(ROOT))
    import bench

    bench.main(argv)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for summary.md and the results")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for the whole kit (default {BUDGET_S})")
    parser.add_argument("--sanitizer-driver", action="store_true",
                        help="run the small workload compute-sanitizer checks")
    parser.add_argument("--device", default="cuda", help="device of --sanitizer-driver")
    parser.add_argument("--launches", metavar="JSON", help="count kernels per step into JSON")
    parser.add_argument("--bench", nargs=argparse.REMAINDER,
                        help="run benchmarks/bench.py with these arguments, TF32 off")
    args = parser.parse_args(argv)
    if args.sanitizer_driver:
        return sanitizer_driver(args.device)
    if args.launches:
        return count_launches(args.launches)
    if args.bench is not None:
        return bench_without_tf32(args.bench)
    if args.out is None:
        parser.error("--out DIR is required (make gpu-check OUT=DIR)")
    return run_kit(args.out, args.budget)


if __name__ == "__main__":
    sys.exit(main())
