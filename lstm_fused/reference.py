"""Plain-PyTorch reference implementation of the LSTM variants in ``lstm_fused``.

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
    o   = sigmoid(z_o + peep_o(c_t))                 the output gate sees the NEW cell state
    h_t = o * tanh(c_t)
    h_t = W_hr h_t                                   (only with a projection, weight_hr [R, H])

``peephole=None, coupled=False`` is exactly ``torch.nn.LSTMCell`` / ``torch.nn.LSTM``.

Shapes: B = batch, I = input size, H = hidden size, R = projection size (or H without a
projection), G = number of gate blocks (3 coupled, 4 standard), P = number of peephole blocks
(2 coupled, 3 standard).

Everything here is pure, out-of-place torch ops, so it supports autograd (including double
backward) and any floating dtype, in particular float64 for gradcheck.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["lstm_cell", "lstm_layer", "normalize_peephole"]

_PEEPHOLE_ALLOWED = "None, False, True, 'diagonal' or 'full'"


# --------------------------------------------------------------------------------------------
# Variant bookkeeping
# --------------------------------------------------------------------------------------------


def normalize_peephole(peephole) -> str | None:
    """Canonical form of the ``peephole`` argument.

    None / False -> None; True / "diagonal" -> "diagonal"; "full" -> "full".
    Anything else raises ValueError.
    """
    if peephole is None or peephole is False:
        return None
    if peephole is True:
        return "diagonal"
    if isinstance(peephole, str) and peephole in ("diagonal", "full"):
        return peephole
    raise ValueError(f"peephole must be one of {_PEEPHOLE_ALLOWED}; got {peephole!r}")


def _gate_names(coupled: bool) -> tuple[str, ...]:
    """Order of the gate blocks in z (and in weight_ih / weight_hh / biases)."""
    return ("f", "g", "o") if coupled else ("i", "f", "g", "o")


def _peephole_names(coupled: bool) -> tuple[str, ...]:
    """Order of the peephole rows (diagonal) or [H, H] blocks (full) in weight_ch."""
    return ("f", "o") if coupled else ("i", "f", "o")


def _require_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        expected = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"expected {name} to be {expected}, got {type(t).__name__}")


def autocast_enabled(device: torch.device) -> bool:
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def _check_dtypes_and_devices(input: Tensor, named: dict[str, Tensor | None]) -> None:
    """input floating point; every other tensor on input's device and (outside autocast, which
    casts at the op) of input's dtype."""
    if not input.is_floating_point():
        raise TypeError(f"expected input to be a floating-point tensor (float64, float32, "
                        f"float16 or bfloat16), got {input.dtype}")
    autocast = autocast_enabled(input.device)
    for name, t in named.items():
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"expected {name} on device {input.device} (the device of input), "
                               f"got {t.device}")
        if t.dtype != input.dtype and not autocast:
            raise TypeError(f"expected {name} of dtype {input.dtype} (the dtype of input), "
                            f"got {t.dtype}")


def _check_args(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_ch: Tensor | None,
    weight_hr: Tensor | None,
    peephole: str | None,
    coupled: bool,
) -> tuple[int, int]:
    """Validate types, dtypes, devices and shapes against the variant; return (H, R).
    ``peephole`` is already normalized. Every error names the argument and what was expected."""
    required = {"input": input, "hx": hx, "cx": cx, "weight_ih": weight_ih,
                "weight_hh": weight_hh}
    optional = {"bias_ih": bias_ih, "bias_hh": bias_hh, "weight_ch": weight_ch,
                "weight_hr": weight_hr}
    for name, t in required.items():
        _require_tensor(name, t)
    for name, t in optional.items():
        _require_tensor(name, t, optional=True)
    del required["input"]
    _check_dtypes_and_devices(input, required | optional)

    G = len(_gate_names(coupled))
    P = len(_peephole_names(coupled))
    kind = "coupled" if coupled else "standard"

    if weight_ih.dim() != 2 or weight_ih.shape[0] % G != 0:
        raise ValueError(
            f"weight_ih must have shape [{G}*hidden_size, input_size] for a {kind} LSTM "
            f"(G={G} gate blocks); got {tuple(weight_ih.shape)}"
        )
    H = weight_ih.shape[0] // G
    I = weight_ih.shape[1]
    if input.shape[-1] != I:
        raise ValueError(f"expected input with {I} features (weight_ih is [{G * H}, {I}]), "
                         f"got {input.shape[-1]}")

    if weight_hr is not None:
        if weight_hr.dim() != 2 or weight_hr.shape[1] != H:
            raise ValueError(
                f"weight_hr must have shape [proj_size, {H}]; got {tuple(weight_hr.shape)}"
            )
        R = weight_hr.shape[0]
    else:
        R = H

    if tuple(weight_hh.shape) != (G * H, R):
        raise ValueError(
            f"weight_hh must have shape [{G * H}, {R}] for a {kind} LSTM with hidden_size={H}"
            f"{' and proj_size=' + str(R) if weight_hr is not None else ''}; "
            f"got {tuple(weight_hh.shape)}"
        )
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None and tuple(b.shape) != (G * H,):
            raise ValueError(f"{name} must have shape [{G * H}]; got {tuple(b.shape)}")

    if peephole is None:
        if weight_ch is not None:
            raise ValueError("weight_ch was given but peephole is None; pass peephole='diagonal' or 'full'")
    else:
        if weight_ch is None:
            raise ValueError(f"peephole={peephole!r} requires weight_ch, got None")
        expected = (P, H) if peephole == "diagonal" else (P * H, H)
        if tuple(weight_ch.shape) != expected:
            raise ValueError(
                f"weight_ch for peephole={peephole!r}, coupled={coupled} must have shape "
                f"{list(expected)} (blocks in order {_peephole_names(coupled)}); "
                f"got {tuple(weight_ch.shape)}"
            )

    if hx.shape[-1] != R:
        raise ValueError(f"hx must have last dimension {R} (proj_size or hidden_size); got {tuple(hx.shape)}")
    if cx.shape[-1] != H:
        raise ValueError(f"cx must have last dimension {H} (hidden_size); got {tuple(cx.shape)}")
    return H, R


