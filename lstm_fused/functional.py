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
    check_gru_layer_args,
    check_gru_layer_zoneout,
    check_layer_args,
    check_layer_norm_eps,
    check_layer_zoneout,
    check_weight_ln,
    check_zoneout_pair,
    normalize_peephole,
)
from .ops import ops


def lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
              weight_ch: Tensor | None = None, weight_hr: Tensor | None = None, *,
              peephole=None, coupled: bool = False, cell_clip=None,
              proj_clip=None, zoneout=None, weight_ln: Tensor | None = None,
              layer_norm_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """One fused time step. input [B, I], hx [B, R], cx [B, H] -> (h [B, R], c [B, H]).

    The two GEMMs run as torch ops; activations, peepholes, the cell update and the output
    gate run as ONE fused kernel (`torch.ops.lstm_fused.cell_forward`). `cell_clip` clips c to
    [-cell_clip, cell_clip] after the update, `proj_clip` the projected h (None or 0: off;
    TensorFlow LSTMCell's options). `zoneout`: None (off) or (keep_h, keep_c), each a rate in
    [0, 1) (the eval expectation) or a 0/1 mask tensor shaped like hx / cx (training; 1 keeps
    the previous value): h = keep_h hx + (1 - keep_h) h~, c = keep_c cx + (1 - keep_c) c~, after
    the clips (docs/regularizers.md). `weight_ln` [G, H] (γ) normalises each gate over its H
    units before its activation, with the biases added after the norm (docs/layer-norm.md);
    `layer_norm_eps` the norm's epsilon; with zoneout too, the norm's c and h are the computed
    (unzoned) ones of the step, the zoned ones the states.
    Each bad argument is named in the error (the twin,
    `lstm_fused.reference.lstm_cell`, rejects the same).
    """
    peephole = normalize_peephole(peephole)
    check_cell_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                    peephole, coupled)
    cell_clip, proj_clip = check_clips(cell_clip, proj_clip, weight_hr is not None)
    zoneout = check_zoneout_pair(zoneout, hx, cx)
    check_weight_ln(weight_ln, input, weight_ih, bool(coupled))
    layer_norm_eps = check_layer_norm_eps(layer_norm_eps)
    return fused_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                      weight_hr, peephole=peephole, coupled=coupled, cell_clip=cell_clip,
                      proj_clip=proj_clip, zoneout=zoneout, weight_ln=weight_ln,
                      layer_norm_eps=layer_norm_eps)


def fused_cell(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Tensor | None, bias_hh: Tensor | None, weight_ch: Tensor | None,
               weight_hr: Tensor | None, *, peephole: str | None,
               coupled: bool, cell_clip: float = 0.0,
               proj_clip: float = 0.0, zoneout=None, weight_ln: Tensor | None = None,
               layer_norm_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """`lstm_cell` without the argument checks; `peephole` in canonical form (None,
    "diagonal" or "full"), the clips floats (0.0 = off), `zoneout` None or checked."""
    if weight_ln is not None:
        # The norm reduces over each gate's H units of a row, which the layer op's row kernels
        # do: one step of it is the cell (zoneout's [B, D] masks become one step's [1, B, D]).
        if zoneout is not None:
            zoneout = tuple(k.unsqueeze(0) if isinstance(k, Tensor) else k for k in zoneout)
        output, state = fused_layer(input.unsqueeze(0), hx, cx, weight_ih, weight_hh, bias_ih,
                                    bias_hh, weight_ch, weight_hr, peephole=peephole,
                                    coupled=coupled, reverse=False, batch_sizes=None,
                                    cell_clip=cell_clip, proj_clip=proj_clip, zoneout=zoneout,
                                    weight_ln=weight_ln, layer_norm_eps=layer_norm_eps)
        return output[0], state[1]
    gates = F.linear(input, weight_ih, bias_ih) + F.linear(hx, weight_hh, bias_hh)
    h, c, _ = ops.cell_forward(gates, cx, weight_ch, peephole or "none", bool(coupled),
                               cell_clip)
    if weight_hr is not None:
        h = F.linear(h, weight_hr)
        if proj_clip > 0:
            h = h.clamp(-proj_clip, proj_clip)
    if zoneout is not None:
        h, c = zoneout_mix(hx, h, zoneout[0]), zoneout_mix(cx, c, zoneout[1])
    return h, c


def zoneout_mix(previous: Tensor, new: Tensor, keep) -> Tensor:
    """Zoneout of one state [B, D]: keep * previous + (1 - keep) * new, with `keep` a 0/1 mask
    [B, D] (training: 1 keeps the previous value, exactly) or a rate (eval: the expectation).
    One lerp, so autograd passes keep * grad to `previous` and (1 - keep) * grad to `new`. In
    the dtype of `new` (the cell's compute dtype, e.g. under autocast)."""
    if isinstance(keep, Tensor):
        keep = keep.to(new.dtype)
    elif keep == 0:
        return new
    return torch.lerp(new, previous.to(new.dtype), keep)


def keep_mask(like: Tensor, size, p: float) -> Tensor:
    """Zoneout's keep mask: a 0/1 tensor [*size] of like's dtype on like's device, each element
    1 with probability p (independently). One int64 key is drawn from torch's generator of that
    device (`torch.manual_seed` makes it reproducible; on the GPU it stays on the device); the
    mask is computed from it by the `keep_mask` op's Philox4x32-10 kernel (csrc/lstm_math.h),
    element i from (key, i) alone: the same mask on the CPU (every build, any thread count) and
    on the GPU. `lstm_fused.reference.keep_mask` computes the same in plain Python."""
    key = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=like.device)
    return ops.keep_mask(key, [int(n) for n in size], float(p), like.dtype)


