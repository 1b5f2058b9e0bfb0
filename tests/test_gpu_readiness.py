"""What a GPU user relies on, checked without a GPU: autocast kernels and their behaviour (on the
CPU), profiler labels, kernel names and NVTX ranges in the binary, ptxas's register and spill
report, no host synchronisation in the CUDA-path sources, and the CUDA suite skipping visibly."""

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import variant_params

import lstm_fused
from lstm_fused import _C, ops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_step_cost
import ptxas_usage

needs_cuda_build = pytest.mark.skipif(not ops.BUILT_WITH_CUDA,
                                      reason="extension built without CUDA kernels")


# --- autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
def test_every_op_has_an_autocast_kernel(key):
    for name in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{name}", key), name


@variant_params
def test_cpu_autocast_runs_layers_in_bfloat16(variant):
    peephole, coupled = variant
    torch.manual_seed(0)
    module = lstm_fused.LSTM(6, 8, num_layers=2, peephole=peephole, coupled=coupled)
    x = torch.randn(7, 3, 6, requires_grad=True)
    expected = module(x)
    expected_grads = torch.autograd.grad(expected[0].sum(), [x, *module.parameters()])
    with torch.autocast("cpu"):  # bfloat16 is CPU autocast's default
        out, (h_n, c_n) = module(x)
    for got, want in zip((out, h_n, c_n), (expected[0], *expected[1])):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=4e-2, atol=4e-2)
    # Gradients flow back through autocast's casts to the float32 leaves, in float32.
    grads = torch.autograd.grad(out.float().sum(), [x, *module.parameters()])
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_autocast_follows_the_requested_dtype(dtype):
    module = lstm_fused.LSTM(4, 5, peephole="full")
    with torch.autocast("cpu", dtype=dtype):
        out, (h_n, c_n) = module(torch.randn(3, 2, 4))
    assert out.dtype == h_n.dtype == c_n.dtype == dtype


@variant_params
def test_cpu_autocast_cell_with_float32_state(variant):
    """Under autocast the gate GEMMs (F.linear) return bf16 while a user's state stays fp32;
    without an autocast kernel the fused op would reject the mixed dtypes."""
    peephole, coupled = variant
    torch.manual_seed(1)
    cell = lstm_fused.LSTMCell(5, 16, peephole=peephole, coupled=coupled)
    x, hx = torch.randn(4, 5), (torch.randn(4, 16), torch.randn(4, 16))
    expected = cell(x, hx)
    with torch.autocast("cpu"):
        got = cell(x, hx)
    for a, b in zip(got, expected):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