def check_cell_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                    peephole: str | None, coupled: bool) -> None:
    """The checks of :func:`lstm_cell` (shared with lstm_fused.functional.lstm_cell)."""
    _check_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                peephole, coupled)
    if input.dim() != 2:
        raise ValueError(f"expected input of shape [B, input_size], got {tuple(input.shape)}")
    B = input.shape[0]
    for name, state, size in (("hx", hx, hx.shape[-1]), ("cx", cx, cx.shape[-1])):
        if tuple(state.shape) != (B, size):
            raise ValueError(f"expected {name} of shape {[B, size]} (batch of input, "
                             f"{'proj_size or hidden_size' if name == 'hx' else 'hidden_size'}), "
                             f"got {tuple(state.shape)}")


def check_layer_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                     weight_hr, peephole: str | None, coupled: bool,
                     batch_sizes=None) -> list[int] | None:
    """The checks of :func:`lstm_layer` (shared with lstm_fused.functional.lstm_layer); returns
    batch_sizes as a list of ints (None for padded input)."""
    _check_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                peephole, coupled)
    if hx.dim() != 2 or cx.dim() != 2 or hx.shape[0] != cx.shape[0]:
        raise ValueError(f"expected hx [B, R] and cx [B, H] (2-D, the same B); got hx "
                         f"{tuple(hx.shape)}, cx {tuple(cx.shape)}")
    B = hx.shape[0]
    if batch_sizes is None:
        if input.dim() != 3:
            raise ValueError(f"padded input must be [T, B, I]; got {tuple(input.shape)}")
        if input.shape[1] != B:
            raise ValueError(f"input has batch {input.shape[1]} but hx/cx have {B} rows")
        return None
    sizes = as_batch_sizes(batch_sizes)
    if input.dim() != 2:
        raise ValueError(f"packed input must be [N, I]; got {tuple(input.shape)}")
    check_batch_sizes(sizes, input.shape[0])
    if sizes and sizes[0] != B:
        raise ValueError(f"batch_sizes[0] = {sizes[0]} but hx/cx have {B} rows")
    return sizes


def check_batch_sizes(sizes: list[int], rows: int) -> None:
    """Packed-sequence batch sizes: positive, non-increasing, summing to the packed rows."""
    if any(s <= 0 for s in sizes) or any(a < b for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"batch_sizes must be positive and non-increasing; got {sizes}")
    if sum(sizes) != rows:
        raise ValueError(f"sum(batch_sizes) = {sum(sizes)} but the packed input has {rows} rows")


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
    # o = sigmoid(z_o + peep_o(c_t))  -- the NEW cell state
    o = torch.sigmoid(gates["o"] + _peephole(c, weight_ch, "o", peephole, coupled))
    # h_t = o * tanh(c_t)
    h = o * torch.tanh(c)
    # h_t = W_hr h_t (projection)
    if weight_hr is not None:
        h = h @ weight_hr.T
    return h, c


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
) -> tuple[Tensor, Tensor]:
    """One time step. input [B, I], hx [B, R], cx [B, H] -> (h [B, R], c [B, H]).

    R = proj_size (weight_hr [R, H]) or H. Parameters:
      weight_ih [G*H, I], weight_hh [G*H, R], bias_ih / bias_hh [G*H] (each optional),
      weight_ch [P, H] (diagonal) or [P*H, H] (full), only with a peephole,
      weight_hr [R, H], only with a projection.
    peephole: None / False, True / "diagonal", or "full". coupled: i = 1 - f.
    """
    peephole = normalize_peephole(peephole)
    coupled = bool(coupled)
    check_cell_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                    peephole, coupled)
    return _step(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                 peephole, coupled)


def as_batch_sizes(batch_sizes) -> list[int]:
    """batch_sizes as a list of ints: from a 1-D integer tensor or a sequence of ints."""
    expected = "a 1-D integer tensor or a list of ints"
    if isinstance(batch_sizes, Tensor):
        if batch_sizes.dim() != 1:
            raise ValueError(f"expected batch_sizes to be {expected}; got shape "
                             f"{tuple(batch_sizes.shape)}")
        if batch_sizes.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            raise TypeError(f"expected batch_sizes to be {expected}; got dtype {batch_sizes.dtype}")
        return batch_sizes.tolist()
    if isinstance(batch_sizes, Sequence) and all(
            isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in batch_sizes):
        return [int(b) for b in batch_sizes]
    raise TypeError(f"expected batch_sizes to be {expected}; got {batch_sizes!r}")


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
    Parameters, ``peephole`` and ``coupled`` as in :func:`lstm_cell`.
    """
    peephole = normalize_peephole(peephole)
    coupled = bool(coupled)
    sizes = check_layer_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                             weight_hr, peephole, coupled, batch_sizes)
    B, R = hx.shape
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
        h_t, c_t = _step(xs[t], h[:n], c[:n], weight_ih, weight_hh, bias_ih, bias_hh,
                         weight_ch, weight_hr, peephole, coupled)
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
