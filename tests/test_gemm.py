"""The time loops' GEMMs (csrc/gemm.cpp) run through oneDNN's matmul on the CPU for float32 and
bfloat16, through ATen elsewhere; LSTM_FUSED_CPU_GEMM=aten forces ATen. Both must give the
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


def test_onednn_gemm_is_used_for_float32_on_cpu():
    """The profile of a float32 layer shows oneDNN's matmul, and only ATen's when forced."""
    m = lstm_fused.LSTM(4, 8)
    x = torch.randn(3, 2, 4)

    def gemm_ops():
        with torch.profiler.profile() as prof:
            m(x)[0].sum().backward()
        return {e.key for e in prof.key_averages()}

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch was built without oneDNN")
    assert "mkldnn::_linear_pointwise" in gemm_ops()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTM_FUSED_CPU_GEMM", "aten")
        assert "mkldnn::_linear_pointwise" not in gemm_ops()
