"""Which GEMM the fused layers' time loops use on the CPU (csrc/gemm.cpp).

Paths: "aten" (ATen's addmm: MKL or OpenBLAS), "onednn" (oneDNN's matmul, the weight reordered once
per call), "packed" (MKL's packed GEMM, the weight packed once per call; float32, where torch has
MKL), "simd" (our own kernels, float32: the time loops pack the weight once per call into panels and
compute outer-product register tiles of 8 rows by 48 columns, each thread's share of the weight
staying in its core's cache; the LSTMCell step's one-off GEMMs of up to 32 rows take dot products
over the weight as it is stored; in a layer's forward and the LSTMCell step fused with the
pointwise step; the backward's weight gradients dz^T x and input gradient dz W_ih sum in blocks,
reading x's and W_ih's rows as stored, as the panels of a packed weight). By default ("auto") the
first GEMM of each shape (rows, N, K), dtype and thread count in the process times every path this
CPU supports for that dtype and keeps the fastest, as `torch.backends.cudnn.benchmark` does; the
choices are cached (`choices()`).

The measurement is made hard to fool: the candidates' trials are interleaved (at least 7 rounds,
each in a rotated order) and each path's median decides, so one disturbed trial cannot move the
choice; a path other than "aten" (the default) is taken only when its median is 5 % faster; and a
per-step GEMM is timed every 16th step afterwards: 8 samples in a row over 3x its trial's median
mark the choice stale, and the next layer call of that shape measures again (`Choice.measurements`
counts the measurements, at most 4 per shape). A forced path is never measured. A run is reproducible
bit for bit with a fixed path: set `LSTM_FUSED_CPU_GEMM=aten|onednn|packed|simd` (read once, at the first
GEMM) or call `set_mode()`. A forced path that does not support a dtype (oneDNN without bf16
support, packed or simd for anything but float32, packed for a one-off GEMM)
falls back to "aten" there.

    import lstm_fused
    lstm_fused.cpu_gemm.set_mode("packed")
    with lstm_fused.cpu_gemm.mode("aten"):
        ...
    lstm_fused.cpu_gemm.choices()   # [Choice(repeated=True, rows=64, n=1024, k=256, ...), ...]

A layer's time loop on the CPU computes its input projection a chunk of steps at a time, so that the
steps read it from the cache: `projection_chunk_rows()` says how many rows a chunk holds (half of the
threads' L2 caches), `projection_chunks(n)` / `set_projection_chunk_rows(n)` force it.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from . import _C

MODES = ("auto", "aten", "onednn", "packed", "simd")


class Choice(NamedTuple):
    """One cached measurement: the GEMM out[rows, n] (+)= x[rows, k] weight[n, k]^T run once per
    call (`repeated` False) or every step with a prepared weight, into rows `out_stride` apart (n,
    or more for a column block of a wider tensor), the median seconds per GEMM of every path
    tried, and how many times it was measured (1, plus one per re-check after a slow streak).
    `transposed`: the operands come as x^T and weight^T (the weight gradients a^T b, summed over
    the k = T*B rows of a [k, rows] and b [k, n]; "aten" and "simd" are measured);
    `weight_transposed`: the weight is a transposed view (the input gradient dz W_ih: "simd" reads
    W_ih's rows as they are stored); `column_groups`: the weight's columns in groups, one per gate,
    that the fused step splits between the threads by hidden units (the recurrent weight, and the
    input weight of an inference loop): "simd" is the default there, left only for a 5% gain,
    since only it computes each thread's units where that thread's step reads them next and adds
    the bias in its tiles, which a trial of the GEMM alone does not see; `weight_as_stored`: a
    repeated GEMM of at most 4 rows a step and 32 in all over the call (a short sequence at a small
    batch: streaming), where "simd" takes dot products over the weight as stored instead of
    packing it at every call."""

    repeated: bool
    rows: int
    n: int
    k: int
    dtype: torch.dtype
    threads: int
    accumulate: bool
    out_stride: int
    path: str
    seconds: dict
    measurements: int
    transposed: bool
    weight_transposed: bool
    column_groups: int
    weight_as_stored: bool


def get_mode() -> str:
    """"auto" (measure) or the forced path."""
    return _C.cpu_gemm_mode()


def set_mode(mode: str) -> None:
    """Force a path ("aten", "onednn", "packed", "simd") or measure ("auto"); ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"lstm_fused.cpu_gemm: mode must be one of {MODES}, got {mode!r}")
    _C.set_cpu_gemm_mode(mode)


