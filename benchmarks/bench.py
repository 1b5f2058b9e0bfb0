"""Benchmark the fused LSTM variants against torch.nn.LSTM (and the fused GRU against torch.nn.GRU)
and plain-PyTorch loops.

    python benchmarks/bench.py            # default grid (includes the headline T=100, B=64, I=H=256)
    python benchmarks/bench.py --quick    # tiny grid, < 1 min (used by `make run`)
    python benchmarks/bench.py --full     # bigger grid
    python benchmarks/bench.py --sizes 100,64,256,256 --modes fwd --profile
    python benchmarks/bench.py --batch-sweep --sweep-plot docs/images/batch-sweep.png
                                          # B = 1..256 at T=100 I=H=256: table + ratio plot

Candidates, all fed the same input and (per variant) the same weights:
    nn.LSTM (oneDNN)     torch.nn.LSTM as shipped; on CPU the oneDNN (mkldnn) RNN path. The baseline.
    nn.LSTM (native)     torch.nn.LSTM with oneDNN disabled (torch.backends.mkldnn.flags(enabled=False)).
    fused <variant>      lstm_fused.LSTM: vanilla, diagonal peephole, coupled, diagonal+coupled, full.
    fused ... (ATen GEMM) the first fused variant with its CPU GEMMs forced through ATen (MKL)
                         (lstm_fused.cpu_gemm.mode("aten")) instead of the path measured fastest.
    reference loop       lstm_fused.reference.lstm_layer, a plain-PyTorch Python time loop.
    compiled cell loop   torch.compile(lstm_fused.reference.lstm_cell) called in a Python time loop
                         (inductor; falls back to aot_eager, labelled, if inductor fails or is slow).
    nn.GRU, fused GRU    (--candidates gru) torch.nn.GRU (on CPU ATen's own time loop: torch has no
                         oneDNN GRU; cuDNN on CUDA) and lstm_fused.GRU with its weights
                         (load_state_dict). The fused GRU's ratio is against nn.GRU, measured in the
                         same rounds as the LSTMs; nn.GRU's own row is its ratio to itself (1).

Modes: "fwd" (inference: torch.no_grad) and "fwdbwd" (forward + backward of the output).
Then the latency case: one LSTMCell step at batch 1 (I = H = --cell-sizes), under
torch.inference_mode with 1 thread, lstm_fused.LSTMCell against torch.nn.LSTMCell (and
lstm_fused.GRUCell against torch.nn.GRUCell, in the same rounds); and the table of the performance
targets (issues 15 and 24), each ratio with its target.
Each (size, mode) point warms every candidate up, then runs rounds in which every candidate is timed
once, in a rotating order, so all candidates see the same machine noise. Reported: median and spread
(IQR, min-max) in ms, ratio vs nn.LSTM (ours / theirs, the median of the per-round ratios; < 1 is
faster; the GRU's vs nn.GRU), GFLOP/s (GEMM FLOPs only: forward 2*T*B*(I+R)*G*H (+ projection, +
full peepholes; G = 3 for the GRU), forward + backward 3x forward) and % of the measured GEMM peak.
Writes bench.json, bench.png (and a chrome trace with --profile) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import lstm_fused
from lstm_fused import reference

HEADLINE = (100, 64, 256, 256)  # T, B, I, H
QUICK_GRID = [(20, 16, 64, 64), (50, 32, 128, 128)]
DEFAULT_GRID = [
    (100, 64, 256, 256),  # headline
    (20, 16, 64, 64),  # small and short
    (100, 1, 256, 256),  # batch 1 (latency)
    (100, 256, 256, 256),  # large batch
    (500, 16, 128, 128),  # long sequence
    (25, 32, 1024, 1024),  # large hidden
]
FULL_GRID = [(T, B, H, H) for H in (128, 256, 512, 1024) for B in (1, 16, 64, 256)
             for T in (25, 100, 400)]
# --batch-sweep: every variant against nn.LSTM at these batch sizes, T, I, H fixed (issue 25)
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWEEP_SHAPE = (100, 256, 256)  # T, I, H
MODES = ("fwd", "fwdbwd")
MODE_LABEL = {"fwd": "forward (no_grad)", "fwdbwd": "forward+backward"}

# name -> (peephole, coupled)
VARIANTS = {
    "vanilla": (None, False),
    "diagonal": ("diagonal", False),
    "coupled": (None, True),
    "diagonal+coupled": ("diagonal", True),
    "full": ("full", False),
}
# --candidates choices; "gru" adds two rows: kind "nn-gru" (torch.nn.GRU, the GRU's baseline) and
# kind "gru" (lstm_fused.GRU), both of variant GRU
CANDIDATE_KINDS = ("nn", "nn-native", "fused", "fused-aten", "reference", "compiled", "gru")
GRU = "gru"  # the variant name of the GRU rows (gemm_flops: 3 gate blocks, no peepholes)
# kinds whose rows are a baseline: their ratio is 1, the other rows of their family divide by them
BASELINE_KINDS = {"nn": "lstm", "nn-gru": "gru"}


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def gemm_flops(T, B, I, H, variant="vanilla", proj=0, mode="fwd") -> int:
    """GEMM FLOPs of one layer: forward 2*T*B*(I+R)*G*H (+ 2*T*B*H*R projection, + 2*T*B*P*H*H
    full peepholes); forward+backward counts the backward as 2x the forward. `variant` is a name
    of VARIANTS or a (peephole, coupled) pair, or GRU ("gru": 3 gate blocks, as coupled, and no
    peepholes). The one FLOP model (gpu_step_cost.py uses it)."""
    if variant == GRU:
        peephole, coupled = None, True
    else:
        peephole, coupled = VARIANTS[variant] if isinstance(variant, str) else variant
    G, P = (3, 2) if coupled else (4, 3)
    R = proj or H
    fwd = 2 * T * B * (I + R) * G * H
    if proj:
        fwd += 2 * T * B * H * R
    if peephole == "full":
        fwd += 2 * T * B * P * H * H
    return fwd if mode == "fwd" else 3 * fwd


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Timer:
    """Wall time of one call in ms: perf_counter on CPU, CUDA events (+ synchronize) on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def summarize(times_ms: list[float]) -> dict:
    s = sorted(times_ms)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"median_ms": statistics.median(s), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": s[0], "max_ms": s[-1]}


