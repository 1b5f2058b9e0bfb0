"""Functional form of the fused ops, with the same signatures as their plain-PyTorch twins in
`lstm_fused.reference` (which document the math equation by equation).

Shapes: B batch, I input size, H hidden size, R projection size (H without projection),
G gate blocks (4, or 3 when coupled), P peephole blocks (3, or 2 when coupled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import ops
from .reference import normalize_peephole


def _peephole_arg(peephole) -> str:
    return normalize_peephole(peephole) or "none"


def lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
              weight_ch: Tensor | None = None, weight_hr: Tensor | None = None, *,
              peephole=None, coupled: bool = False) -> tuple[Tensor, Tensor]:
    """One fused time step. input [B, I], hx [B, R], cx [B, H] -> (h [B, R], c [B, H]).

    The two GEMMs run as torch ops; activations, peepholes, the cell update and the output
    gate run as ONE fused kernel (`torch.ops.lstm_fused.cell_forward`).
    """
    gates = F.linear(input, weight_ih, bias_ih) + F.linear(hx, weight_hh, bias_hh)
    h, c, _ = ops.cell_forward(gates, cx, weight_ch, _peephole_arg(peephole), coupled)
    if weight_hr is not None:
        h = F.linear(h, weight_hr)
    return h, c


def _batch_sizes_list(batch_sizes) -> list[int] | None:
    if batch_sizes is None:
        return None
    if isinstance(batch_sizes, Tensor):
        return batch_sizes.tolist()
    return [int(b) for b in batch_sizes]


def lstm_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
               weight_ch: Tensor | None = None, weight_hr: Tensor | None = None, *,
               peephole=None, coupled: bool = False, reverse: bool = False,
               batch_sizes=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One fused layer in one direction; the time loop runs in C++.

    Padded: input [T, B, I] -> output [T, B, R]. Packed: input [N, I] with `batch_sizes`
    (non-increasing, as in PackedSequence) -> output [N, R]. `reverse` runs from the last step
    to the first. Returns (output, (h_n [B, R], c_n [B, H])).
    """
    output, h_n, c_n, _, _ = ops.layer_forward(
        input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
        _batch_sizes_list(batch_sizes), reverse, _peephole_arg(peephole), coupled)
    return output, (h_n, c_n)


__all__ = ["lstm_cell", "lstm_layer"]
