"""lstm_fused: fused peephole and coupled-gate (CIFG) LSTMs, and GRUs, for PyTorch, on CPU
and CUDA.

    import lstm_fused
    lstm = lstm_fused.LSTM(input_size, hidden_size, peephole="diagonal", coupled=True)
    output, (h_n, c_n) = lstm(x)
"""

from . import cpu_gemm, functional, ops, reference
from .modules import (
    GRU,
    LSTM,
    CoupledLSTM,
    CoupledLSTMCell,
    GRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LSTMCell,
    PeepholeLSTM,
    PeepholeLSTMCell,
)

__all__ = [
    "GRU",
    "LSTM",
    "CoupledLSTM",
    "CoupledLSTMCell",
    "GRUCell",
    "LSTMCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "PeepholeLSTM",
    "PeepholeLSTMCell",
    "cpu_gemm",
    "functional",
    "ops",
    "reference",
]
__version__ = "0.1.0"


def __getattr__(name):
    # lstm_fused.onnx imports onnx and onnxscript: loaded on first use, not by `import lstm_fused`.
    if name == "onnx":
        import importlib

        return importlib.import_module(".onnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
