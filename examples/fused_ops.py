"""Use the fused ops directly, without the modules: your own weights, your own loop.

Run it:  python examples/fused_ops.py

- `lstm_fused.functional.lstm_layer`: one layer, one direction, the time loop in C++ (one op);
- `lstm_fused.functional.lstm_cell`: one step (the GEMMs as torch ops, one fused kernel);
- `torch.ops.lstm_fused.*`: the registered operators themselves (schemas: lstm_fused/ops.py);
- each checked against `lstm_fused.reference`, the plain-PyTorch twin, and the layer run under
  `torch.compile(fullgraph=True)` (the ops have fake kernels, so they compile without breaks).
"""

import torch

import lstm_fused
from lstm_fused import functional, reference


def weights(I, H, coupled, peephole, generator):
    G = 3 if coupled else 4
    P = 2 if coupled else 3
    w_ih = torch.randn(G * H, I, generator=generator) * 0.3
    w_hh = torch.randn(G * H, H, generator=generator) * 0.3
    b_ih, b_hh = torch.zeros(G * H), torch.zeros(G * H)
    weight_ch = torch.randn(P, H, generator=generator) * 0.3 if peephole == "diagonal" else None
    return w_ih, w_hh, b_ih, b_hh, weight_ch


def main(argv=None) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    T, B, I, H = 12, 4, 8, 16
    peephole, coupled = "diagonal", True
    w_ih, w_hh, b_ih, b_hh, weight_ch = weights(I, H, coupled, peephole, g)
    x = torch.randn(T, B, I, generator=g)
    h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
    errors = {}

    # A whole layer in one op, and its twin.
    out, (h_n, c_n) = functional.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_ch,
                                            peephole=peephole, coupled=coupled)
    want, (want_h, want_c) = reference.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_ch,
                                                  peephole=peephole, coupled=coupled)
    errors["lstm_layer"] = max((a - b).abs().max().item()
                               for a, b in ((out, want), (h_n, want_h), (c_n, want_c)))

    # Your own loop over the fused cell.
    h, c = h0, c0
    for t in range(T):
        h, c = functional.lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh, weight_ch,
                                    peephole=peephole, coupled=coupled)
    errors["lstm_cell loop"] = (h - want[-1]).abs().max().item()

    # The registered operator itself (what torch.export and ONNX see).
    op_out, *_ = torch.ops.lstm_fused.layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_ch,
                                                     None, None, False, peephole, coupled)
    errors["torch.ops.lstm_fused.layer_forward"] = (op_out - want).abs().max().item()

    # One graph, no breaks.
    def layer(x):
        return functional.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_ch,
                                     peephole=peephole, coupled=coupled)[0]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    errors["torch.compile(fullgraph=True)"] = (compiled(x) - want).abs().max().item()

    # Gradients flow through the ops (autograd formulas registered in lstm_fused/ops.py).
    x.requires_grad_(True)
    functional.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_ch, peephole=peephole,
                          coupled=coupled)[0].sum().backward()
    grad = x.grad
    x.grad = None
    reference.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_ch, peephole=peephole,
                         coupled=coupled)[0].sum().backward()
    errors["gradient of input"] = (grad - x.grad).abs().max().item()

    for what, error in errors.items():
        print(f"{what:38s} max |fused - reference| = {error:.2e}")
    print(f"lstm_fused {lstm_fused.__version__}")
    return errors


if __name__ == "__main__":
    main()