@contextlib.contextmanager
def mode(name: str):
    """Context manager: `set_mode(name)` inside, the previous mode restored after."""
    previous = get_mode()
    set_mode(name)
    try:
        yield
    finally:
        set_mode(previous)


def available(dtype: torch.dtype = torch.float32) -> list[str]:
    """The paths that run GEMMs of `dtype` on this CPU and torch build."""
    return _C.cpu_gemm_paths(str(dtype).replace("torch.", ""))


def choices() -> list[Choice]:
    """The choices measured so far in this process."""
    return [Choice(*c[:4], getattr(torch, c[4]), *c[5:]) for c in _C.cpu_gemm_choices()]


def clear() -> None:
    """Forget the measured choices (the next GEMM of each shape measures again)."""
    _C.clear_cpu_gemm_choices()


def projection_chunk_rows(row_bytes: int = 4096) -> int:
    """Rows per chunk of a layer's input projection on the CPU, for rows of `row_bytes` bytes
    (4 * G * H for float32: 4096 at H=256); the time loop only reads the projection (in training
    the LSTM's and the GRU's kernels write what the backward needs to rows of their own).

    Such a loop computes the projection x_t W_ih^T a chunk of whole steps at a time, into one
    buffer the chunks reuse, by a GEMM whose weight is prepared once, so that each chunk's rows are
    still in the cache when its steps read them; all T*B rows at once are MBs (tens of them at
    large batches) of fresh pages, written back to memory and read again. A chunk is half of what
    the threads' L2 caches hold (the size Linux reads from the CPU, 1 MiB a core where it has
    none; the other half keeps the recurrent weight), at least one step; a projection that fits in
    one chunk is computed at once."""
    return _C.projection_chunk_rows(int(row_bytes))


def set_projection_chunk_rows(rows: int) -> None:
    """Force the rows of a projection chunk (0: from the L2 cache size again). The results do not
    depend on it beyond the GEMM path each chunk shape takes (the same bits with a forced path)."""
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise TypeError(f"lstm_fused.cpu_gemm: rows must be an int, got {type(rows).__name__}")
    _C.set_projection_chunk_rows(rows)


@contextlib.contextmanager
def projection_chunks(rows: int):
    """Context manager: `set_projection_chunk_rows(rows)` inside, the previous setting after."""
    previous = _C.forced_projection_chunk_rows()
    set_projection_chunk_rows(rows)
    try:
        yield
    finally:
        _C.set_projection_chunk_rows(previous)


@contextlib.contextmanager
def _test_times(trials: dict[str, list[float]], run_seconds: float = -1.0):
    """Test only: inside, a trial of path p in round r reports `trials[p][r % len]` seconds
    (paths not named: the clock) and every sampled GEMM after a choice `run_seconds` (if >= 0),
    so the choice's logic can be tested without timing noise."""
    _C._set_cpu_gemm_test_times({p: [float(t) for t in ts] for p, ts in trials.items()},
                                float(run_seconds))
    try:
        yield
    finally:
        _C._set_cpu_gemm_test_times({}, -1.0)


__all__ = [
    "MODES",
    "Choice",
    "available",
    "choices",
    "clear",
    "get_mode",
    "mode",
    "projection_chunk_rows",
    "projection_chunks",
    "set_mode",
    "set_projection_chunk_rows",
]