def lstm_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
               weight_ch: Tensor | None = None, weight_hr: Tensor | None = None, *,
               peephole=None, coupled: bool = False, reverse: bool = False,
               batch_sizes=None, cell_clip=None,
               proj_clip=None, zoneout=None, weight_ln: Tensor | None = None,
               layer_norm_eps: float = 1e-5) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One fused layer in one direction; the time loop runs in C++.

    Padded: input [T, B, I] -> output [T, B, R]. Packed: input [N, I] with `batch_sizes`
    (non-increasing, as in PackedSequence) -> output [N, R]. `reverse` runs from the last step
    to the first. `cell_clip` / `proj_clip`, `weight_ln` / `layer_norm_eps` as in `lstm_cell`.
    `zoneout`: None (off) or (keep_h, keep_c), each a rate in [0, 1) (eval: the expectation) or
    a 0/1 mask [T, B, R] / [T, B, H] (training; packed input too: step t uses rows
    :batch_sizes[t] of mask[t]), applied in the fused time loop. Returns (output, (h_n [B, R],
    c_n [B, H])). Each bad argument is named in the error (the twin,
    `lstm_fused.reference.lstm_layer`, rejects the same).
    """
    peephole = normalize_peephole(peephole)
    sizes = check_layer_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                             weight_hr, peephole, coupled, batch_sizes)
    cell_clip, proj_clip = check_clips(cell_clip, proj_clip, weight_hr is not None)
    zoneout = check_layer_zoneout(zoneout, hx, cx,
                                  len(sizes) if sizes is not None else input.shape[0])
    check_weight_ln(weight_ln, input, weight_ih, bool(coupled))
    layer_norm_eps = check_layer_norm_eps(layer_norm_eps)
    return fused_layer(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                       weight_hr, peephole=peephole, coupled=coupled, reverse=reverse,
                       batch_sizes=sizes, cell_clip=cell_clip, proj_clip=proj_clip,
                       zoneout=zoneout, weight_ln=weight_ln, layer_norm_eps=layer_norm_eps)


def fused_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor | None, bias_hh: Tensor | None, weight_ch: Tensor | None,
                weight_hr: Tensor | None, *, peephole: str | None, coupled: bool,
                reverse: bool, batch_sizes: list[int] | None, cell_clip: float = 0.0,
                proj_clip: float = 0.0, zoneout=None, weight_ln: Tensor | None = None,
                layer_norm_eps: float = 1e-5) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`lstm_layer` without the argument checks; `peephole` in canonical form, `batch_sizes` a
    list of ints or None, the clips floats (0.0 = off), `zoneout` None or checked,
    layer_norm_eps a float."""
    # Inference (no_grad, inference_mode, or nothing requires grad): nothing saved for backward.
    need_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                  weight_ln))
    keep_h, keep_c = (None, None) if zoneout is None else (
        layer_keep(zoneout[0], input, hx.shape[-1], batch_sizes),
        layer_keep(zoneout[1], input, cx.shape[-1], batch_sizes))
    layer_norm = () if weight_ln is None else (weight_ln, layer_norm_eps)
    output, h_n, c_n, _, _ = ops.layer_forward(
        input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, batch_sizes,
        bool(reverse), peephole or "none", bool(coupled), need_backward, cell_clip, proj_clip,
        keep_h, keep_c, *layer_norm)
    return output, (h_n, c_n)


