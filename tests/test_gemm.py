"""The time loops' GEMMs (csrc/gemm.cpp) run through oneDNN's matmul on the CPU for large enough
float32 and bfloat16 GEMMs, through ATen elsewhere; LSTM_FUSED_CPU_GEMM=aten|onednn forces one. Both must give the
reference's results, forward and backward, padded and packed."""

import pytest
import torch
from conftest import assert_close, variant_params
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import reference


def forward_backward(module, x, lengths):
    x = x.clone().requires_grad_()
    inp = pack_padded_sequence(x, lengths) if lengths is not None else x
    out, (h, c) = module(inp)
    if lengths is not None:
        out = pad_packed_sequence(out)[0]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().add(h.square().sum()).add(c.sum()).backward()
    return [out, h, c, x.grad] + [p.grad for p in module.parameters()]


@variant_params
@pytest.mark.parametrize("backend", ["onednn", "aten"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpu_gemm_backends_match_reference(variant, backend, packed, monkeypatch):
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", backend)
    peephole, coupled = variant
    torch.manual_seed(0)
    kwargs = {"num_layers": 2, "bidirectional": True, "proj_size": 3, "peephole": peephole,
              "coupled": coupled}
    fused = lstm_fused.LSTM(5, 7, **kwargs)
    ref = lstm_fused.LSTM(5, 7, **kwargs)
    ref.load_state_dict(fused.state_dict())
    ref._layer_fn = reference.lstm_layer
    x = torch.randn(6, 4, 5)
    lengths = torch.tensor([6, 5, 3, 1]) if packed else None
    for a, b in zip(forward_backward(fused, x, lengths), forward_backward(ref, x, lengths)):
        assert_close(a, b, torch.float32, f"{backend}")


def uses_onednn(module, x):
    with torch.profiler.profile() as prof:
        module(x)[0].sum().backward()
    return "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_gemm_choice_follows_size_and_environment(monkeypatch):
    """Automatic: oneDNN for >= 1024 output features and >= 256 inputs (H = 256: W_ih, W_hh are
    [1024, 256]), ATen below; LSTM_FUSED_CPU_GEMM forces either."""
    big, big_x = lstm_fused.LSTM(256, 256), torch.randn(2, 3, 256)
    small, small_x = lstm_fused.LSTM(4, 8), torch.randn(2, 3, 4)
    monkeypatch.delenv("LSTM_FUSED_CPU_GEMM", raising=False)
    assert uses_onednn(big, big_x)
    assert not uses_onednn(small, small_x)
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", "aten")
    assert not uses_onednn(big, big_x)
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", "onednn")
    assert uses_onednn(small, small_x)
    assert not uses_onednn(small.double(), small_x.double())  # oneDNN has no float64 matmul
