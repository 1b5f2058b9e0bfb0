"""Functional form of the fused ops, with the same signatures as their plain-PyTorch twins in
`lstm_fused.reference` (which document the math equation by equation).

Shapes: B batch, I input size, H hidden size, R projection size (H without projection),
G gate blocks (4, or 3 when coupled), P peephole blocks (3, or 2 when coupled).

`lstm_cell` / `lstm_layer` validate their arguments (lstm_fused._checks) and run the fused ops;
`fused_cell` / `fused_layer` only run them, for callers that have validated already (the
modules validate their own arguments once, as torch.nn.LSTM does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (
    check_cell_args,
    check_clips,
    check_layer_args,
    check_layer_norm_eps,
    check_weight_ln,
    normalize_peephole,
)
from .ops import ops


def lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
              weight_ch: Tensor | None = None, weight_hr: Tensor | None = None, *,
              peephole=None, coupled: bool = False, cell_clip=None,
              proj_clip=None, weight_ln: Tensor | None = None,
              layer_norm_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """One fused time step. input [B, I], hx [B, R], cx [B, H] -> (h [B, R], c [B, H]).

    The two GEMMs run as torch ops; activations, peepholes, the cell update and the output
    gate run as ONE fused kernel (`torch.ops.lstm_fused.cell_forward`). `cell_clip` clips c to
    [-cell_clip, cell_clip] after the update, `proj_clip` the projected h (None or 0: off;
    TensorFlow LSTMCell's options). `weight_ln` [G, H] (γ) normalises each gate over its H
    units before its activation, with the biases added after the norm (docs/layer-norm.md);
    `layer_norm_eps` the norm's epsilon. Each bad argument is named in the error (the twin,
    `lstm_fused.reference.lstm_cell`, rejects the same).
    """
    peephole = normalize_peephole(peephole)
    check_cell_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                    peephole, coupled)
    cell_clip, proj_clip = check_clips(cell_clip, proj_clip, weight_hr is not None)
    check_weight_ln(weight_ln, input, weight_ih, bool(coupled))
    layer_norm_eps = check_layer_norm_eps(layer_norm_eps)
    return fused_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                      weight_hr, peephole=peephole, coupled=coupled, cell_clip=cell_clip,
                      proj_clip=proj_clip, weight_ln=weight_ln, layer_norm_eps=layer_norm_eps)


def fused_cell(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Tensor | None, bias_hh: Tensor | None, weight_ch: Tensor | None,
               weight_hr: Tensor | None, *, peephole: str | None,
               coupled: bool, cell_clip: float = 0.0,
               proj_clip: float = 0.0, weight_ln: Tensor | None = None,
               layer_norm_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """`lstm_cell` without the argument checks; `peephole` in canonical form (None,
    "diagonal" or "full"), the clips floats (0.0 = off)."""
    if weight_ln is not None:
        # The norm reduces over each gate's H units of a row, which the layer op's row kernels
        # do: one step of it is the cell.
        output, state = fused_layer(input.unsqueeze(0), hx, cx, weight_ih, weight_hh, bias_ih,
                                    bias_hh, weight_ch, weight_hr, peephole=peephole,
                                    coupled=coupled, reverse=False, batch_sizes=None,
                                    cell_clip=cell_clip, proj_clip=proj_clip,
                                    weight_ln=weight_ln, layer_norm_eps=layer_norm_eps)
        return output[0], state[1]
    gates = F.linear(input, weight_ih, bias_ih) + F.linear(hx, weight_hh, bias_hh)
    h, c, _ = ops.cell_forward(gates, cx, weight_ch, peephole or "none", bool(coupled),
                               cell_clip)
    if weight_hr is not None:
        h = F.linear(h, weight_hr)
        if proj_clip > 0:
            h = h.clamp(-proj_clip, proj_clip)
    return h, c


def lstm_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
               weight_ch: Tensor | None = None, weight_hr: Tensor | None = None, *,
               peephole=None, coupled: bool = False, reverse: bool = False,
               batch_sizes=None, cell_clip=None,
               proj_clip=None, weight_ln: Tensor | None = None,
               layer_norm_eps: float = 1e-5) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One fused layer in one direction; the time loop runs in C++.

    Padded: input [T, B, I] -> output [T, B, R]. Packed: input [N, I] with `batch_sizes`
    (non-increasing, as in PackedSequence) -> output [N, R]. `reverse` runs from the last step
    to the first. `cell_clip` / `proj_clip`, `weight_ln` / `layer_norm_eps` as in `lstm_cell`.
    Returns (output, (h_n [B, R],
    c_n [B, H])). Each bad argument is named in the error (the twin,
    `lstm_fused.reference.lstm_layer`, rejects the same).
    """
    peephole = normalize_peephole(peephole)
    sizes = check_layer_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                             weight_hr, peephole, coupled, batch_sizes)
    cell_clip, proj_clip = check_clips(cell_clip, proj_clip, weight_hr is not None)
    check_weight_ln(weight_ln, input, weight_ih, bool(coupled))
    layer_norm_eps = check_layer_norm_eps(layer_norm_eps)
    return fused_layer(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                       weight_hr, peephole=peephole, coupled=coupled, reverse=reverse,
                       batch_sizes=sizes, cell_clip=cell_clip, proj_clip=proj_clip,
                       weight_ln=weight_ln, layer_norm_eps=layer_norm_eps)


def fused_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor | None, bias_hh: Tensor | None, weight_ch: Tensor | None,
                weight_hr: Tensor | None, *, peephole: str | None, coupled: bool,
                reverse: bool, batch_sizes: list[int] | None, cell_clip: float = 0.0,
                proj_clip: float = 0.0, weight_ln: Tensor | None = None,
                layer_norm_eps: float = 1e-5) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`lstm_layer` without the argument checks; `peephole` in canonical form, `batch_sizes` a
    list of ints or None, the clips floats (0.0 = off), layer_norm_eps a float."""
    # Inference (no_grad, inference_mode, or nothing requires grad): nothing saved for backward.
    need_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                  weight_ln))
    layer_norm = () if weight_ln is None else (weight_ln, layer_norm_eps)
    output, h_n, c_n, _, _ = ops.layer_forward(
        input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, batch_sizes,
        bool(reverse), peephole or "none", bool(coupled), need_backward, cell_clip, proj_clip,
        *layer_norm)
    return output, (h_n, c_n)


__all__ = ["fused_cell", "fused_layer", "lstm_cell", "lstm_layer"]