def test_cpu_autocast_under_torch_compile():
    torch.manual_seed(2)
    module = lstm_fused.LSTM(4, 6, peephole="diagonal")
    x = torch.randn(5, 2, 4)

    def run(x):
        with torch.autocast("cpu"):
            return module(x)[0]

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    got, expected = compiled(x), run(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _cell_backward_case(dtype):
    g = torch.Generator().manual_seed(3)
    gates, c_prev = torch.randn(3, 4 * 5, generator=g), torch.randn(3, 5, generator=g)
    weight_ch = torch.randn(3, 5, generator=g)
    _, c, gates_out = ops.ops.cell_forward(gates, c_prev, weight_ch, "diagonal", False)
    grad_h = torch.randn(3, 5, generator=g).to(dtype)
    return grad_h, None, gates_out, c_prev, c, weight_ch, "diagonal", False


def test_backward_ops_keep_the_forward_dtype_under_autocast():
    """A float32 forward's backward stays float32 inside an autocast region, and a gradient
    arriving in bf16 is brought to the forward's dtype instead of failing the dtype check."""
    float32_case = _cell_backward_case(torch.float32)
    bf16_grad_case = _cell_backward_case(torch.bfloat16)  # same tensors, grad_h rounded to bf16
    expected = ops.ops.cell_backward(*float32_case)
    expected_mixed = ops.ops.cell_backward(bf16_grad_case[0].float(), *bf16_grad_case[1:])
    with torch.autocast("cpu"):
        got = ops.ops.cell_backward(*float32_case)
        got_mixed = ops.ops.cell_backward(*bf16_grad_case)
    for a, b in zip((*got, *got_mixed), (*expected, *expected_mixed)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_backward_keeps_the_forward_dtype_under_autocast():
    torch.manual_seed(4)
    module = lstm_fused.LSTM(3, 4, peephole="diagonal", proj_size=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    out = module(x)[0]
    expected = torch.autograd.grad(out.sum(), [x, *module.parameters()], retain_graph=True)
    with torch.autocast("cpu"):
        got = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- profiler labels -------------------------------------------------------------------------


def _chrome_trace_names(fn, tmp_path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    return {e["name"] for e in events if e.get("name", "").startswith("lstm_fused::")}


@pytest.mark.parametrize("peephole", [None, "full"])
def test_cpu_profiler_trace_labels_every_op(peephole, tmp_path):
    """An LSTM and an LSTMCell forward+backward leave a lstm_fused::<op> range for every
    operator and for every pointwise kernel launch in a chrome trace."""
    module = lstm_fused.LSTM(4, 6, peephole=peephole)
    cell = lstm_fused.LSTMCell(4, 6, peephole=peephole)
    x = torch.randn(3, 2, 4, requires_grad=True)

    def train_step():
        out, _ = module(x)
        h, c = cell(x[0])
        (out.sum() + h.sum() + c.sum()).backward()

    names = _chrome_trace_names(train_step, tmp_path)
    expected = {f"lstm_fused::{name}" for name in ops.OP_NAMES}
    expected |= {"lstm_fused::pointwise_forward", "lstm_fused::pointwise_backward"}
    assert names == expected


# --- kernel names, NVTX ranges and ptxas's report --------------------------------------------

DTYPE_NAMES = ["float", "double", "c10::Half", "c10::BFloat16"]
VARIANT_NAMES = ["standard", "coupled"]
VARIANT_NAMES += [f"{g}_{p}" for g in ("standard", "coupled")
                  for p in ("diagonal_peephole", "full_peephole_update", "full_peephole_output")]


def expected_kernel_names():
    return {f"lstm_fused_pointwise_{direction}<{dtype}, {variant}>"
            for direction, dtype, variant in itertools.product(("forward", "backward"),
                                                               DTYPE_NAMES, VARIANT_NAMES)}


def _defined_symbols():
    if not shutil.which("nm"):
        pytest.skip("nm (binutils) not installed")
    result = subprocess.run(["nm", "-C", "--defined-only", _C.__file__], capture_output=True,
                            text=True, check=True)
    return result.stdout.splitlines()


@needs_cuda_build
def test_cuda_kernels_have_descriptive_names():
    """Every kernel instantiation is lstm_fused_pointwise_<direction><dtype, named variant>."""
    kernels = {ptxas_usage.short_name(line.split(" ", 2)[2]) for line in _defined_symbols()
               if "lstm_fused::cuda::lstm_fused_pointwise_" in line and "[clone" not in line}
    assert kernels == expected_kernel_names()


@needs_cuda_build
def test_every_cuda_op_runs_inside_an_nvtx_range():
    symbols = "\n".join(_defined_symbols())
    assert "InitializeInjectionNvtx2" in symbols  # nvtx3's loader for Nsight's injection library
    for name in ops.OP_NAMES:
        constant = "k" + "".join(part.title() for part in name.split("_"))
        wrapper = (f"WithNvtxRange<&lstm_fused::(anonymous namespace)::{constant}, "
                   f"&lstm_fused::DeviceOps<&lstm_fused::cuda_kernels>::{name}>::call")
        assert wrapper in symbols, f"{name} is registered for CUDA without an NVTX range"


@pytest.mark.parametrize("arch", ptxas_usage.ARCHS)
def test_recorded_ptxas_usage_shows_no_spills(arch):
    usages = ptxas_usage.parse_recorded(ptxas_usage.recorded_path(arch).read_text())
    assert {u.kernel for u in usages} == expected_kernel_names()
    for u in usages:
        assert (u.spill_store_bytes, u.spill_load_bytes, u.stack_bytes) == (0, 0, 0), u
        assert 0 < u.registers <= 64, u  # 64: full occupancy of 256-thread blocks on sm_80/90


def test_ptxas_log_parser_reads_spills():
    log = ("ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z6kernelv\n"
           "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 0 barriers, 384 bytes cmem[0]\n")
    [usage] = ptxas_usage.parse_ptxas_log(log)
    assert (usage.registers, usage.stack_bytes, usage.spill_store_bytes,
            usage.spill_load_bytes) == (255, 16, 8, 4)
    assert usage.kernel == "kernel"


@pytest.mark.slow
@pytest.mark.skipif(not ops.BUILT_WITH_CUDA or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_recorded_ptxas_usage_is_current():
    """Recompiles the kernels device-only (about 20 s) and compares with docs/ptxas/."""
    assert ptxas_usage.main(["--check"]) == 0, "rerun benchmarks/ptxas_usage.py and commit"


# --- no host synchronisation on the CUDA path ------------------------------------------------

# Calls that wait for the GPU, or copy between host and device (pageable host memory makes a
# host-to-device copy synchronous, and CUDA graph capture rejects it).
HOST_SYNC = re.compile(r"\.item\s*[<(]|\.cpu\s*\(|\bkCPU\b|cudaDeviceSynchronize|"
                       r"cudaStreamSynchronize|stream_synchronize|\.synchronize\s*\(|"
                       r"cudaMemcpy\s*\(|_local_scalar_dense|\.tolist\s*\(|\bat::tensor\s*\(|"
                       r"\.nonzero\s*\(|\.is_nonzero\s*\(|\.equal\s*\(")
# (file, code) pairs known to match, each with the reason it is accepted.
KNOWN_HOST_TRANSFERS = {
    ("lstm_fused/_checks.py", "return batch_sizes.tolist()"):
        "PackedSequence.batch_sizes is a CPU tensor by PyTorch's contract: no device involved",
}
# Sources of the CUDA path: the device-generic drivers, CUDA code and the Python op layer
# (with the argument checks, _checks.py). csrc/cpu/ and csrc/host_shim/ never run with CUDA
# tensors.
CUDA_PATH_SOURCES = ["csrc/*.h", "csrc/*.cpp", "csrc/cuda/*", "lstm_fused/ops.py",
                     "lstm_fused/functional.py", "lstm_fused/modules.py", "lstm_fused/_checks.py",
                     "lstm_fused/_double_backward.py"]


def _code_lines(path):
    comment = "#" if path.suffix == ".py" else "//"
    for line in path.read_text().splitlines():
        code = line.split(comment, 1)[0].strip()
        if code:
            yield code


def _host_sync_matches():
    for pattern in CUDA_PATH_SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            for code in _code_lines(path):
                if HOST_SYNC.search(code):
                    yield str(path.relative_to(ROOT)), code


def test_no_host_synchronisation_in_cuda_path_sources():
    unexpected = [m for m in _host_sync_matches() if m not in KNOWN_HOST_TRANSFERS]
    assert not unexpected, unexpected


def test_known_host_transfers_are_still_there():
    """Keeps the list above honest: an entry whose code was fixed must be removed."""
    stale = set(KNOWN_HOST_TRANSFERS) - set(_host_sync_matches())
    assert not stale, stale


@pytest.mark.parametrize("code", ["x.item()", "t.item<float>()", "a.cpu()", "at::kCPU",
                                  "cudaStreamSynchronize(s)", "b.tolist()",
                                  "at::tensor(v).to(d)", "stream.synchronize()"])
def test_host_sync_pattern_catches(code):
    assert HOST_SYNC.search(code)


# --- the CUDA suite here ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make test-gpu runs it")
def test_cuda_suite_skips_visibly_without_a_gpu():
    """`make test-gpu` (pytest -m cuda) exits 0 here and reports every CUDA test as skipped
    with the reason; it must not exit 5 (nothing collected) or fail."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rs",
         "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ skipped, \d+ deselected in .*", summary), summary
    assert "no CUDA device" in result.stdout
    assert int(summary.split(" skipped")[0].split()[-1]) >= 20


# --- docs/gpu.md's cost model ------------------------------------------------------------------

def test_gpu_doc_shows_the_cost_model_output():
    doc = (ROOT / "docs" / "gpu.md").read_text()
    begin = doc.index("-->\n", doc.index("<!-- cost-model:begin")) + len("-->\n")
    end = doc.index("<!-- cost-model:end -->")
    assert doc[begin:end] == gpu_step_cost.render_markdown(), \
        "rerun: python benchmarks/gpu_step_cost.py and paste into docs/gpu.md"


# The benchmark's names of the cost model's variants (it has no coupled full-peephole variant).
BENCH_NAMES = {"vanilla": "vanilla", "diagonal": "diagonal", "coupled": "coupled",
               "coupled+diagonal": "diagonal+coupled", "full": "full"}


@pytest.mark.parametrize("variant", [v for v in gpu_step_cost.VARIANTS if v.name in BENCH_NAMES],
                         ids=lambda v: v.name)
def test_cost_model_flops_agree_with_the_benchmark(variant):
    """Two derivations of the GEMM FLOPs: the benchmark's (useful FLOPs, backward = 2x forward)
    and the cost model's (what layer.cpp executes). They agree except for full peepholes, whose
    stacked recurrent GEMM also multiplies zero blocks, so executes more."""
    import bench  # benchmarks/

    name, m = BENCH_NAMES[variant.name], gpu_step_cost
    forward = m.T * m.gemm_flops_per_step(variant, "forward")
    both = forward + m.T * m.gemm_flops_per_step(variant, "backward")
    useful_forward = bench.gemm_flops(m.T, m.B, m.I, m.H, name, 0, "fwd")
    useful_both = bench.gemm_flops(m.T, m.B, m.I, m.H, name, 0, "fwdbwd")
    if variant.peephole == "full":
        assert forward > useful_forward and both > useful_both
    else:
        assert (forward, both) == (useful_forward, useful_both)


def test_cost_model_pointwise_traffic():
    """The standard forward step moves 12 values per element (5 loads, 7 stores): 1.5 MiB at
    B=64, H=512 in float32; bf16 halves it; coupling drops one block each way."""
    vanilla, coupled = gpu_step_cost.VARIANTS[0], gpu_step_cost.VARIANTS[2]
    fp32 = gpu_step_cost.step_cost(vanilla, "float32", "forward")
    assert (fp32["loads"], fp32["stores"], fp32["pointwise_bytes"]) == (5, 7, 3 << 19)
    assert gpu_step_cost.step_cost(vanilla, "bfloat16", "forward")["pointwise_bytes"] == 3 << 18
    assert gpu_step_cost.pointwise_values_per_element(coupled, "forward") == (4, 6)
    assert gpu_step_cost.pointwise_values_per_element(coupled, "backward") == (8, 4)
