"""Export a model with lstm_fused layers: to ONNX (standard operators only, run in onnxruntime
without PyTorch) and with torch.export (an ExportedProgram with one fused op per layer).

Run it:  python examples/export.py [--out results/export]
"""

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import lstm_fused


class Tagger(nn.Module):
    """input [B, T, 5] -> per-step scores [B, T, 3], through a bidirectional peephole LSTM."""

    def __init__(self):
        super().__init__()
        self.lstm = lstm_fused.LSTM(5, 16, batch_first=True, bidirectional=True,
                                    peephole="diagonal")
        self.head = nn.Linear(32, 3)

    def forward(self, input):
        out, _ = self.lstm(input)
        return self.head(out)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for model.onnx and model.pt2 (default: a temporary one)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="lstm_fused_export_"))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(4, 10, 5)
    other = torch.randn(3, 7, 5)  # another batch size and length: both stay dynamic
    with torch.no_grad():
        want = model(other)
    errors = {}

    # ONNX: standard LSTM nodes; onnxruntime runs it without torch or lstm_fused.
    import onnxruntime

    lstm_fused.onnx.export(model, (x,), out / "model.onnx")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (got,) = session.run(None, {"input": other.numpy()})
    errors["onnxruntime"] = (torch.from_numpy(got) - want).abs().max().item()

    # torch.export: a dynamic batch and sequence length; saved and loaded back.
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    program = torch.export.export(model, (x,), dynamic_shapes={"input": {0: batch, 1: steps}})
    torch.export.save(program, out / "model.pt2")
    loaded = torch.export.load(out / "model.pt2")
    errors["torch.export"] = (loaded.module()(other) - want).abs().max().item()

    for what, error in errors.items():
        print(f"{what:14s} max |exported - eager| = {error:.2e}")
    print(f"wrote {out / 'model.onnx'} and {out / 'model.pt2'}")
    return errors


if __name__ == "__main__":
    main()