class _Timeout(Exception):
    pass


def call_with_timeout(fn, seconds: float):
    """fn() with a SIGALRM deadline (main thread on Unix); without a deadline elsewhere."""
    usable = (seconds and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        return fn()

    def on_alarm(signum, frame):
        raise _Timeout(f"took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str  # unique label in tables
    kind: str  # one of CANDIDATE_KINDS
    variant: str
    module: nn.Module | None = None
    context: object = None  # a factory of a context manager around each call (nn-native)
    note: str = ""
    skipped: bool = False
    times: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    check: float | None = None  # max |out - out of the same-variant reference| (forward)

    def ctx(self):
        return self.context() if self.context is not None else contextlib.nullcontext()

    @property
    def family(self) -> str:
        """"gru" for nn.GRU and the fused GRU, else "lstm": whose baseline the ratio is against."""
        return "gru" if self.variant == GRU else "lstm"


def baseline_of(c: Candidate, cands: list[Candidate]) -> Candidate | None:
    """The candidate c's ratio is measured against: nn.LSTM for the LSTMs, nn.GRU for the GRU."""
    return next((b for b in cands if not b.skipped and BASELINE_KINDS.get(b.kind) == c.family),
                None)


def make_loop_layer(cell):
    """A layer function (signature of reference.lstm_layer) calling `cell` in a Python loop. The
    options the module passes switched off (cell_clip=0.0, zoneout=None, ...) are not passed on,
    so the cell is called as prepare_compiled_cell warmed it up; those switched on (clips, layer
    norm) are passed to every step; zoneout is not supported."""

    def layer(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_ch=None,
              weight_hr=None, *, peephole=None, coupled=False, reverse=False, batch_sizes=None,
              zoneout=None, **options):
        if batch_sizes is not None:
            raise NotImplementedError("compiled cell loop: packed sequences are not benchmarked")
        if zoneout is not None:
            raise NotImplementedError("compiled cell loop: zoneout is not benchmarked")
        on = {k: v for k, v in options.items()
              if v is not None and not (isinstance(v, (int, float)) and v == 0)}
        h, c = hx, cx
        outs = []
        steps = range(input.shape[0] - 1, -1, -1) if reverse else range(input.shape[0])
        for t in steps:
            h, c = cell(input[t], h, c, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                        weight_hr, peephole=peephole, coupled=coupled, **on)
            outs.append(h)
        if reverse:
            outs.reverse()
        return torch.stack(outs), (h, c)

    return layer


def _set_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))


def prepare_compiled_cell(backend: str, variants: list[str], device, dtype, timeout: float):
    """torch.compile(reference.lstm_cell, dynamic=True) warmed up (forward, backward, no_grad) on a
    toy size for each variant. Inductor failing or exceeding `timeout` s falls back to aot_eager.
    Returns (compiled cell, label, info dict)."""
    _set_recompile_limit(64)
    info = {"requested_backend": backend, "timeout_s": timeout}

    def warm(cell):
        for variant in variants:
            peephole, coupled = VARIANTS[variant]
            G, P = (3, 2) if coupled else (4, 3)
            B, I, H = 3, 5, 7
            gen = torch.Generator().manual_seed(0)

            def rand(*shape, gen=gen):
                return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

            params = (rand(G * H, I), rand(G * H, H), rand(G * H), rand(G * H),
                      rand(P, H) if peephole == "diagonal" else
                      (rand(P * H, H) if peephole == "full" else None), None)
            x, h, c = rand(B, I), rand(B, H), rand(B, H)
            h1, c1 = cell(x, h, c, *params, peephole=peephole, coupled=coupled)
            (h1.sum() + c1.sum()).backward()
            with torch.no_grad():
                cell(x, h, c, *params, peephole=peephole, coupled=coupled)

    t0 = time.perf_counter()
    try:
        cell = torch.compile(reference.lstm_cell, dynamic=True, backend=backend)
        with _quiet():
            call_with_timeout(lambda: warm(cell), timeout if backend == "inductor" else 0)
        info.update(backend=backend, compile_s=time.perf_counter() - t0)
        return cell, f"compiled cell loop ({backend})", info
    except (Exception, _Timeout) as exc:  # any compiler failure -> fallback
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        info["fallback_reason"] = reason
        torch._dynamo.reset()
        if backend == "aot_eager":
            raise
        print(f"[bench] torch.compile backend={backend!r} failed or was too slow ({reason}); "
              "falling back to backend='aot_eager'", file=sys.stderr)
        t0 = time.perf_counter()
        cell = torch.compile(reference.lstm_cell, dynamic=True, backend="aot_eager")
        with _quiet():
            warm(cell)
        info.update(backend="aot_eager", compile_s=time.perf_counter() - t0)
        return cell, "compiled cell loop (aot_eager fallback)", info


def probe_variant(variant: str, device, dtype) -> str | None:
    """None if lstm_fused.LSTM(variant) (lstm_fused.GRU for GRU) constructs and runs
    forward+backward on a toy input, else the reason it does not."""
    try:
        if variant == GRU:
            m = lstm_fused.GRU(3, 4, device=device, dtype=dtype)
        else:
            peephole, coupled = VARIANTS[variant]
            m = lstm_fused.LSTM(3, 4, peephole=peephole, coupled=coupled, device=device,
                                dtype=dtype)
        out, _ = m(torch.randn(2, 1, 3, device=device, dtype=dtype))
        out.sum().backward()
        return None
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"skipped: {msg[:90]}"