def layer_keep(keep, input: Tensor, width: int, batch_sizes: list[int] | None) -> Tensor | None:
    """One zoneout keep value of `fused_layer` as the layer op takes it, rows like input's
    ([T, B, D] padded, [N, D] packed): a rate as one row of rates expanded over all rows (no
    memory, no randomness; None for 0), a [T, B, D] mask as it is (padded) or its active rows,
    step by step (packed: rows :batch_sizes[t] of mask[t])."""
    if not isinstance(keep, Tensor):
        if keep == 0:
            return None
        return input.new_full((width,), keep).expand(*input.shape[:-1], width)
    if batch_sizes is None:
        return keep
    steps, batch = keep.shape[0], keep.shape[1]
    # The packed rows' indices in [T * B], built from the (host) batch sizes: no data-dependent
    # shape, so torch.compile traces it as a constant.
    rows = torch.tensor([t * batch + b for t, n in enumerate(batch_sizes) for b in range(n)],
                        dtype=torch.long, device=keep.device)
    return keep.reshape(steps * batch, width).index_select(0, rows)


def gru_layer(input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None, *,
              reverse: bool = False, batch_sizes=None, zoneout=None) -> tuple[Tensor, Tensor]:
    """One fused GRU layer in one direction (nn.GRU's equations and gate order r, z, n; the
    time loop runs in C++).

    Padded: input [T, B, I] -> output [T, B, H]. Packed: input [N, I] with `batch_sizes`
    (non-increasing, as in PackedSequence) -> output [N, H]. hx [B, H]; weight_ih [3H, I],
    weight_hh [3H, H], bias_ih / bias_hh [3H] or None. `reverse` runs from the last step to the
    first. `zoneout`: None (off), a keep rate in [0, 1) (eval: the expectation) or a 0/1 mask
    [T, B, H] (training; packed input too: step t uses rows :batch_sizes[t] of mask[t]),
    h_t = m h_{t-1} + (1 - m) h~_t in the fused time loop. Returns (output, h_n [B, H]). Each
    bad argument is named in the error (the twin, `lstm_fused.reference.gru_layer`, computes
    the same equations in plain PyTorch).
    """
    sizes = check_gru_layer_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes)
    zoneout = check_gru_layer_zoneout(zoneout, hx,
                                      len(sizes) if sizes is not None else input.shape[0])
    return fused_gru_layer(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reverse=reverse,
                           batch_sizes=sizes, zoneout=zoneout)


def fused_gru_layer(input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                    bias_ih: Tensor | None, bias_hh: Tensor | None, *, reverse: bool,
                    batch_sizes: list[int] | None, zoneout=None) -> tuple[Tensor, Tensor]:
    """`gru_layer` without the argument checks; `batch_sizes` a list of ints or None, `zoneout`
    None or checked."""
    need_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (input, hx, weight_ih, weight_hh, bias_ih, bias_hh))
    keep_h = None if zoneout is None else layer_keep(zoneout, input, hx.shape[-1], batch_sizes)
    output, h_n, _ = ops.gru_layer_forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                           batch_sizes, bool(reverse), need_backward, keep_h)
    return output, h_n


__all__ = ["fused_cell", "fused_gru_layer", "fused_layer", "gru_layer", "lstm_cell",
           "lstm_layer"]
