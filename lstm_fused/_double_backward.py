"""Double backward of the fused ops: their gradients recomputed with differentiable torch ops.

A backward called while a graph is being built (``autograd.grad(..., create_graph=True)``, as
in gradient penalties, MAML-style meta-learning or ``gradgradcheck``) must return gradients
that can be differentiated again. The fused backward kernels cannot, so in that case (and only
then: the first-order backward never comes here) the op's forward is run again here, from its
saved inputs, as plain torch ops, and differentiated with ``create_graph=True``. The cost of
such a backward is one unfused forward and its backward (the speed of the plain-PyTorch loop);
the second backward then runs through that unfused graph.

The equations are those of docs/design.md ("The math"), written once more on purpose: the reference
twin (lstm_fused.reference) is the tests' oracle and shares no code with the library.

Shapes: B batch, I input, H hidden, R projection (or H), G gate blocks (4, 3 when coupled),
P peephole blocks (3, 2 when coupled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _peephole_term(c: Tensor, weight_ch: Tensor | None, peephole: str, coupled: bool,
                   gate: int) -> Tensor | float:
    """The peephole term of gate 0 (i), 1 (f) or 2 (o) for cell state c [B, H]: w ⊙ c
    (diagonal), c W_ckᵀ (full) or 0."""
    if peephole == "none":
        return 0.0
    k = ((None, 0, 1) if coupled else (0, 1, 2))[gate]  # its row/block of weight_ch
    if peephole == "diagonal":
        return weight_ch[k] * c
    H = c.shape[-1]
    return c @ weight_ch[k * H:(k + 1) * H].T


def cell_pointwise(gates: Tensor, c_prev: Tensor, weight_ch: Tensor | None, peephole: str,
                   coupled: bool, cell_clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """What ``lstm_fused::cell_forward`` computes: gates [B, G*H] pre-activations in order
    (i, f, g, o) or, coupled, (f, g, o); c_prev [B, H]; weight_ch [P, H] ("diagonal") or
    [P*H, H] ("full") for the peepholes in order (i, f, o) or (f, o); peephole "none",
    "diagonal" or "full"; cell_clip > 0 clips c after the update -> (h [B, H], c [B, H])."""
    blocks = gates.chunk(3 if coupled else 4, dim=-1)
    z_i, (z_f, z_g, z_o) = (None, blocks) if coupled else (blocks[0], blocks[1:])

    def peep(c: Tensor, gate: int) -> Tensor | float:
        return _peephole_term(c, weight_ch, peephole, coupled, gate)

    f = torch.sigmoid(z_f + peep(c_prev, 1))
    i = 1 - f if coupled else torch.sigmoid(z_i + peep(c_prev, 0))
    c = f * c_prev + i * torch.tanh(z_g)
    if cell_clip > 0:
        c = c.clamp(-cell_clip, cell_clip)
    o = torch.sigmoid(z_o + peep(c, 2))
    return o * torch.tanh(c), c


def layer_norm_cell_pointwise(v: Tensor, c_prev: Tensor, weight_ch: Tensor | None,
                              peephole: str, coupled: bool, cell_clip: float,
                              weight_ln: Tensor, shift: Tensor | None,
                              eps: float) -> tuple[Tensor, Tensor]:
    """``cell_pointwise`` with layer norm: v [B, G*H] the pre-norm x W_ihᵀ + h W_hhᵀ (no bias),
    weight_ln [G, H] γ, shift [G*H] (b_ih + b_hh) or None. Each gate k normalises v_k + p_k over
    its H units (p_k its peephole term; the output gate's sees the new c), then γ_k ⊙ · + b_k."""
    G = 3 if coupled else 4
    H = c_prev.shape[-1]
    blocks = v.chunk(G, dim=-1)
    shifts = shift.chunk(G) if shift is not None else (None,) * G
    names = ("f", "g", "o") if coupled else ("i", "f", "g", "o")

    def peep(c: Tensor, gate: int) -> Tensor | float:
        return _peephole_term(c, weight_ch, peephole, coupled, gate)

    def normed(name: str, extra) -> Tensor:
        k = names.index(name)
        return F.layer_norm(blocks[k] + extra, (H,), weight_ln[k], shifts[k], eps)

    f = torch.sigmoid(normed("f", peep(c_prev, 1)))
    i = 1 - f if coupled else torch.sigmoid(normed("i", peep(c_prev, 0)))
    c = f * c_prev + i * torch.tanh(normed("g", 0.0))
    if cell_clip > 0:
        c = c.clamp(-cell_clip, cell_clip)
    o = torch.sigmoid(normed("o", peep(c, 2)))
    return o * torch.tanh(c), c


def layer(input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
          bias_ih: Tensor | None, bias_hh: Tensor | None, weight_ch: Tensor | None,
          weight_hr: Tensor | None, batch_sizes: Sequence[int] | None, reverse: bool,
          peephole: str, coupled: bool, cell_clip: float = 0.0,
          proj_clip: float = 0.0, zoneout_h: Tensor | None = None,
          zoneout_c: Tensor | None = None, weight_ln: Tensor | None = None,
          layer_norm_eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """What ``lstm_fused::layer_forward`` computes (its first three outputs): input [T, B, I]
    (or packed [N, I] with batch_sizes), h0 [B, R], c0 [B, H] -> (output [T, B, R] or [N, R],
    h_n [B, R], c_n [B, H]). At step t only the first batch_sizes[t] rows are active; the
    others keep their state. cell_clip / proj_clip > 0 clip c_t and the projected h_t.
    zoneout_h [..., R] / zoneout_c [..., H] (rows like input's; None = off): the keep values m,
    h_t = m h_{t-1} + (1 - m) h~_t after the clips, likewise c; the gates saw the computed c~_t.
    With weight_ln the gates are layer-normalised (layer_norm_cell_pointwise)."""
    B = h0.shape[0]
    packed = batch_sizes is not None
    sizes = list(batch_sizes) if packed else [B] * input.shape[0]
    layer_norm = weight_ln is not None
    shift = None
    if layer_norm:  # the biases come after the norm
        present = [b for b in (bias_ih, bias_hh) if b is not None]
        shift = sum(present[1:], present[0]) if present else None
        bias_ih = bias_hh = None
    projected = F.linear(input, weight_ih, bias_ih)  # every step's input projection at once
    steps = projected.split(sizes, 0) if packed else projected.unbind(0)

    def per_step(keep: Tensor | None) -> list[Tensor | None]:
        if keep is None:
            return [None] * len(sizes)
        return list(keep.split(sizes, 0) if packed else keep.unbind(0))

    keeps_h, keeps_c = per_step(zoneout_h), per_step(zoneout_c)
    h, c = h0, c0
    outputs: list[Tensor] = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n = sizes[t]
        gates = steps[t] + F.linear(h[:n], weight_hh, bias_hh)
        if layer_norm:
            h_t, c_t = layer_norm_cell_pointwise(gates, c[:n], weight_ch, peephole, coupled,
                                                 cell_clip, weight_ln, shift, layer_norm_eps)
        else:
            h_t, c_t = cell_pointwise(gates, c[:n], weight_ch, peephole, coupled, cell_clip)
        if weight_hr is not None:
            h_t = F.linear(h_t, weight_hr)
            if proj_clip > 0:
                h_t = h_t.clamp(-proj_clip, proj_clip)
        if keeps_h[t] is not None:
            h_t = keeps_h[t] * h[:n] + (1 - keeps_h[t]) * h_t
        if keeps_c[t] is not None:
            c_t = keeps_c[t] * c[:n] + (1 - keeps_c[t]) * c_t
        outputs[t] = h_t
        h, c = torch.cat([h_t, h[n:]]), torch.cat([c_t, c[n:]])
    if not outputs:  # no time step
        return input.new_zeros(*input.shape[:-1], h0.shape[-1]), h, c
    return (torch.cat(outputs) if packed else torch.stack(outputs)), h, c


def gru_layer(input: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None, bias_hh: Tensor | None,
              batch_sizes: Sequence[int] | None, reverse: bool,
              zoneout_h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """What ``lstm_fused::gru_layer_forward`` computes (its first two outputs): input [T, B, I]
    (or packed [N, I] with batch_sizes), h0 [B, H] -> (output, h_n [B, H]), with nn.GRU's
    equations (gates r, z, n):
        r = σ(a_r + b_r), z = σ(a_z + b_z), n = tanh(a_n + r b_n), h_t = (1 - z) n + z h_{t-1}
    a = x W_ihᵀ + b_ih, b = h_{t-1} W_hhᵀ + b_hh. Rows past batch_sizes[t] keep their state.
    zoneout_h [..., H] (rows like input's; None = off): h_t = m h_{t-1} + (1 - m) h_t."""
    B = h0.shape[0]
    packed = batch_sizes is not None
    sizes = list(batch_sizes) if packed else [B] * input.shape[0]
    projected = F.linear(input, weight_ih, bias_ih)
    steps = projected.split(sizes, 0) if packed else projected.unbind(0)
    keeps = ([None] * len(sizes) if zoneout_h is None
             else list(zoneout_h.split(sizes, 0) if packed else zoneout_h.unbind(0)))
    h = h0
    outputs: list[Tensor] = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n = sizes[t]
        a_r, a_z, a_n = steps[t].chunk(3, dim=-1)
        b_r, b_z, b_n = F.linear(h[:n], weight_hh, bias_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
        new = torch.tanh(a_n + r * b_n)
        h_t = (1 - z) * new + z * h[:n]
        if keeps[t] is not None:
            h_t = keeps[t] * h[:n] + (1 - keeps[t]) * h_t
        outputs[t] = h_t
        h = torch.cat([h_t, h[n:]])
    if not outputs:  # no time step
        return input.new_zeros(*input.shape[:-1], h0.shape[-1]), h
    return (torch.cat(outputs) if packed else torch.stack(outputs)), h


def differentiable_gradients(function: Callable[..., Sequence[Tensor]],
                             inputs: Sequence[Tensor | None],
                             grad_outputs: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The vector-Jacobian product of function(*inputs) with grad_outputs, for each input that
    requires grad (None for the others), as tensors that can be differentiated again. A None
    in grad_outputs is a zero gradient (that output takes no part)."""
    with torch.enable_grad():
        outputs = function(*inputs)
    used = [(out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None]
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    if not used or not wanted:
        return [None] * len(inputs)
    grads = iter(torch.autograd.grad([out for out, _ in used], wanted,
                                     [grad for _, grad in used], create_graph=True,
                                     allow_unused=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]