def build_candidates(args, I, H, compiled_cell, compiled_label, fused_skips) -> list[Candidate]:
    device, dtype = args.device, args.dtype
    factory = {"device": device, "dtype": dtype}
    torch.manual_seed(args.seed)
    modules = {}  # variant -> a fused module holding that variant's weights

    def fused_module(variant):
        if variant not in modules:
            peephole, coupled = VARIANTS[variant]
            modules[variant] = lstm_fused.LSTM(I, H, proj_size=args.proj_size, peephole=peephole,
                                               coupled=coupled, **factory)
        return modules[variant]

    def twin(variant, layer_fn):
        m = lstm_fused.LSTM(I, H, proj_size=args.proj_size, peephole=VARIANTS[variant][0],
                            coupled=VARIANTS[variant][1], **factory)
        m.load_state_dict(fused_module(variant).state_dict())
        m._layer_fn = layer_fn
        return m

    cands = []
    cuda = torch.device(device).type == "cuda"
    if "nn" in args.candidates or "nn-native" in args.candidates:
        base = nn.LSTM(I, H, proj_size=args.proj_size, **factory)
        base.load_state_dict(fused_module("vanilla").state_dict())
        lib = "cuDNN" if cuda else "oneDNN"
        # the baseline is always measured (ratios need it), listed first
        cands.append(Candidate(f"nn.LSTM ({lib})", "nn", "vanilla", base))
        if "nn-native" in args.candidates:
            flags = (torch.backends.cudnn.flags if cuda else torch.backends.mkldnn.flags)
            cands.append(Candidate(f"nn.LSTM (no {lib})", "nn-native", "vanilla", base,
                                   context=lambda: flags(enabled=False)))
    if "fused" in args.candidates:
        for variant in args.variants:
            if variant in fused_skips:
                cands.append(Candidate(f"fused {variant}", "fused", variant,
                                       note=fused_skips[variant], skipped=True))
            else:
                cands.append(Candidate(f"fused {variant}", "fused", variant, fused_module(variant)))
    if "fused-aten" in args.candidates and not cuda:
        # The same fused layer with its CPU GEMMs forced through ATen (MKL): against the path
        # csrc/gemm.cpp measured fastest.
        for variant in args.variants[:1]:
            if variant not in fused_skips:
                cands.append(Candidate(f"fused {variant} (ATen GEMM)", "fused-aten", variant,
                                       fused_module(variant),
                                       context=lambda: lstm_fused.cpu_gemm.mode("aten")))
    if "reference" in args.candidates:
        for variant in args.ref_variants:
            cands.append(Candidate(f"reference loop {variant}", "reference", variant,
                                   twin(variant, reference.lstm_layer)))
    if "compiled" in args.candidates and compiled_cell is not None:
        for variant in args.ref_variants:
            cands.append(Candidate(f"{compiled_label.replace('compiled cell loop', 'compiled')} "
                                   f"{variant}", "compiled", variant,
                                   twin(variant, make_loop_layer(compiled_cell))))
    if "gru" in args.candidates:
        # The GRU against its own baseline, torch.nn.GRU with the same weights (load_state_dict),
        # in the same rounds as the LSTMs. On the CPU torch runs aten::gru, its own time loop
        # (torch has no oneDNN GRU); on CUDA cuDNN.
        if args.proj_size:
            cands.append(Candidate("fused GRU", "gru", GRU, skipped=True,
                                   note="skipped: --proj-size (nn.GRU has no projection)"))
        elif GRU in fused_skips:
            cands.append(Candidate("fused GRU", "gru", GRU, note=fused_skips[GRU], skipped=True))
        else:
            torch.manual_seed(args.seed)  # the GRU's weights do not depend on the other candidates
            theirs = nn.GRU(I, H, **factory)
            ours = lstm_fused.GRU(I, H, **factory)
            ours.load_state_dict(theirs.state_dict())
            cands.append(Candidate(f"nn.GRU ({'cuDNN' if cuda else 'ATen'})", "nn-gru", GRU,
                                   theirs))
            cands.append(Candidate("fused GRU", "gru", GRU, ours))
    return cands


def check_against_reference(cands: list[Candidate], x) -> None:
    """c.check = max |output - reference loop output| with the same weights, on the prefix x
    (reference.lstm_layer; reference.gru_layer for the GRU)."""
    refs = {}
    with torch.no_grad(), _quiet():
        for c in cands:
            if c.variant not in refs:
                gru = c.variant == GRU
                ours = lstm_fused.GRU if gru else lstm_fused.LSTM
                weights = next((d.module for d in cands if d.variant == c.variant
                                and isinstance(d.module, ours)), None)
                if weights is None:  # only torch's module runs this variant (vanilla, GRU)
                    src = c.module
                    p = next(src.parameters())
                    extra = {} if gru else {"proj_size": src.proj_size}
                    weights = ours(src.input_size, src.hidden_size, src.num_layers,
                                   device=p.device, dtype=p.dtype, **extra)
                    weights.load_state_dict(src.state_dict())
                m = copy.deepcopy(weights)
                m._layer_fn = reference.gru_layer if gru else reference.lstm_layer
                refs[c.variant] = m(x)[0].float()
            with c.ctx():
                out = c.module(x)[0].float()
            c.check = float((out - refs[c.variant]).abs().max())


# --------------------------------------------------------------------------------------------
# One (size, mode) point
# --------------------------------------------------------------------------------------------


