"""A short stress of the CPU kernels for the sanitizer build (`make test-asan`): every LSTM variant
and the GRU, every dtype and hidden size around the SIMD widths (H = w - 1, w, w + 1 for w = 4, 8, 16 lanes: the
float/double registers of AVX2 and AVX-512), padded and packed input, on several threads, forward
and backward of a layer and of a cell, each checked against the float64 reference.

    python tests/asan/stress.py [--threads N]

Exits non-zero on a mismatch; a memory error aborts the process (ASan).
"""

import argparse
import time

import torch

import lstm_fused
from lstm_fused import reference

# (peephole, coupled) of the LSTM, and "gru".
VARIANTS = [(None, False), ("diagonal", False), ("full", False),
            (None, True), ("diagonal", True), ("full", True), "gru"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HIDDEN = sorted({w + d for w in (4, 8, 16) for d in (-1, 0, 1)})
# Relative to the largest reference value (half types: a few steps of their rounding).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
T, I = 3, 3


def run_outputs(module, x, lengths):
    """Output and the final states (h_n, c_n; the GRU's h_n)."""
    inputs = x
    if lengths is not None:
        inputs = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, states = module(inputs)
    states = (states,) if isinstance(states, torch.Tensor) else tuple(states)
    if lengths is not None:
        out = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
    return [out, *states]


def run(module, x, lengths):
    """Output, the final states (h_n, c_n; the GRU's h_n) and the gradients of the input and every
    parameter."""
    x = x.clone().requires_grad_()
    out, *states = run_outputs(module, x, lengths)
    g = torch.Generator().manual_seed(1)
    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum()
               for t in (out, *states))
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [out, *states, *grads]


def check(actual, expected, what):
    tol = TOL[actual[0].dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = e.abs().max().clamp(min=1.0)
        error = (a.double() - e).abs().max()
        assert error <= tol * scale, f"{what}, result {i}: max error {error:.3g} (scale {scale:.3g})"


def make_layer(variant, hidden, dtype):
    if variant == "gru":
        return lstm_fused.GRU(I, hidden, bidirectional=True, dtype=dtype)
    peephole, coupled = variant
    return lstm_fused.LSTM(I, hidden, peephole=peephole, coupled=coupled, bidirectional=True,
                           dtype=dtype)


def stress_layer(variant, dtype, hidden, packed, batch):
    fused = make_layer(variant, hidden, dtype)
    ref = make_layer(variant, hidden, torch.float64)
    ref.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    ref._layer_fn = reference.gru_layer if variant == "gru" else reference.lstm_layer
    x = torch.randn(T, batch, I).to(dtype)
    lengths = torch.randint(1, T + 1, (batch,)) if packed else None
    if lengths is not None:
        lengths[0] = T
    expected = run(ref, x.double(), lengths)
    what = f"layer {variant} {dtype} H={hidden} {'packed' if packed else 'padded'}"
    check(run(fused, x, lengths), expected, what)
    # Inference projects the input a chunk of steps at a time: here chunks of one step.
    with torch.no_grad(), lstm_fused.cpu_gemm.projection_chunks(batch):
        inference = run_outputs(fused, x, lengths)
    check(inference, expected[:len(inference)], f"{what}, inference in chunks")


def stress_cell(variant, dtype, hidden, batch):
    if variant == "gru":  # the latency op (no_grad) and the layer op on one step (autograd)
        fused = lstm_fused.GRUCell(I, hidden, dtype=dtype)
        x, h = (torch.randn(batch, n, dtype=torch.float64) for n in (I, hidden))
        params = [p.double() for p in fused.parameters()]
        expected = reference.gru_cell(x, h, *params)
        with torch.no_grad():
            check([fused(x.to(dtype), h.to(dtype))], [expected], f"GRU cell step {dtype} H={hidden}")
        check([fused(x.to(dtype), h.to(dtype))], [expected], f"GRU cell {dtype} H={hidden}")
        return
    peephole, coupled = variant
    fused = lstm_fused.LSTMCell(I, hidden, peephole=peephole, coupled=coupled, dtype=dtype)
    x, h, c = (torch.randn(batch, n, dtype=torch.float64) for n in (I, hidden, hidden))
    params = [p.double() if p is not None else None for p in fused._parameters_for("")]
    expected = reference.lstm_cell(x, h, c, *params, peephole=peephole, coupled=coupled)
    got = fused(x.to(dtype), (h.to(dtype), c.to(dtype)))
    check(list(got), list(expected), f"cell {variant} {dtype} H={hidden}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start, count = time.perf_counter(), 0
    for variant in VARIANTS:
        for dtype in DTYPES:
            for hidden in HIDDEN:
                # Enough rows that at::parallel_for splits them over the threads (its grain is
                # 1024 / H rows).
                batch = 1024 // hidden + 1 if dtype == torch.float32 else 5
                if lstm_fused.cpu_gemm.get_mode() == "simd":
                    batch = min(batch, 29)  # the simd path runs up to 32 rows (tiles of 4, 2, 1)
                for packed in (False, True):
                    stress_layer(variant, dtype, hidden, packed, batch)
                stress_cell(variant, dtype, hidden, batch)
                count += 3
    print(f"stress: {count} layer/cell checks, {len(VARIANTS)} variants x {len(DTYPES)} dtypes x "
          f"H in {HIDDEN}, {args.threads} threads, kernels {torch.ops.lstm_fused.cpu_kernel_isa()}, "
          f"GEMM {lstm_fused.cpu_gemm.get_mode()}, "
          f"{time.perf_counter() - start:.1f}s: ok")


if __name__ == "__main__":
    main()
