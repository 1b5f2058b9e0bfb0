"""Plain-PyTorch reference implementation of the LSTM variants and the GRU in ``lstm_fused``.

This module is the ground truth the fused C++/CUDA ops are tested against. It is written
equation by equation so it can be checked line by line against docs/design.md section 1:

    z = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh        split into blocks of H:
                                                     (i, f, g, o), or (f, g, o) when coupled

    peep_k(c) = w_ck * c          diagonal: w_ck is row k of weight_ch [P, H]
    peep_k(c) = W_ck c            full:     W_ck is block k ([H, H]) of weight_ch [P*H, H]
    peep_k(c) = 0                 no peephole
                                  (peephole rows/blocks in order (i, f, o), or (f, o) when coupled)

    f   = sigmoid(z_f + peep_f(c_{t-1}))
    i   = 1 - f                                      (coupled)
    i   = sigmoid(z_i + peep_i(c_{t-1}))             (standard)
    g   = tanh(z_g)
    c_t = f * c_{t-1} + i * g
    c_t = clip(c_t, -cell_clip, cell_clip)           (only with cell_clip > 0)
    o   = sigmoid(z_o + peep_o(c_t))                 the output gate sees the NEW cell state
    h_t = o * tanh(c_t)
    h_t = W_hr h_t                                   (only with a projection, weight_hr [R, H])
    h_t = clip(h_t, -proj_clip, proj_clip)           (only with a projection and proj_clip > 0)
    c_t = m_c * c_{t-1} + (1 - m_c) * c_t            zoneout (only with zoneout): m 0/1 masks in
    h_t = m_h * h_{t-1} + (1 - m_h) * h_t            training (1 keeps the previous value), the
                                                     rates p_c, p_h in eval; after the clips; the
                                                     gates of step t saw the unzoned c_t

``peephole=None, coupled=False`` is exactly ``torch.nn.LSTMCell`` / ``torch.nn.LSTM``.

With layer normalisation (``weight_ln`` [G, H], row k = γ_k; docs/layer-norm.md), every gate k is
normalised over its H units before its activation, and the biases come after the norm:

    v_k   = W_ih,k x_t + W_hh,k h_{t-1} + peep_k(c)   c = c_{t-1} for i, f; the new c_t for o
    N(v)  = (v - mean(v)) / sqrt(var(v) + eps)        mean and biased variance over the H units
    ẑ_k   = γ_k * N(v_k) + b_ih,k + b_hh,k
    f = sigmoid(ẑ_f), i = 1 - f or sigmoid(ẑ_i), g = tanh(ẑ_g), o = sigmoid(ẑ_o), then as above

The GRU (``gru_cell``, ``gru_layer``; torch.nn.GRU's and cuDNN's form), weights [3H, ...] in
blocks of H in the order (r, z, n):

    r   = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)          reset gate
    z   = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)          update gate
    n   = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))       r multiplies AFTER W_hn h + b_hn
    h_t = (1 - z) * n + z * h_{t-1}

Shapes: B = batch, I = input size, H = hidden size, R = projection size (or H without a
projection), G = number of gate blocks (3 coupled, 4 standard), P = number of peephole blocks
(2 coupled, 3 standard).

Everything here is pure, out-of-place torch ops, so it supports autograd (including double
backward) and any floating dtype, in particular float64 for gradcheck.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Validation belongs to the library (lstm_fused._checks); the twin calls the same checks so that
# it rejects the same inputs, and otherwise only computes.
from ._checks import (
    check_cell_args,
    check_clips,
    check_gru_cell_args,
    check_gru_layer_args,
    check_gru_layer_zoneout,
    check_layer_args,
    check_layer_norm_eps,
    check_layer_zoneout,
    check_weight_ln,
    check_zoneout_pair,
    normalize_peephole,
)

__all__ = ["gru_cell", "gru_layer", "lstm_cell", "lstm_layer", "normalize_peephole"]


def _gate_names(coupled: bool) -> tuple[str, ...]:
    """Order of the gate blocks in z (and in weight_ih / weight_hh / biases)."""
    return ("f", "g", "o") if coupled else ("i", "f", "g", "o")


def _peephole_names(coupled: bool) -> tuple[str, ...]:
    """Order of the peephole rows (diagonal) or [H, H] blocks (full) in weight_ch."""
    return ("f", "o") if coupled else ("i", "f", "o")


# --------------------------------------------------------------------------------------------
# The equations
# --------------------------------------------------------------------------------------------


def _split_gates(z: Tensor, coupled: bool) -> dict[str, Tensor]:
    """Split pre-activations z [B, G*H] into named blocks of H columns: {"i", "f", "g", "o"}
    (no "i" when coupled)."""
    names = _gate_names(coupled)
    return dict(zip(names, z.chunk(len(names), dim=-1)))


def _peephole(
    c: Tensor, weight_ch: Tensor | None, gate: str, peephole: str | None, coupled: bool
) -> Tensor:
    """peep_gate(c) [B, H] for cell state c [B, H].

    diagonal: w_ck * c with w_ck = weight_ch[k]              (weight_ch [P, H])
    full:     W_ck c   with W_ck = weight_ch[k*H:(k+1)*H]    (weight_ch [P*H, H]), i.e. c @ W_ck.T
    none:     0
    where k is the position of ``gate`` in (i, f, o), or (f, o) when coupled.
    """
    if peephole is None:
        return torch.zeros_like(c)
    k = _peephole_names(coupled).index(gate)
    if peephole == "diagonal":
        return c * weight_ch[k]
    H = c.shape[-1]
    return c @ weight_ch[k * H : (k + 1) * H].T


def _normalize(v: Tensor, eps: float) -> Tensor:
    """N(v) = (v - mean(v)) / sqrt(var(v) + eps) over the last dimension, biased variance."""
    mean = v.mean(dim=-1, keepdim=True)
    var = ((v - mean) ** 2).mean(dim=-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps)


def _layer_norm_step(
    x: Tensor,
    h_prev: Tensor,
    c_prev: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_ch: Tensor | None,
    weight_hr: Tensor | None,
    peephole: str | None,
    coupled: bool,
    cell_clip: float,
    proj_clip: float,
    weight_ln: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """One layer-normalised step, no validation (the module docstring's equations)."""
    # v = W_ih x_t + W_hh h_{t-1}   (no biases: they come after the norm)
    v = _split_gates(x @ weight_ih.T + h_prev @ weight_hh.T, coupled)
    names = _gate_names(coupled)
    G = len(names)
    zeros = torch.zeros(G * weight_ln.shape[1], dtype=x.dtype, device=x.device)
    b_ih = _split_gates(bias_ih if bias_ih is not None else zeros, coupled)
    b_hh = _split_gates(bias_hh if bias_hh is not None else zeros, coupled)

    def z_hat(gate: str, peep: Tensor | float) -> Tensor:
        # ẑ_k = γ_k * N(v_k + peep_k(c)) + b_ih,k + b_hh,k
        k = names.index(gate)
        return weight_ln[k] * _normalize(v[gate] + peep, eps) + b_ih[gate] + b_hh[gate]

    def peep(gate: str, c: Tensor) -> Tensor:
        return _peephole(c, weight_ch, gate, peephole, coupled)

    f = torch.sigmoid(z_hat("f", peep("f", c_prev)))
    i = 1 - f if coupled else torch.sigmoid(z_hat("i", peep("i", c_prev)))
    g = torch.tanh(z_hat("g", 0.0))  # the cell input has no peephole
    c = f * c_prev + i * g
    if cell_clip > 0:
        c = torch.clamp(c, -cell_clip, cell_clip)
    # the output gate's norm sees the NEW (clipped) cell state through its peephole
    o = torch.sigmoid(z_hat("o", peep("o", c)))
    h = o * torch.tanh(c)
    if weight_hr is not None:
        h = h @ weight_hr.T
        if proj_clip > 0:
            h = torch.clamp(h, -proj_clip, proj_clip)
    return h, c


def _step(
    x: Tensor,
    h_prev: Tensor,
    c_prev: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_ch: Tensor | None,
    weight_hr: Tensor | None,
    peephole: str | None,
    coupled: bool,
    cell_clip: float = 0.0,
    proj_clip: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One step, no validation: x [B, I], h_prev [B, R], c_prev [B, H] -> (h [B, R], c [B, H])."""
    # z = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
    z = x @ weight_ih.T
    if bias_ih is not None:
        z = z + bias_ih
    z = z + h_prev @ weight_hh.T
    if bias_hh is not None:
        z = z + bias_hh
    gates = _split_gates(z, coupled)

    # f = sigmoid(z_f + peep_f(c_{t-1}))
    f = torch.sigmoid(gates["f"] + _peephole(c_prev, weight_ch, "f", peephole, coupled))
    # i = 1 - f (coupled)  |  i = sigmoid(z_i + peep_i(c_{t-1})) (standard)
    if coupled:
        i = 1 - f
    else:
        i = torch.sigmoid(gates["i"] + _peephole(c_prev, weight_ch, "i", peephole, coupled))
    # g = tanh(z_g)
    g = torch.tanh(gates["g"])
    # c_t = f * c_{t-1} + i * g
    c = f * c_prev + i * g
    # c_t = clip(c_t, -cell_clip, cell_clip): the clipped value is the state everything sees
    if cell_clip > 0:
        c = torch.clamp(c, -cell_clip, cell_clip)
    # o = sigmoid(z_o + peep_o(c_t))  -- the NEW cell state
    o = torch.sigmoid(gates["o"] + _peephole(c, weight_ch, "o", peephole, coupled))
    # h_t = o * tanh(c_t)
    h = o * torch.tanh(c)
    # h_t = W_hr h_t (projection)
    if weight_hr is not None:
        h = h @ weight_hr.T
        # h_t = clip(h_t, -proj_clip, proj_clip)
        if proj_clip > 0:
            h = torch.clamp(h, -proj_clip, proj_clip)
    return h, c


_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 (Salmon et al., SC 2011), written out in Python integers: ten rounds of

        (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))

    with the key bumped by (W0, W1) between rounds. Four 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32
    return c0, c1, c2, c3


def keep_mask(seed: int, size, p: float, dtype=torch.float64) -> Tensor:
    """Zoneout's keep mask as `lstm_fused.functional.keep_mask` draws it from the key `seed`
    (an int64): with n elements and Q = ceil(n / 4) blocks, element i (row-major) is 1 when
    word i // Q of philox4x32_10((i % Q as two 32-bit halves, 0, 0), (seed as two halves)) is
    below round(p 2^32), else 0. Slow: for tests."""
    key = seed & 0xFFFFFFFFFFFFFFFF
    threshold = int(p * 2**32 + 0.5)
    numel = 1
    for n in size:
        numel *= n
    blocks = (numel + 3) // 4
    words = [philox4x32_10((b & _MASK32, b >> 32, 0, 0), (key & _MASK32, key >> 32))
             for b in range(blocks)]
    return torch.tensor([float(words[i % blocks][i // blocks] < threshold) for i in range(numel)],
                        dtype=dtype).reshape(tuple(size))


def _zoneout(previous: Tensor, new: Tensor, keep: Tensor | float) -> Tensor:
    """m * previous + (1 - m) * new, m = keep: a 0/1 mask or a rate (the expectation)."""
    return keep * previous + (1 - keep) * new


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    weight_ch: Tensor | None = None,
    weight_hr: Tensor | None = None,
    *,
    peephole=None,
    coupled: bool = False,
    cell_clip=None,
    proj_clip=None,
    zoneout=None,
    weight_ln: Tensor | None = None,
    layer_norm_eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """One time step. input [B, I], hx [B, R], cx [B, H] -> (h [B, R], c [B, H]).

    R = proj_size (weight_hr [R, H]) or H. Parameters:
      weight_ih [G*H, I], weight_hh [G*H, R], bias_ih / bias_hh [G*H] (each optional),
      weight_ch [P, H] (diagonal) or [P*H, H] (full), only with a peephole,
      weight_hr [R, H], only with a projection.
    peephole: None / False, True / "diagonal", or "full". coupled: i = 1 - f.
    cell_clip / proj_clip: None or 0 (off), or the bound of c_t / of the projected h_t.
    zoneout: None (off) or (keep_h, keep_c): each a rate in [0, 1) or a 0/1 mask shaped like
    hx / cx (the injected masks of the tests).
    weight_ln [G, H]: layer normalisation of every gate (γ_k = row k), with layer_norm_eps.
    """
    peephole = normalize_peephole(peephole)
    coupled = bool(coupled)
    check_cell_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                    peephole, coupled)
    cell_clip, proj_clip = check_clips(cell_clip, proj_clip, weight_hr is not None)
    zoneout = check_zoneout_pair(zoneout, hx, cx)
    check_weight_ln(weight_ln, input, weight_ih, coupled)
    eps = check_layer_norm_eps(layer_norm_eps)
    h, c = _any_step(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                     peephole, coupled, cell_clip, proj_clip, weight_ln, eps)
    if zoneout is not None:
        h, c = _zoneout(hx, h, zoneout[0]), _zoneout(cx, c, zoneout[1])
    return h, c


def _any_step(x, h_prev, c_prev, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
              peephole, coupled, cell_clip, proj_clip, weight_ln, eps):
    """_step, or _layer_norm_step with weight_ln."""
    if weight_ln is None:
        return _step(x, h_prev, c_prev, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                     weight_hr, peephole, coupled, cell_clip, proj_clip)
    return _layer_norm_step(x, h_prev, c_prev, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                            weight_hr, peephole, coupled, cell_clip, proj_clip, weight_ln, eps)


def lstm_layer(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    weight_ch: Tensor | None = None,
    weight_hr: Tensor | None = None,
    *,
    peephole=None,
    coupled: bool = False,
    reverse: bool = False,
    batch_sizes=None,
    cell_clip=None,
    proj_clip=None,
    zoneout=None,
    weight_ln: Tensor | None = None,
    layer_norm_eps: float = 1e-5,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One layer, one direction.

    Padded: input [T, B, I] -> output [T, B, R].
    Packed: ``batch_sizes`` is a 1-D int64 CPU tensor or list (non-increasing, as in
    PackedSequence); input is the packed data [N, I] with N = sum(batch_sizes); at step t only
    the first batch_sizes[t] rows are active; output is packed the same way, [N, R].
    hx [B, R], cx [B, H] with B = input.shape[1] (padded) or batch_sizes[0] (packed).

    reverse=True processes time from last to first (backward direction of a bidirectional
    LSTM); with packed input every sequence still ends at its own length: row b starts its
    reverse pass at its own last step, from hx[b].

    Returns (output, (h_n [B, R], c_n [B, H])): each row's final state (for the packed forward
    direction, the state at that row's last active step; for reverse, the state after step 0).
    Parameters, ``peephole``, ``coupled``, the clips and layer norm as in :func:`lstm_cell`.
    zoneout: None (off) or (keep_h, keep_c), each a rate in [0, 1) or a 0/1 mask [T, B, R] /
    [T, B, H] (padded and packed alike: step t uses rows :batch_sizes[t] of mask[t]).
    """
    peephole = normalize_peephole(peephole)
    coupled = bool(coupled)
    sizes = check_layer_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                             weight_hr, peephole, coupled, batch_sizes)
    cell_clip, proj_clip = check_clips(cell_clip, proj_clip, weight_hr is not None)
    check_weight_ln(weight_ln, input, weight_ih, coupled)
    eps = check_layer_norm_eps(layer_norm_eps)
    B, R = hx.shape
    zoneout = check_layer_zoneout(zoneout, hx, cx,
                                  len(sizes) if sizes is not None else input.shape[0])
    if sizes is None:
        sizes = [B] * input.shape[0]
        xs = input.unbind(0)  # T tensors [B, I]
    else:
        xs = input.split(sizes, dim=0)  # T tensors [batch_sizes[t], I]

    T = len(sizes)
    h, c = hx, cx  # state of all B rows
    outputs: list[Tensor | None] = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        n = sizes[t]  # rows 0..n-1 are active at step t
        h_t, c_t = _any_step(xs[t], h[:n], c[:n], weight_ih, weight_hh, bias_ih, bias_hh,
                             weight_ch, weight_hr, peephole, coupled, cell_clip, proj_clip,
                             weight_ln, eps)
        if zoneout is not None:
            keep_h, keep_c = (k[t, :n] if isinstance(k, Tensor) else k for k in zoneout)
            h_t, c_t = _zoneout(h[:n], h_t, keep_h), _zoneout(c[:n], c_t, keep_c)
        outputs[t] = h_t
        # Rows n.. keep their state: going forward they have already finished (batch sizes only
        # shrink), so they hold their final state; going in reverse they have not started yet,
        # so they still hold hx / cx.
        h = torch.cat([h_t, h[n:]], dim=0)
        c = torch.cat([c_t, c[n:]], dim=0)

    if batch_sizes is None:
        output = torch.stack(outputs, 0) if T > 0 else input.new_empty((0, B, R))
    else:
        output = torch.cat(outputs, 0) if T > 0 else input.new_empty((0, R))
    return output, (h, c)


# --------------------------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------------------------


def _gru_step(
    x: Tensor,
    h_prev: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> Tensor:
    """One GRU step, no validation: x [B, I], h_prev [B, H] -> h [B, H]."""
    W_ir, W_iz, W_in = weight_ih.chunk(3, dim=0)  # each [H, I]
    W_hr, W_hz, W_hn = weight_hh.chunk(3, dim=0)  # each [H, H]
    zero = torch.zeros(W_ir.shape[0], dtype=x.dtype, device=x.device)
    b_ir, b_iz, b_in = bias_ih.chunk(3) if bias_ih is not None else (zero,) * 3
    b_hr, b_hz, b_hn = bias_hh.chunk(3) if bias_hh is not None else (zero,) * 3
    # r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    r = torch.sigmoid(x @ W_ir.T + b_ir + h_prev @ W_hr.T + b_hr)
    # z = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    z = torch.sigmoid(x @ W_iz.T + b_iz + h_prev @ W_hz.T + b_hz)
    # n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))
    n = torch.tanh(x @ W_in.T + b_in + r * (h_prev @ W_hn.T + b_hn))
    # h_t = (1 - z) * n + z * h_{t-1}
    return (1 - z) * n + z * h_prev


def gru_cell(
    input: Tensor,
    hx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
) -> Tensor:
    """One GRU step. input [B, I], hx [B, H] -> h' [B, H].

    Parameters as torch.nn.GRUCell's: weight_ih [3H, I], weight_hh [3H, H], bias_ih / bias_hh
    [3H] (each optional), gate blocks in the order (r, z, n)."""
    check_gru_cell_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    return _gru_step(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)


def gru_layer(
    input: Tensor,
    hx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    *,
    reverse: bool = False,
    batch_sizes=None,
    zoneout=None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction: (output, h_n).

    Padded: input [T, B, I] -> output [T, B, H]. Packed: ``batch_sizes`` (non-increasing, as in
    PackedSequence), input the packed data [N, I] -> output [N, H]; at step t only the first
    batch_sizes[t] rows are active. hx [B, H] with B = input.shape[1] or batch_sizes[0].
    reverse=True runs time from last to first; with packed input each row starts its reverse
    pass at its own last step, from hx[b]. h_n [B, H]: each row's final state. Parameters as in
    :func:`gru_cell`. zoneout: None (off), a keep rate in [0, 1) or a 0/1 mask [T, B, H] (step t
    uses rows :batch_sizes[t] of mask[t]): h_t = m * h_{t-1} + (1 - m) * h_t."""
    sizes = check_gru_layer_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes)
    zoneout = check_gru_layer_zoneout(zoneout, hx,
                                      len(sizes) if sizes is not None else input.shape[0])
    B, H = hx.shape
    if sizes is None:
        sizes = [B] * input.shape[0]
        xs = input.unbind(0)  # T tensors [B, I]
    else:
        xs = input.split(sizes, dim=0)  # T tensors [batch_sizes[t], I]

    T = len(sizes)
    h = hx  # state of all B rows
    outputs: list[Tensor | None] = [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        n = sizes[t]  # rows 0..n-1 are active at step t
        h_t = _gru_step(xs[t], h[:n], weight_ih, weight_hh, bias_ih, bias_hh)
        if zoneout is not None:
            h_t = _zoneout(h[:n], h_t, zoneout[t, :n] if isinstance(zoneout, Tensor) else zoneout)
        outputs[t] = h_t
        # Rows n.. keep their state: finished (forward) or not started yet (reverse).
        h = torch.cat([h_t, h[n:]], dim=0)

    if batch_sizes is None:
        output = torch.stack(outputs, 0) if T > 0 else input.new_empty((0, B, H))
    else:
        output = torch.cat(outputs, 0) if T > 0 else input.new_empty((0, H))
    return output, h