def run_point(args, size, mode, cands, timer, peak_gflops) -> list[dict]:
    T, B, I, H = size
    device, dtype = args.device, args.dtype
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(T, B, I, generator=g).to(device, dtype)
    if mode == "fwdbwd" and args.input_grad:
        x.requires_grad_()
    R = args.proj_size or H
    grad_out = torch.randn(T, B, R, generator=g).to(device, dtype)
    # the GRU's output is H wide (no projection): the same gradient where R == H
    grad_out_h = grad_out if R == H else torch.randn(T, B, H, generator=g).to(device, dtype)
    active = [c for c in cands if not c.skipped]
    for c in cands:
        c.times, c.ratios = [], []
        if c.module is not None:
            c.module.train(mode == "fwdbwd")

    def step_fn(c):
        if mode == "fwd":
            def fn():
                with torch.no_grad(), c.ctx():
                    return c.module(x)[0]
        else:
            grad = grad_out_h if c.family == "gru" else grad_out

            def fn():
                with c.ctx():
                    out = c.module(x)[0]
                    out.backward(grad)
                return out
        return fn

    fns = {c.name: step_fn(c) for c in active}

    # warmup, and a correctness check of every candidate against the reference loop
    last = {}
    with _quiet():
        for c in active:
            for _ in range(max(1, args.warmup)):
                last[c.name] = timer(fns[c.name])
            for p in c.module.parameters():
                p.grad = None
            x.grad = None
    if mode == args.modes[0]:
        check_against_reference(active, x[: min(T, 8)])

    # how many rounds fit in the budget (at least --min-repeats, at most --repeats)
    round_ms = sum(last.values())
    repeats = args.repeats
    if args.point_budget and round_ms > 0:
        repeats = int(min(args.repeats, max(args.min_repeats, args.point_budget * 1e3 // round_ms)))

    bases = {c.name: baseline_of(c, active) for c in active}  # nn.LSTM, nn.GRU for the GRU
    with _quiet():
        for r in range(repeats):
            order = active[r % len(active):] + active[:r % len(active)]
            round_times = {}
            for c in order:
                round_times[c.name] = timer(fns[c.name])
                if mode == "fwdbwd":
                    for p in c.module.parameters():
                        p.grad = None
                    x.grad = None
            for c in active:
                c.times.append(round_times[c.name])
                if bases[c.name] is not None:
                    c.ratios.append(round_times[c.name] / round_times[bases[c.name].name])

    rows = []
    for c in cands:
        proj = 0 if c.family == "gru" else args.proj_size
        base = bases.get(c.name)
        base_median = statistics.median(base.times) if base is not None else None
        row = {"T": T, "B": B, "I": I, "H": H, "proj_size": proj, "mode": mode,
               "candidate": c.name, "kind": c.kind, "variant": c.variant, "note": c.note,
               "status": "skipped" if c.skipped else "ok",
               "baseline": base.name if base is not None else None}
        if not c.skipped:
            flops = gemm_flops(T, B, I, H, c.variant, proj, mode)
            s = summarize(c.times)
            gflops = flops / (s["median_ms"] * 1e-3) / 1e9
            row.update(s, repeats=len(c.times), times_ms=c.times, flops=flops, gflops=gflops,
                       pct_peak=100 * gflops / peak_gflops if peak_gflops else None,
                       ratio_vs_nn=statistics.median(c.ratios) if c.ratios else None,
                       ratio_of_medians=s["median_ms"] / base_median if base_median else None,
                       ratio_of_mins=(s["min_ms"] / min(base.times)) if base is not None else None,
                       check_max_abs_diff=c.check,
                       check_against="reference loop, same weights, first <= 8 steps")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# GEMM peak
# --------------------------------------------------------------------------------------------


def measure_gemm_peak(size, args, timer) -> dict:
    """GFLOP/s of the LSTM's GEMMs at `size`: the recurrent [B, H] x [H, G*H] step GEMM and the
    whole-sequence [T*B, I] x [I, G*H] one, each with torch.mm and mkldnn._linear_pointwise.
    The best is reported as the GEMM peak (a measured, not theoretical, peak: a candidate that
    uses a better GEMM than these can exceed 100%)."""
    T, B, I, H = size
    device, dtype = args.device, args.dtype
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, H, generator=g).to(device, dtype)
    w = torch.randn(4 * H, H, generator=g).to(device, dtype)  # [out, in] as nn.Linear
    wt = w.t().contiguous()
    big = torch.randn(T * B, I, generator=g).to(device, dtype)
    wi = torch.randn(I, 4 * H, generator=g).to(device, dtype)
    small_flops, big_flops = 2 * B * H * 4 * H, 2 * T * B * I * 4 * H
    inner = min(200, max(1, int(2e8 // small_flops)))  # batches of small GEMMs, <= 0.2 GFLOP
    methods = {
        f"torch.mm [{B}x{H}]x[{H}x{4 * H}]": (lambda: [torch.mm(a, wt) for _ in range(inner)],
                                             small_flops * inner),
        f"torch.mm [{T * B}x{I}]x[{I}x{4 * H}]": (lambda: torch.mm(big, wi), big_flops),
    }
    if torch.device(device).type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        lp = torch.ops.mkldnn._linear_pointwise
        wi_t = wi.t().contiguous()
        methods[f"mkldnn._linear_pointwise [{B}x{H}]x[{H}x{4 * H}]"] = (
            lambda: [lp(a, w, None, "none", [], "") for _ in range(inner)], small_flops * inner)
        methods[f"mkldnn._linear_pointwise [{T * B}x{I}]x[{I}x{4 * H}]"] = (
            lambda: lp(big, wi_t, None, "none", [], ""), big_flops)
    results, times = {}, {k: [] for k in methods}
    try:
        with torch.no_grad():
            for _ in range(3):
                for fn, _ in methods.values():
                    fn()
            for _ in range(7):
                for name, (fn, _) in methods.items():
                    times[name].append(timer(fn))
    except Exception as exc:  # noqa: BLE001
        return {"peak_gflops": None, "error": str(exc)[:200]}
    for name, (_, flops) in methods.items():
        results[name] = flops / (statistics.median(times[name]) * 1e-3) / 1e9
    best = max(results, key=results.get)
    return {"peak_gflops": results[best], "peak_method": best, "methods_gflops": results}


# --------------------------------------------------------------------------------------------
# Latency: one cell step at batch 1
# --------------------------------------------------------------------------------------------


def run_cell_latency(args, gru: bool | None = None) -> list[dict]:
    """Microseconds per LSTMCell step at batch 1, I = H, under torch.inference_mode with 1 thread:
    torch.nn.LSTMCell, lstm_fused.LSTMCell (the same weights) and lstm_fused.PeepholeLSTMCell;
    and with --candidates gru, torch.nn.GRUCell and lstm_fused.GRUCell (the same weights). Each is
    timed over --cell-calls chained calls (the state fed back), all in the same rounds of rotating
    order. ratio_vs_nn is the median of the per-round ratios against nn.LSTMCell (nn.GRUCell for
    the GRU cells). gru=None: the GRU cells where --candidates has gru."""
    if gru is None:
        gru = "gru" in args.candidates
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for H in args.cell_sizes:
            torch.manual_seed(args.seed)
            factory = {"device": args.device, "dtype": args.dtype}
            theirs = nn.LSTMCell(H, H, **factory)
            cells = {"nn.LSTMCell": theirs, "fused vanilla": lstm_fused.LSTMCell.from_torch(theirs),
                     "fused diagonal": lstm_fused.PeepholeLSTMCell(H, H, **factory)}
            baseline = dict.fromkeys(cells, "nn.LSTMCell")
            if gru:
                torch.manual_seed(args.seed)
                theirs_gru = nn.GRUCell(H, H, **factory)
                cells.update({"nn.GRUCell": theirs_gru,
                              "fused GRUCell": lstm_fused.GRUCell.from_torch(theirs_gru)})
                baseline.update(dict.fromkeys(("nn.GRUCell", "fused GRUCell"), "nn.GRUCell"))
            x = torch.randn(1, H, **factory)

            def chain(cell, x=x, H=H):
                h = c = torch.zeros(1, H, device=x.device, dtype=x.dtype)
                if isinstance(cell, (nn.GRUCell, lstm_fused.GRUCell)):
                    for _ in range(args.cell_calls):
                        h = cell(x, h)
                    return h
                for _ in range(args.cell_calls):
                    h, c = cell(x, (h, c))
                return h

            timer = Timer(torch.device(args.device))
            names = list(cells)
            times = {n: [] for n in names}
            ratios = {n: [] for n in names}
            with torch.inference_mode():
                for name in names:
                    chain(cells[name])
                for r in range(args.cell_rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    t = {n: timer(lambda cell=cells[n]: chain(cell)) * 1e3 / args.cell_calls
                         for n in order}
                    for n in names:
                        times[n].append(t[n])
                        ratios[n].append(t[n] / t[baseline[n]])
            for n in names:
                rows.append({"H": H, "B": 1, "candidate": n, "threads": 1,
                             "baseline": baseline[n],
                             "us_per_step": statistics.median(times[n]),
                             "min_us": min(times[n]), "max_us": max(times[n]),
                             "ratio_vs_nn": statistics.median(ratios[n]),
                             "ratio_of_mins": min(times[n]) / min(times[baseline[n]]),
                             "rounds": args.cell_rounds, "calls_per_round": args.cell_calls})
    finally:
        torch.set_num_threads(threads)
    return rows


def format_cell_latency(rows: list[dict]) -> str:
    lines = [("one cell step, batch 1, I = H, torch.inference_mode, 1 thread (vs nn.LSTMCell; "
              "the GRUCells vs nn.GRUCell):"),
             f"{'H':>5} {'candidate':<16} {'us/step':>8} {'min-max us':>14} {'vs nn':>6}"]
    for r in rows:
        lines.append(f"{r['H']:>5} {r['candidate']:<16} {r['us_per_step']:>8.2f} "
                     f"{r['min_us']:>6.2f}-{r['max_us']:<7.2f} {r['ratio_vs_nn']:>6.2f}")
    return "\n".join(lines)


# The performance targets (issues 15, 24): (what, size, mode, candidate, target ratio vs nn.LSTM;
# the GRU's vs nn.GRU, its cell's vs nn.GRUCell).
TARGETS = [
    ("diagonal peephole, T=100 B=64 I=H=256, forward+backward", HEADLINE, "fwdbwd",
     "fused diagonal", 0.90),
    ("vanilla, same, forward+backward", HEADLINE, "fwdbwd", "fused vanilla", 0.90),
    ("coupled, same, forward+backward", HEADLINE, "fwdbwd", "fused coupled", 0.75),
    ("full peepholes, same, forward+backward", HEADLINE, "fwdbwd", "fused full", 1.20),
    ("vanilla, same size, forward under no_grad", HEADLINE, "fwd", "fused vanilla", 1.00),
    ("diagonal, same size, forward under no_grad", HEADLINE, "fwd", "fused diagonal", 1.00),
    ("full peepholes, forward", HEADLINE, "fwd", "fused full", 1.50),
    ("diagonal, batch 1 (T=100, I=H=256), forward", (100, 1, 256, 256), "fwd", "fused diagonal",
     1.00),
    ("one LSTMCell step, batch 1, H=64 (inference_mode, 1 thread), vs nn.LSTMCell", 64, "cell",
     "fused vanilla", 0.70),
    ("one LSTMCell step, batch 1, H=256 (inference_mode, 1 thread), vs nn.LSTMCell", 256, "cell",
     "fused vanilla", 0.70),
    # issue 24: the GRU against torch.nn.GRU / nn.GRUCell (same weights, same rounds)
    ("GRU vs nn.GRU, T=100 B=64 I=H=256, forward+backward", HEADLINE, "fwdbwd", "fused GRU", 0.90),
    ("GRU vs nn.GRU, same size, forward under no_grad", HEADLINE, "fwd", "fused GRU", 1.00),
    ("GRU vs nn.GRU, batch 1 (T=100, I=H=256), forward", (100, 1, 256, 256), "fwd", "fused GRU",
     1.00),
    ("one GRUCell step, batch 1, H=256 (inference_mode, 1 thread), vs nn.GRUCell", 256, "cell",
     "fused GRUCell", 0.70),
]


def target_rows(rows: list[dict], cell_rows: list[dict]) -> list[dict]:
    """Every target with the measured ratio (None where the run did not measure it)."""
    out = []
    for what, size, mode, candidate, target in TARGETS:
        if mode == "cell":
            found = [r for r in cell_rows if r["H"] == size and r["candidate"] == candidate]
        else:
            found = [r for r in rows if (r["T"], r["B"], r["I"], r["H"]) == tuple(size)
                     and r["mode"] == mode and r["candidate"] == candidate and r["status"] == "ok"]
        ratio = found[0]["ratio_vs_nn"] if found else None
        out.append({"what": what, "ratio": ratio, "target": target,
                    "ratio_of_mins": found[0].get("ratio_of_mins") if found else None,
                    "met": None if ratio is None else ratio <= target})
    return out


def format_targets(targets: list[dict]) -> str:
    lines = [("targets (ratio = ours / torch's: median of per-round ratios, which decides 'met'; "
              "and min / min, the least noisy on a loaded machine):"),
             f"{'what':<80} {'ratio':>6} {'min/min':>7} {'target':>7}  met"]
    for t in targets:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        mins = "-" if t.get("ratio_of_mins") is None else f"{t['ratio_of_mins']:.2f}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"{t['what']:<80} {ratio:>6} {mins:>7} "
                     f"{'<= ' + format(t['target'], '.2f'):>7}  {met}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(v, spec, width):
    return format(v, spec).rjust(width) if v is not None else "-".rjust(width)


def format_table(rows: list[dict]) -> str:
    lines = []
    hdr = (f"{'candidate':<40} {'median ms':>10} {'IQR ms':>8} {'min-max ms':>17} "
           f"{'vs nn':>6} {'GFLOP/s':>8} {'%peak':>6}  note")
    points = []
    for r in rows:
        key = (r["T"], r["B"], r["I"], r["H"], r["mode"])
        if key not in points:
            points.append(key)
    for key in points:
        T, B, I, H, mode = key
        lines.append(f"T={T} B={B} I={I} H={H}  {MODE_LABEL[mode]}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for r in rows:
            if (r["T"], r["B"], r["I"], r["H"], r["mode"]) != key:
                continue
            if r["status"] != "ok":
                lines.append(f"{r['candidate']:<40} {'':>10} {'':>8} {'':>17} {'':>6} {'':>8} "
                             f"{'':>6}  {r['note']}")
                continue
            mm = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
            note = r["note"]
            if r.get("check_max_abs_diff") is not None and r["check_max_abs_diff"] > 1e-3:
                note = (note + " " if note else "") + f"max|diff|={r['check_max_abs_diff']:.1e}!"
            lines.append(f"{r['candidate']:<40} {r['median_ms']:>10.2f} {r['iqr_ms']:>8.2f} "
                         f"{mm:>17} {_fmt(r['ratio_vs_nn'], '.2f', 6)} {r['gflops']:>8.2f} "
                         f"{_fmt(r['pct_peak'], '.1f', 6)}  {note}")
        lines.append("")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """One line per point: ratio vs nn.LSTM per candidate (the GRU's vs nn.GRU)."""
    names = []
    for r in rows:
        if r["candidate"] not in names and r["kind"] not in BASELINE_KINDS:
            names.append(r["candidate"])
    short = [n.replace("compiled (aot_eager fallback)", "compiled(aot)").replace("nn.LSTM ", "")
             .replace("reference loop", "ref").replace("compiled (inductor)", "compiled")
             .replace("diagonal+coupled", "diag+cpl").replace("diagonal", "diag")
             for n in names]
    width = max(9, *(len(s) for s in short))
    lines = ["ratio vs nn.LSTM (our time / theirs, < 1 = faster; fused GRU: vs nn.GRU):",
             f"{'T,B,I,H':<18} {'mode':<7}" + "".join(f" {s:>{width}}" for s in short)]
    seen = []
    for r in rows:
        key = (r["T"], r["B"], r["I"], r["H"], r["mode"])
        if key in seen:
            continue
        seen.append(key)
        by = {x["candidate"]: x for x in rows
              if (x["T"], x["B"], x["I"], x["H"], x["mode"]) == key}
        cells = []
        for n in names:
            x = by.get(n)
            cells.append(f" {'-' if x is None or x['status'] != 'ok' else format(x['ratio_vs_nn'], '.2f'):>{width}}")
        lines.append(f"{','.join(map(str, key[:4])):<18} {key[4]:<7}" + "".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mrows = [r for r in rows if r["mode"] == mode and r["status"] == "ok"
                 and r.get("ratio_vs_nn") is not None]
        points = []
        for r in mrows:
            if (r["T"], r["B"], r["I"], r["H"]) not in points:
                points.append((r["T"], r["B"], r["I"], r["H"]))
        names = []
        for r in mrows:
            if r["candidate"] not in names and r["kind"] not in BASELINE_KINDS:
                names.append(r["candidate"])
        width = 0.8 / max(1, len(names))
        cmap = plt.get_cmap("tab10")
        for k, name in enumerate(names):
            xs, ys = [], []
            for p, point in enumerate(points):
                for r in mrows:
                    if r["candidate"] == name and (r["T"], r["B"], r["I"], r["H"]) == point:
                        xs.append(p - 0.4 + width * (k + 0.5))
                        ys.append(r["ratio_vs_nn"])
            label = name + (" (vs nn.GRU)" if name == "fused GRU" else "")
            ax.bar(xs, ys, width, label=label, color=cmap(k % 10))
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels([f"T={T} B={B}\nI={I} H={H}" for T, B, I, H in points], fontsize=8)
        ax.set_ylabel("time / nn.LSTM's (GRU: nn.GRU's), log; < 1 faster")
        ax.set_title(f"{MODE_LABEL[mode]}")
        ax.grid(axis="y", which="both", alpha=0.3)
        if names:
            ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_points(rows: list[dict]) -> tuple[list[int], list[str], list[str]]:
    """The batch sizes, modes and fused variants of a --batch-sweep run, in run order."""
    batches, modes, variants = [], [], []
    for r in rows:
        for value, seen in ((r["B"], batches), (r["mode"], modes)):
            if value not in seen:
                seen.append(value)
        if r["kind"] == "fused" and r["variant"] not in variants:
            variants.append(r["variant"])
    return batches, modes, variants


def sweep_ratio(rows: list[dict], B: int, mode: str, variant: str):
    for r in rows:
        if (r["B"], r["mode"], r["kind"], r["variant"]) == (B, mode, "fused", variant):
            return r.get("ratio_vs_nn") if r["status"] == "ok" else None
    return None


def recurrent_gemm_paths(choices, B: int, H: int) -> str:
    """The paths measured for the per-step recurrent GEMMs with B rows and K = H (every variant
    and mode: n = 3H or 4H; transposed in backward)."""
    paths = sorted({c.path for c in choices if c.repeated and c.rows == B and H in (c.k, c.n)})
    return "/".join(paths) or "-"


def format_sweep(rows: list[dict], choices, meta: dict) -> str:
    """The --batch-sweep table (markdown): per batch size, each variant's ratio vs nn.LSTM per
    mode, and the recurrent GEMM paths the measured choice took."""
    batches, modes, variants = sweep_points(rows)
    T, I, H = rows[0]["T"], rows[0]["I"], rows[0]["H"]
    lines = [(f"Ratio vs torch.nn.LSTM (our time / theirs, the median of same-round ratios; < 1 = "
             f"faster), T={T} I={I} H={H}, {meta['dtype']}, {meta['threads']} threads, "
             f"{meta['cpu']} (ATen {meta['cpu_capability']}), torch {meta['torch']}, "
             f"CPU GEMM mode {meta['cpu_gemm_mode']}"
             f"{'; fwd+bwd with the input gradient' if meta.get('input_grad') else ''}."), ""]
    header = ["B"] + [f"{v} {'fwd' if m == 'fwd' else 'fwd+bwd'}" for m in modes
                      for v in variants] + ["recurrent GEMM"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header[:-1]) + "|---|")
    for B in batches:
        cells = [str(B)]
        for m in modes:
            for v in variants:
                ratio = sweep_ratio(rows, B, m, v)
                cells.append("-" if ratio is None else f"{ratio:.2f}")
        cells.append(recurrent_gemm_paths(choices, B, H))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """Ratio vs nn.LSTM against batch size, one line per variant, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches, modes, variants = sweep_points(rows)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for variant in variants:
            points = [(B, sweep_ratio(rows, B, mode, variant)) for B in batches]
            points = [(B, r) for B, r in points if r is not None]
            ax.plot([B for B, _ in points], [r for _, r in points], marker="o", label=variant)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(B) for B in batches])
        ax.set_xlabel("batch size B")
        ax.set_ylabel("time / nn.LSTM time (< 1 faster)")
        ax.set_title(MODE_LABEL[mode])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_profile(args, out_dir: str) -> str:
    """Chrome trace of one fused (vanilla) forward+backward at the headline size."""
    from torch.profiler import ProfilerActivity, profile

    T, B, I, H = args.headline
    torch.manual_seed(args.seed)
    m = lstm_fused.LSTM(I, H, proj_size=args.proj_size, device=args.device, dtype=args.dtype)
    x = torch.randn(T, B, I, device=args.device, dtype=args.dtype)
    m(x)[0].sum().backward()  # warmup
    activities = [ProfilerActivity.CPU]
    if torch.device(args.device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        m(x)[0].sum().backward()
    path = os.path.join(out_dir, "trace_fused_fwdbwd.json")
    prof.export_chrome_trace(path)
    with open(os.path.join(out_dir, "profile_fused_fwdbwd.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_sizes(text: str) -> list[tuple[int, int, int, int]]:
    sizes = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        vals = tuple(int(v) for v in part.split(","))
        if len(vals) != 4 or min(vals) <= 0:
            raise argparse.ArgumentTypeError(f"size {part!r} is not T,B,I,H (positive ints)")
        sizes.append(vals)
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="tiny grid, < 60 s (make run)")
    grid.add_argument("--full", action="store_true", help=f"bigger grid ({len(FULL_GRID)} points)")
    grid.add_argument("--sizes", type=_parse_sizes, help='explicit grid "T,B,I,H;T,B,I,H;..."')
    grid.add_argument("--batch-sweep", action="store_true",
                      help="B = 1..256 at T=100 I=H=256 (--sweep-batches, --sweep-shape), nn.LSTM "
                      "and every fused variant; writes batch-sweep.md and a ratio-vs-B plot")
    p.add_argument("--sweep-batches", type=lambda t: [int(v) for v in t.split(",") if v.strip()],
                   default=list(SWEEP_BATCHES), help="batch sizes of --batch-sweep")
    p.add_argument("--sweep-shape", type=lambda t: tuple(int(v) for v in t.split(",")),
                   default=SWEEP_SHAPE, help="T,I,H of --batch-sweep (default 100,256,256)")
    p.add_argument("--sweep-plot", default=None,
                   help="where --batch-sweep's plot goes (default OUT/batch-sweep.png)")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="fwd,fwdbwd (default both)")
    p.add_argument("--candidates", type=_csv(CANDIDATE_KINDS), default=None,
                   help=f"subset of {','.join(CANDIDATE_KINDS)} (nn.LSTM is always measured; "
                   "gru: lstm_fused.GRU against nn.GRU, and GRUCell against nn.GRUCell in the cell "
                   "case; default all, nn,fused with --batch-sweep)")
    p.add_argument("--variants", type=_csv(list(VARIANTS)), default=list(VARIANTS),
                   help="fused variants (default all; 'full' is skipped with a note if unsupported)")
    p.add_argument("--ref-variants", type=_csv(list(VARIANTS)), default=["diagonal"],
                   help="variants for the reference loop and the compiled cell (default diagonal)")
    p.add_argument("--proj-size", type=int, default=0, help="projection size (default 0: none)")
    p.add_argument("--input-grad", action="store_true",
                   help="fwdbwd: the input requires grad, so the backward computes its gradient "
                   "too (as every layer but the first of a stack does; nn.LSTM always computes it)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="warmup calls per candidate (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per point (default 7; quick 5; "
                   "--batch-sweep 41)")
    p.add_argument("--min-repeats", type=int, default=3, help="rounds kept even over --point-budget")
    p.add_argument("--point-budget", type=float, default=None,
                   help="seconds of timed rounds per (size, mode) point (default 60; quick 3; "
                   "--batch-sweep 10)")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"))
    p.add_argument("--compile-timeout", type=float, default=120.0,
                   help="seconds before inductor is abandoned for aot_eager (default 120)")
    p.add_argument("--headline", type=_parse_sizes, default=[HEADLINE],
                   help="size for the GEMM peak and --profile (default 100,64,256,256)")
    p.add_argument("--profile", action="store_true",
                   help="write a chrome trace of one fused forward+backward at the headline size")
    p.add_argument("--cell-sizes", type=lambda t: [int(v) for v in t.split(",") if v.strip()],
                   default=None, help="H of the batch-1 cell-step latency case (default 64,256;"
                   " none with --batch-sweep; empty: skip it)")
    p.add_argument("--cell-calls", type=int, default=200, help="cell steps per timed call")
    p.add_argument("--cell-rounds", type=int, default=15, help="rounds of the cell-step case")
    p.add_argument("--out", default=os.path.join("results", "bench"), help="output dir")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is "
                     "False; torch " + torch.__version__ + ", built with CUDA "
                     + str(torch.version.cuda) + "). Run on a machine with a CUDA GPU, or use "
                     "--device cpu.")
    if args.device == "cuda" and not lstm_fused.ops.BUILT_WITH_CUDA:
        parser.error("--device cuda: the lstm_fused extension was built without CUDA kernels")
    args.dtype = getattr(torch, args.dtype)
    args.headline = args.headline[0]
    sizes = args.sizes or (QUICK_GRID if args.quick else FULL_GRID if args.full else DEFAULT_GRID)
    if args.batch_sweep:
        if len(args.sweep_shape) != 3 or min(args.sweep_shape) <= 0 or not args.sweep_batches:
            parser.error("--sweep-shape must be T,I,H (positive) and --sweep-batches not empty")
        T, I, H = args.sweep_shape
        sizes = [(T, B, I, H) for B in args.sweep_batches]
    if args.candidates is None:
        args.candidates = ["nn", "fused"] if args.batch_sweep else list(CANDIDATE_KINDS)
    if args.cell_sizes is None:
        args.cell_sizes = [] if args.batch_sweep else [64, 256]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or args.batch_sweep
                                                               else 2)
    # The sweep's calls are short (a few ms at small B): a median of 7 single-call rounds moved
    # by +-3% from run to run, so it takes up to 41 rounds, still within --point-budget.
    args.repeats = args.repeats if args.repeats is not None else (
        5 if args.quick else 41 if args.batch_sweep else 7)
    args.min_repeats = min(args.min_repeats, args.repeats)
    if args.point_budget is None:
        args.point_budget = 3.0 if args.quick else 10.0 if args.batch_sweep else 60.0
    if args.proj_size and any(args.proj_size >= s[3] for s in sizes):
        parser.error("--proj-size must be smaller than every H in the grid")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    timer = Timer(device)
    t_start = time.perf_counter()

    print(f"CPU: {_cpu_name()}, ATen capability {torch.backends.cpu.get_cpu_capability()}, "
          f"CPU GEMM mode {lstm_fused.cpu_gemm.get_mode()}", flush=True)
    print(f"benchmarks/bench.py: torch {torch.__version__}, device {args.device}, threads "
          f"{torch.get_num_threads()}, dtype {str(args.dtype).replace('torch.', '')}, "
          f"{len(sizes)} size(s) x {len(args.modes)} mode(s)", flush=True)
    peak = measure_gemm_peak(args.headline, args, timer)
    if peak.get("peak_gflops"):
        print(f"GEMM peak {peak['peak_gflops']:.1f} GFLOP/s ({peak['peak_method']}); "
              + ", ".join(f"{k}: {v:.1f}" for k, v in peak["methods_gflops"].items()), flush=True)

    fused_skips = {}
    for variant in args.variants + ([GRU] if "gru" in args.candidates else []):
        reason = probe_variant(variant, device, args.dtype)
        if reason:
            fused_skips[variant] = reason
            print(f"fused {variant}: {reason}", flush=True)

    compiled_cell, compiled_label, compile_info = None, "", {}
    if "compiled" in args.candidates:
        print(f"compiling reference.lstm_cell (backend {args.compile_backend}, dynamic shapes)...",
              flush=True)
        compiled_cell, compiled_label, compile_info = prepare_compiled_cell(
            args.compile_backend, args.ref_variants, device, args.dtype, args.compile_timeout)
        print(f"  {compiled_label}: warm in {compile_info['compile_s']:.1f} s", flush=True)

    rows = []
    for size in sizes:
        _, _, I, H = size
        cands = build_candidates(args, I, H, compiled_cell, compiled_label, fused_skips)
        for mode in args.modes:
            t0 = time.perf_counter()
            point_rows = run_point(args, size, mode, cands, timer, peak.get("peak_gflops"))
            rows.extend(point_rows)
            print(format_table(point_rows) + f"({time.perf_counter() - t0:.1f} s)\n", flush=True)

    cell_rows = (run_cell_latency(args, gru="gru" in args.candidates and GRU not in fused_skips)
                 if args.cell_sizes else [])
    if cell_rows:
        print(format_cell_latency(cell_rows) + "\n", flush=True)
    elapsed = time.perf_counter() - t_start
    summary = format_summary(rows)
    print(summary)
    targets = target_rows(rows, cell_rows)
    print("\n" + format_targets(targets))
    meta = {
        "torch": torch.__version__, "lstm_fused": lstm_fused.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_gemm_mode": lstm_fused.cpu_gemm.get_mode(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": args.device, "dtype": str(args.dtype).replace("torch.", ""),
        "grid": "custom" if args.sizes else ("quick" if args.quick else "full" if args.full
                                             else "batch-sweep" if args.batch_sweep
                                             else "default"),
        "sizes": sizes, "modes": args.modes, "warmup": args.warmup, "repeats": args.repeats,
        "point_budget_s": args.point_budget, "proj_size": args.proj_size,
        "input_grad": args.input_grad,
        "headline": args.headline, "gemm_peak": peak, "compile": compile_info,
        "fused_skipped": fused_skips, "elapsed_s": elapsed,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": ("ratio_vs_nn = median over rounds of (candidate time / its baseline's time in "
                  "the same round), the baseline nn.LSTM (nn.GRU for the GRU rows, nn.GRUCell for "
                  "the GRU cells; the row's 'baseline'); gflops = GEMM FLOPs / median time "
                  "(fwd+bwd = 3x forward FLOPs)"),
    }
    meta["gemm_choices"] = [c._replace(dtype=str(c.dtype))._asdict()
                            for c in lstm_fused.cpu_gemm.choices()]
    result = {"meta": meta, "results": rows, "cell_latency": cell_rows, "targets": targets}
    json_path = os.path.join(args.out, "bench.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    png_path = os.path.join(args.out, "bench.png")
    plot(rows, png_path, f"lstm_fused vs torch.nn.LSTM / nn.GRU - {meta['cpu']}, "
                         f"{meta['threads']} threads, {meta['dtype']}, torch {meta['torch']}")
    print(f"\nwrote {json_path}, {png_path}")
    if args.batch_sweep:
        table = format_sweep(rows, lstm_fused.cpu_gemm.choices(), meta)
        result["sweep_table"] = table
        md_path = os.path.join(args.out, "batch-sweep.md")
        with open(md_path, "w") as f:
            f.write(table + "\n")
        sweep_png = args.sweep_plot or os.path.join(args.out, "batch-sweep.png")
        plot_sweep(rows, sweep_png, f"lstm_fused vs torch.nn.LSTM by batch size - {meta['cpu']}, "
                                    f"{meta['threads']} threads, {meta['dtype']}")
        print("\n" + table + f"\n\nwrote {md_path}, {sweep_png}")
    if args.profile:
        print(f"wrote {write_profile(args, args.out)}")
    print(f"total {elapsed:.1f} s")
    return result


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
