"""float16 / bfloat16 storage on the CPU: layers and cells against the float32 reference (the
kernels compute in float and cast back), and the weight-gradient reductions accumulating in
float. The same checks on CUDA are in test_cuda.py."""

import pytest
import torch
from conftest import grid, variant_params

import lstm_fused
from lstm_fused import reference
from lstm_fused.ops import ops

HALF_DTYPES = [torch.bfloat16, torch.float16]
# Relative to the largest reference value: a few steps of 8-bit (bf16) / 11-bit (fp16) storage.
HALF_TOL = {torch.bfloat16: 4e-2, torch.float16: 8e-3}


def assert_close_to_float32(actual, expected, dtype, what):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}"
    scale = expected.abs().max().clamp(min=1.0)
    error = (actual.float() - expected).abs().max()
    assert error <= HALF_TOL[dtype] * scale, f"{what}: max error {error:.3g}, scale {scale:.3g}"


def outputs_and_grads(module, x, seed=5):
    out, (h_n, c_n) = module(x)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g).to(t.dtype) for t in (out, h_n, c_n)]
    loss = sum((t.float() * w.float()).sum() for t, w in zip((out, h_n, c_n), weights))
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [out, h_n, c_n, *grads]


@variant_params
@grid(dtype=HALF_DTYPES, bidirectional=[False, True], proj=[0, 3])
def test_half_layer_matches_float32_reference(variant, dtype, bidirectional, proj):
    peephole, coupled = variant
    torch.manual_seed(0)
    kwargs = {"num_layers": 2, "bidirectional": bidirectional, "proj_size": proj,
              "peephole": peephole, "coupled": coupled}
    half = lstm_fused.LSTM(6, 8, dtype=dtype, **kwargs)
    ref = lstm_fused.LSTM(6, 8, dtype=torch.float32, **kwargs)
    ref._layer_fn = reference.lstm_layer
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(7, 3, 6).to(dtype)
    got = outputs_and_grads(half, x.clone().requires_grad_())
    expected = outputs_and_grads(ref, x.float().requires_grad_())
    names = ["output", "h_n", "c_n", "grad input"] + [n for n, _ in half.named_parameters()]
    for a, b, name in zip(got, expected, names):
        assert_close_to_float32(a, b, dtype, name)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_packed_layer_matches_float32_reference(dtype):
    torch.manual_seed(1)
    half = lstm_fused.LSTM(4, 6, peephole="diagonal", bidirectional=True, dtype=dtype)
    ref = lstm_fused.LSTM(4, 6, peephole="diagonal", bidirectional=True)
    ref._layer_fn = reference.lstm_layer
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(5, 3, 4).to(dtype)

    def run(module, inputs):
        packed = torch.nn.utils.rnn.pack_padded_sequence(inputs, lengths, enforce_sorted=False)
        out, (h_n, c_n) = module(packed)
        return [out.data, h_n, c_n]

    for a, b, name in zip(run(half, x), run(ref, x.float()), ["output", "h_n", "c_n"]):
        assert_close_to_float32(a, b, dtype, name)


@variant_params
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_cell_matches_float32_reference(variant, dtype):
    peephole, coupled = variant
    torch.manual_seed(2)
    half = lstm_fused.LSTMCell(5, 16, peephole=peephole, coupled=coupled, dtype=dtype)
    x, h, c = torch.randn(4, 5), torch.randn(4, 16), torch.randn(4, 16)
    params = [p.float() if p is not None else None for p in half._parameters_for("")]
    expected = reference.lstm_cell(x, h, c, *params, peephole=peephole, coupled=coupled)
    got = half(x.to(dtype), (h.to(dtype), c.to(dtype)))
    for a, b, name in zip(got, expected, ("h", "c")):
        assert_close_to_float32(a, b, dtype, name)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_diagonal_peephole_gradient_accumulates_in_float(dtype):
    """grad_weight_ch sums dz * c over every row. Computed in float and rounded once it is within
    one unit in the last place of the exact sum; multiplying in half precision first (rounding
    every product) is off by tens of units over 4096 rows."""
    g = torch.Generator().manual_seed(0)
    B, H = 4096, 64
    gates = torch.randn(B, 4 * H, generator=g).to(dtype)
    c_prev = torch.randn(B, H, generator=g).to(dtype)
    weight_ch = (torch.randn(3, H, generator=g) * 0.5).to(dtype)
    _, c, gates_out = ops.cell_forward(gates, c_prev, weight_ch, "diagonal", False)
    grad_h = torch.randn(B, H, generator=g).to(dtype)
    grad_z, _, grad_weight_ch = ops.cell_backward(grad_h, None, gates_out, c_prev, c, weight_ch,
                                                  "diagonal", False)
    dz = grad_z.double()
    exact = torch.cat([(dz[:, :2 * H].view(B, 2, H) * c_prev.double().unsqueeze(1)).sum(0),
                       (dz[:, 3 * H:] * c.double()).sum(0, keepdim=True)])
    relative = ((grad_weight_ch.double() - exact).abs() / exact.abs()).max()
    assert relative <= torch.finfo(dtype).eps, f"{relative / torch.finfo(dtype).eps:.1f} ulp"
