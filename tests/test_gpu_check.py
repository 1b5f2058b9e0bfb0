"""The GPU kit (benchmarks/gpu_check.py, `make gpu-check`) checked without a GPU: its no-GPU run,
the workload it gives compute-sanitizer (on the CPU here), its step deadlines, how it reads
pytest's, compute-sanitizer's and the benchmark's output into summary.md, and setup.py's default
CUDA architecture list."""

import os
import subprocess
import sys
import time
from pathlib import Path

import gpu_check  # benchmarks/, on sys.path (conftest.py)
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the kit would run")
def test_make_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "kit"
    start = time.monotonic()
    done = subprocess.run(["make", "-s", "gpu-check", f"OUT={out}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - start < 120
    summary = (out / "summary.md").read_text()
    assert "**no GPU**" in summary
    assert torch.__version__ in summary
    # It lists what a GPU host runs, and ran none of it (no build folder, no results).
    for step in ("build", "pytest -m cuda", "compute-sanitizer memcheck",
                 "compute-sanitizer racecheck", "compute-sanitizer initcheck",
                 "kernels per step", "benchmark float32", "benchmark bfloat16"):
        assert f"| {step} | not run: no GPU |" in summary, step
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]


def test_sanitizer_driver_covers_every_variant_dtype_and_form(capsys):
    """The workload compute-sanitizer checks, run on the CPU: 6 variants x float32/bfloat16 x
    (cell, padded layer, packed layer), each forward and backward; and the GRU x float32/bfloat16
    x (GRUCell, its no_grad step, padded GRU, packed GRU)."""
    assert gpu_check.main(["--sanitizer-driver", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cases = {line for line in lines if line.startswith("case ")}
    expected = {f"case {p}{c} {d}: cell, padded layer, packed layer"
                for p in ("none", "diagonal", "full") for c in ("", "+coupled")
                for d in ("float32", "bfloat16")}
    expected |= {f"case gru {d}: cell, no_grad cell step, padded layer, packed layer"
                 for d in ("float32", "bfloat16")}
    assert cases == expected
    assert lines[-1] == "sanitizer driver: 44 forward+backward cases on cpu"


def test_kit_benchmarks_the_gru_against_nn_gru():
    """The benchmark steps ask bench.py for the GRU rows (nn.GRU and lstm_fused.GRU) beside the
    LSTMs', with a candidate name bench.py accepts."""
    import bench  # benchmarks/, on sys.path (conftest.py)

    info = {"gpus": [{"capability": "9.0"}], "compute_sanitizer": None}
    steps = gpu_check.plan(Path("out"), Path("work"), info)["bench"]
    assert [s.name for s in steps] == ["benchmark float32", "benchmark bfloat16"]
    for step in steps:
        candidates = step.cmd[step.cmd.index("--candidates") + 1].split(",")
        assert "gru" in candidates and {"nn", "fused"} <= set(candidates)
        assert set(candidates) <= set(bench.CANDIDATE_KINDS)


def test_a_failing_or_hanging_step_does_not_stop_the_others(tmp_path):
    """Steps run side by side under one deadline: the slow one is killed with its children, the
    failing one reports its exit code, a missing tool is reported, the good one passes."""
    child_pid = tmp_path / "child.pid"
    hang = gpu_check.Step("hang", ["bash", "-c", f"sleep 60 & echo $! > {child_pid}; wait"],
                          tmp_path / "hang.log")
    fail = gpu_check.Step("fail", ["bash", "-c", "echo broken; exit 3"], tmp_path / "fail.log")
    good = gpu_check.Step("good", ["true"], tmp_path / "good.log")
    missing = gpu_check.Step("missing", [str(tmp_path / "compute-sanitizer")], tmp_path / "m.log")
    start = time.monotonic()
    gpu_check.run_parallel([hang, fail, missing, good], time.monotonic() + 2)
    assert time.monotonic() - start < 15
    assert hang.status.startswith("timed out after")
    assert fail.status == "failed (exit 3)" and good.status == "passed"
    assert missing.status.startswith("failed to start: [Errno 2]") and not missing.passed
    assert not _alive(int(child_pid.read_text()))  # the sleep the hung step started is gone too


def _alive(pid, wait=5.0):
    """Whether process `pid` still runs after up to `wait` s (a zombie left for its new parent
    to reap counts as ended)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return False
        if state == "Z":
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1"
failures="1" skipped="1" tests="4"><testcase classname="tests.test_cuda" name="test_ok"/>
<testcase classname="tests.test_cuda" name="test_peak[vanilla]"><failure message="AssertionError: \
peak 9.1 MiB &gt; bound 8.0 MiB&#10;assert 9540000 &lt;= 8388608">long traceback</failure></testcase>
<testcase classname="tests.test_cuda" name="test_graph"><error message="RuntimeError: CUDA error: \
an illegal memory access was encountered">trace</error></testcase>
<testcase classname="tests.test_cuda" name="test_skip"><skipped message="no"/></testcase>
</testsuite></testsuites>"""

MEMCHECK_LOG = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at void lstm_fused::cuda::lstm_fused_pointwise_backward<float, coupled>(Params)+0x1a0
=========     by thread (3,0,0) in block (0,0,0)
=========     Address 0x7f00 is out of bounds
========= Invalid __global__ read of size 4 bytes
=========     at void lstm_fused::cuda::lstm_fused_pointwise_backward<float, coupled>(Params)+0x1a0
=========     by thread (4,0,0) in block (0,0,0)
========= ERROR SUMMARY: 2 errors
"""


def test_reads_the_failures_of_pytest_and_compute_sanitizer(tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    counts, failed = gpu_check.junit_results(tmp_path / "junit.xml")
    assert counts == {"tests": 4, "failures": 1, "errors": 1, "skipped": 1}
    assert failed == [
        "tests.test_cuda::test_peak[vanilla] (failure): AssertionError: peak 9.1 MiB > bound 8.0 MiB",
        ("tests.test_cuda::test_graph (error): RuntimeError: CUDA error: an illegal memory access "
         "was encountered")]
    (tmp_path / "memcheck.log").write_text(MEMCHECK_LOG)
    errors, reports = gpu_check.sanitizer_findings(tmp_path / "memcheck.log")
    assert errors == 2
    assert reports == [("Invalid __global__ read of size 4 bytes, at void lstm_fused::cuda::"
                        "lstm_fused_pointwise_backward<float, coupled>(Params)")]
    (tmp_path / "clean.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    assert gpu_check.sanitizer_findings(tmp_path / "clean.log") == (0, [])
    (tmp_path / "cut.log").write_text("========= COMPUTE-SANITIZER\nKilled\n")
    assert gpu_check.sanitizer_findings(tmp_path / "cut.log") == (None, [])


def _bench_row(mode, kind, variant, median_ms, ratio):
    return {"T": 100, "B": 64, "I": 512, "H": 512, "mode": mode, "kind": kind,
            "variant": variant, "status": "ok", "median_ms": median_ms, "ratio_vs_nn": ratio}


def test_summary_shows_failures_kernels_per_step_and_ratios_vs_cudnn(tmp_path):
    info = {"python": "3.12.3 (/usr/bin/python3)", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
            "cudnn": 91300, "driver": "580.159.04", "nvcc": "Build cuda_13.0", "host": "h",
            "cpus": 16, "compute_sanitizer": "/usr/local/cuda/bin/compute-sanitizer",
            "commit": "abc1234", "gpus": [{"name": "NVIDIA H200", "capability": "9.0",
                                           "memory_mib": 143771, "multiprocessors": 132}]}
    build = gpu_check.Step("build", ["python3", "setup.py"], tmp_path / "b.log", status="passed",
                           seconds=95)
    sanitizer = gpu_check.Step("compute-sanitizer memcheck", ["compute-sanitizer"],
                               tmp_path / "m.log", status="failed (exit 7)", seconds=40)
    (tmp_path / "m.log").write_text(MEMCHECK_LOG)
    gpu_check.step_details(sanitizer, tmp_path)
    launches = [{"variant": "vanilla", "dtype": "float32", "direction": "forward", "model": 2,
                 "measured": 3.0, "kernels": {"gemm_splitk": 2.0, "lstm_fused_pointwise": 1.0}}]
    bench = {"bfloat16": {"results": [
        _bench_row("fwd", "nn", "vanilla", 1.5, 1.0), _bench_row("fwd", "fused", "vanilla", 1.8, 1.2),
        _bench_row("fwd", "fused", "coupled", 1.2, 0.8), _bench_row("fwd", "nn-gru", "gru", 1.0, 1.0),
        _bench_row("fwd", "gru", "gru", 0.9, 0.9)]}}
    summary = gpu_check.render_summary(info, [build, sanitizer], launches, bench, 300.0, True)
    assert "**1 of 2 steps passed** in 300 s." in summary
    assert "NVIDIA H200 (sm_90, 143771 MiB, 132 SMs)" in summary and "580.159.04" in summary
    assert "| compute-sanitizer memcheck | failed (exit 7) | 40 |" in summary
    assert "2 error(s) reported\nInvalid __global__ read of size 4 bytes, at void" in summary
    assert "| vanilla | float32 | forward | 2 | 3 | 2x gemm_splitk; 1x lstm_fused_pointwise |" \
        in summary
    assert "| T, B, I, H | mode | nn.LSTM ms | nn.LSTM µs/step | vanilla | coupled |" in summary
    assert "| 100, 64, 512, 512 | fwd | 1.500 | 15.0 | 1.20 | 0.80 |" in summary
    # The GRU's own table, against nn.GRU; its rows are not columns of the LSTM table.
    assert "## Time vs torch.nn.GRU (cuDNN)" in summary
    assert "| T, B, I, H | mode | nn.GRU ms | nn.GRU µs/step | lstm_fused.GRU |" in summary
    assert "| 100, 64, 512, 512 | fwd | 1.000 | 10.0 | 0.90 |" in summary


def _setup_py_arch_section():
    """setup.py's delimited CUDA-architecture block, run alone (setup.py itself calls setup())."""
    text = (ROOT / "setup.py").read_text()
    begin = text.index("# --- CUDA architectures, headers and C++ standard")
    end = text.index("# --- end of the CUDA architectures")
    namespace = {"os": os}
    exec(compile(text[begin:end], "setup.py", "exec"), namespace)  # noqa: S102
    return namespace


NVCC_13_0_CODES = {"sm_75", "sm_80", "sm_86", "sm_87", "sm_88", "sm_89", "sm_90", "sm_100",
                   "sm_110", "sm_103", "sm_120", "sm_121"}
NVCC_12_0_CODES = {"sm_50", "sm_52", "sm_53", "sm_60", "sm_61", "sm_62", "sm_70", "sm_72",
                   "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90"}


def test_default_cuda_arch_list_is_turing_to_blackwell_that_nvcc_builds_plus_ptx():
    setup = _setup_py_arch_section()
    default = setup["default_cuda_arch_list"]
    assert default(NVCC_13_0_CODES) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert default(NVCC_12_0_CODES) == "7.5;8.0;8.6;9.0+PTX"  # no Blackwell before CUDA 12.8
    assert default(None) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    with pytest.raises(SystemExit, match="set TORCH_CUDA_ARCH_LIST"):
        default({"sm_50"})


def test_kit_on_a_gpu_host_runs_every_phase_and_reports(tmp_path, monkeypatch):
    """run_kit's GPU path with stand-in commands: the build passes, the correctness phase runs
    side by side (pytest's JUnit XML and a sanitizer error are read), the benchmarks run one after
    another and the last one is cut at the budget; summary.md says all of it, OUT stays small and
    the exit code is 1."""
    info = {"python": "3.12.3 (python3)", "torch": "2.11.0+cu130", "driver": "580", "nvcc": None,
            "host": "h", "cpus": 16, "compute_sanitizer": None, "commit": None,
            "gpus": [{"name": "NVIDIA H200", "capability": "9.0", "memory_mib": 143771,
                      "multiprocessors": 132}]}
    monkeypatch.setattr(gpu_check, "describe_machine", lambda: info)
    monkeypatch.setattr(gpu_check, "BENCH_RESERVE_S", 8)
    monkeypatch.setattr(gpu_check, "MIN_BENCH_S", 1)
    monkeypatch.setattr(gpu_check, "MIN_CORRECTNESS_S", 1)
    py = sys.executable
    bench_json = ('import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(); '
                  '(p / "bench.json").write_text(json.dumps({"results": [' + ", ".join(
                      f'{{"T": 100, "B": 64, "I": 512, "H": 512, "mode": "fwd", "kind": "{k}", '
                      f'"variant": "{v}", "status": "ok", "median_ms": {ms}, "ratio_vs_nn": {r}}}'
                      for k, v, ms, r in [("nn", "vanilla", 1.5, 1.0),
                                          ("fused", "vanilla", 1.8, 1.2)]) + ']}))')

    def plan(out, work, info):
        step = gpu_check.Step
        junit = f"cat > {out / 'junit.xml'} <<'X'\n{JUNIT}\nX\nexit 1"
        memcheck = f"cat <<'X'\n{MEMCHECK_LOG}X\nexit 7"
        launches = "import json, sys; open(sys.argv[1], 'w').write(json.dumps([]))"
        return {
            "build": [step("build", ["true"], work / "build.log")],
            "correctness": [
                step("pytest -m cuda", ["bash", "-c", junit], work / "pytest.log"),
                step("compute-sanitizer memcheck", ["bash", "-c", memcheck], work / "m.log"),
                step("kernels per step", [py, "-c", launches, str(work / "launches.json")],
                     work / "launches.log")],
            "bench": [step("benchmark float32", [py, "-c", bench_json, str(work / "bench_float32")],
                           work / "bench_float32.log"),
                      step("benchmark bfloat16", ["sleep", "60"], work / "bench_bfloat16.log")]}

    monkeypatch.setattr(gpu_check, "plan", plan)
    start = time.monotonic()
    assert gpu_check.run_kit(tmp_path / "out", budget=12) == 1
    assert time.monotonic() - start < 30
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "**3 of 6 steps passed** in 1" in summary
    assert "| build | passed |" in summary and "| kernels per step | passed |" in summary
    assert "| pytest -m cuda | failed (exit 1) |" in summary
    assert "4 tests: 1 failed, 1 errors, 1 skipped" in summary
    assert "| compute-sanitizer memcheck | failed (exit 7) |" in summary
    assert "2 error(s) reported" in summary
    assert "| benchmark float32 | passed |" in summary
    assert "| benchmark bfloat16 | timed out after" in summary
    assert "| 100, 64, 512, 512 | fwd | 1.500 | 15.0 | 1.20 |" in summary
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["bench.json", "bench.log", "build.log", "junit.xml", "pytest.log",
                     "sanitizer.log", "summary.md"]
