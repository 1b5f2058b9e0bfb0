"""Argument validation of every public entry of lstm_fused, in one place.

Each public call validates its arguments once, here, before any kernel runs (the C++ ops check
again for users who call ``torch.ops.lstm_fused.*`` directly):

- the modules (constructor options, forward arguments) raise what ``torch.nn.LSTM`` /
  ``torch.nn.LSTMCell`` / ``torch.nn.GRU`` / ``torch.nn.GRUCell`` raise for the same mistake,
  with their messages where they are useful: ``RuntimeError`` for size, batch and
  sequence-length mismatches, ``ValueError`` for a bad input rank and (``LSTM``, ``GRU``) an
  input dtype that is not the parameters', ``TypeError`` for a non-bool flag or non-int size.
  LSTM and GRU share one check of each kind, told apart by their states (a pair or one);
- the functional API checks the tensors of one cell or layer against the variant (their shapes
  follow from the weights), naming the argument and what was expected.

The reference twin (``lstm_fused.reference``) only computes; it calls the functional checks so
that it rejects the same inputs.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

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
    """Order of the gate blocks in weight_ih / weight_hh / biases (docs/design.md, "Parameters")."""
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


def _cell_kind(cell: str, coupled: bool) -> tuple[tuple[str, ...], str]:
    """(gate blocks in order, the words for the cell in messages): "standard LSTM" (i, f, g, o),
    "coupled LSTM" (f, g, o) or "GRU" (r, z, n)."""
    if cell == "GRU":
        return ("r", "z", "n"), "GRU"
    return _gate_names(coupled), f"{'coupled' if coupled else 'standard'} LSTM"


def _check_args(
    input: Tensor,
    hx: Tensor,
    cx: Tensor | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_ch: Tensor | None,
    weight_hr: Tensor | None,
    peephole: str | None,
    coupled: bool,
    cell: str = "LSTM",
) -> tuple[int, int]:
    """Validate types, dtypes, devices and shapes against the variant; return (H, R).
    ``peephole`` is already normalized. ``cell`` is "LSTM" or "GRU" (which has no cx, weight_ch
    or weight_hr: pass None). Every error names the argument and what was expected."""
    required = {"input": input, "hx": hx, "weight_ih": weight_ih, "weight_hh": weight_hh}
    if cell != "GRU":
        required["cx"] = cx
    optional = {"bias_ih": bias_ih, "bias_hh": bias_hh, "weight_ch": weight_ch,
                "weight_hr": weight_hr}
    for name, t in required.items():
        _require_tensor(name, t)
    for name, t in optional.items():
        _require_tensor(name, t, optional=True)
    del required["input"]
    _check_dtypes_and_devices(input, required | optional)

    gates, kind = _cell_kind(cell, coupled)
    G = len(gates)
    P = len(_peephole_names(coupled))

    if weight_ih.dim() != 2 or weight_ih.shape[0] % G != 0:
        raise ValueError(
            f"weight_ih must have shape [{G}*hidden_size, input_size] for a {kind} "
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
            f"weight_hh must have shape [{G * H}, {R}] for a {kind} with hidden_size={H}"
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
        width = "hidden_size" if cell == "GRU" else "proj_size or hidden_size"
        raise ValueError(f"hx must have last dimension {R} ({width}); got {tuple(hx.shape)}")
    if cx is not None and cx.shape[-1] != H:
        raise ValueError(f"cx must have last dimension {H} (hidden_size); got {tuple(cx.shape)}")
    return H, R


def _states_of(hx: Tensor, cx: Tensor | None) -> dict[str, Tensor]:
    """The states present by name: hx, and cx for an LSTM (None for a GRU)."""
    return {"hx": hx} if cx is None else {"hx": hx, "cx": cx}


def check_cell_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                    peephole: str | None, coupled: bool, cell: str = "LSTM") -> None:
    """The checks of :func:`lstm_cell` (shared with lstm_fused.functional.lstm_cell); with
    cell="GRU" (cx, weight_ch, weight_hr None) those of the GRU cell."""
    _check_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                peephole, coupled, cell)
    if input.dim() != 2:
        raise ValueError(f"expected input of shape [B, input_size], got {tuple(input.shape)}")
    B = input.shape[0]
    for name, state in _states_of(hx, cx).items():
        size = state.shape[-1]
        if tuple(state.shape) != (B, size):
            width = ("proj_size or hidden_size" if name == "hx" and cell != "GRU"
                     else "hidden_size")
            raise ValueError(f"expected {name} of shape {[B, size]} (batch of input, {width}), "
                             f"got {tuple(state.shape)}")


def check_layer_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                     weight_hr, peephole: str | None, coupled: bool,
                     batch_sizes=None, cell: str = "LSTM") -> list[int] | None:
    """The checks of :func:`lstm_layer` (shared with lstm_fused.functional.lstm_layer), or with
    cell="GRU" (cx, weight_ch, weight_hr None) those of the GRU layer; returns batch_sizes as a
    list of ints (None for padded input)."""
    _check_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                peephole, coupled, cell)
    states = _states_of(hx, cx)
    if any(s.dim() != 2 for s in states.values()) or hx.shape[0] != states.get("cx", hx).shape[0]:
        expected = ("hx [B, R] and cx [B, H] (2-D, the same B)" if cx is not None
                    else "hx [B, H] (2-D)")
        got = ", ".join(f"{name} {tuple(s.shape)}" for name, s in states.items())
        raise ValueError(f"expected {expected}; got {got}")
    B = hx.shape[0]
    names = "/".join(states) + (" have" if len(states) > 1 else " has")
    if batch_sizes is None:
        if input.dim() != 3:
            raise ValueError(f"padded input must be [T, B, I]; got {tuple(input.shape)}")
        if input.shape[1] != B:
            raise ValueError(f"input has batch {input.shape[1]} but {names} {B} rows")
        return None
    sizes = as_batch_sizes(batch_sizes)
    if input.dim() != 2:
        raise ValueError(f"packed input must be [N, I]; got {tuple(input.shape)}")
    check_batch_sizes(sizes, input.shape[0])
    if sizes and sizes[0] != B:
        raise ValueError(f"batch_sizes[0] = {sizes[0]} but {names} {B} rows")
    return sizes


def check_gru_cell_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh) -> None:
    """The checks of a GRU cell: input [B, I], hx [B, H], weight_ih [3H, I], weight_hh [3H, H],
    bias_ih / bias_hh [3H] or None."""
    check_cell_args(input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, None, None, None,
                    False, cell="GRU")


def check_gru_layer_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                         batch_sizes=None) -> list[int] | None:
    """The checks of a GRU layer (padded input [T, B, I] or packed [N, I] with batch_sizes, hx
    [B, H], weights as check_gru_cell_args); returns batch_sizes as a list of ints or None."""
    return check_layer_args(input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, None, None,
                            None, False, batch_sizes, cell="GRU")


def check_batch_sizes(sizes: list[int], rows: int) -> None:
    """Packed-sequence batch sizes: positive, non-increasing, summing to the packed rows."""
    if any(s <= 0 for s in sizes) or any(a < b for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"batch_sizes must be positive and non-increasing; got {sizes}")
    if sum(sizes) != rows:
        raise ValueError(f"sum(batch_sizes) = {sum(sizes)} but the packed input has {rows} rows")


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


# --------------------------------------------------------------------------------------------
# Modules: constructor options, as torch.nn.LSTM's constructor checks them
# --------------------------------------------------------------------------------------------


def _require_type(name: str, value, kind: type) -> None:
    # bool is an int in Python; torch.nn.LSTM's checks (isinstance) accept it for sizes too.
    if not isinstance(value, kind):
        raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")


def check_cell_options(input_size, hidden_size, bias, peephole=None,
                       coupled=False) -> str | None:
    """Options shared by the cells and the layer stacks (LSTM's variant options default to
    the GRU's: none); returns peephole in canonical form.

    Sizes: int (TypeError) and > 0 (ValueError); bias and coupled: bool (TypeError), as
    torch.nn.LSTM checks bias (torch.nn.LSTMCell checks nothing)."""
    _require_type("bias", bias, bool)
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        _require_type(name, value, int)
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero")
    _require_type("coupled", coupled, bool)
    return normalize_peephole(peephole)


def check_rnn_options(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                      bidirectional, proj_size=0, peephole=None, coupled=False) -> str | None:
    """LSTM's and GRU's constructor options (the GRU has no proj_size, peephole or coupled: the
    defaults), with torch.nn.LSTM's / nn.GRU's exception types and messages (and, where torch
    accepts a wrong type by accident, e.g. bidirectional="False", a TypeError in the same
    words); returns peephole in canonical form."""
    if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
            or not 0 <= dropout <= 1):
        raise ValueError(f"dropout should be a number in range [0, 1] representing the "
                         f"probability of an element being zeroed, got {dropout!r}")
    _require_type("bias", bias, bool)  # torch.nn.LSTM's order, for the first error to match
    _require_type("batch_first", batch_first, bool)
    _require_type("bidirectional", bidirectional, bool)
    peephole = check_cell_options(input_size, hidden_size, bias, peephole, coupled)
    _require_type("num_layers", num_layers, int)
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    _require_type("proj_size", proj_size, int)
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size="
                         f"{proj_size} and hidden_size={hidden_size}")
    return peephole


def check_regularizer_options(bias, forget_bias, weight_dropout) -> tuple[float, float]:
    """The regularizer keywords of LSTM and LSTMCell (docs/regularizers.md); returns
    (forget_bias, weight_dropout) as floats.

    forget_bias: a finite real number (TypeError otherwise), and 0 when bias=False (there is no
    bias to add it to: ValueError). weight_dropout: a real number in [0, 1) (TypeError for a
    non-number, ValueError outside the range: p = 1 would scale by 1/(1-p) = inf)."""
    for name, value in (("forget_bias", forget_bias), ("weight_dropout", weight_dropout)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name} should be a real number, got {type(value).__name__}")
    if not math.isfinite(forget_bias):
        raise ValueError(f"forget_bias should be a finite number, got {forget_bias!r}")
    if forget_bias != 0 and not bias:
        raise ValueError(f"forget_bias={forget_bias!r} needs bias=True: it is added to the "
                         f"forget gate's slice of bias_ih, which bias=False does not have")
    if not 0 <= weight_dropout < 1:
        raise ValueError(f"weight_dropout should be a number in range [0, 1) representing the "
                         f"probability of a recurrent weight being zeroed, got {weight_dropout!r}")
    return float(forget_bias), float(weight_dropout)


def check_zoneout(zoneout) -> tuple[float, float]:
    """The `zoneout` keyword (docs/regularizers.md): a real number p (p_h = p_c = p) or a pair
    (p_h, p_c), each in [0, 1), the probability that a unit keeps its previous value; returns
    (p_h, p_c) as floats. A non-number is a TypeError; a pair of another length or a rate
    outside [0, 1) (p = 1 would never update the state) a ValueError."""
    if isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout should be a number or a pair (p_h, p_c), got a "
                             f"{type(zoneout).__name__} of length {len(zoneout)}")
        rates = tuple(zoneout)
    else:
        rates = (zoneout, zoneout)
    for name, rate in zip(("p_h", "p_c"), rates):
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool):
            raise TypeError(f"zoneout's {name} should be a real number, got "
                            f"{type(rate).__name__}")
        if not 0 <= rate < 1:
            raise ValueError(f"zoneout's {name} should be a number in range [0, 1) representing "
                             f"the probability of a unit keeping its previous value, got "
                             f"{rate!r}")
    return float(rates[0]), float(rates[1])


def check_gru_zoneout(zoneout) -> tuple[float]:
    """The GRU's `zoneout` keyword: one rate p in [0, 1) for its one state, h; returns (p,)."""
    # A ValueError, as the LSTM's pair of the wrong length: a sequence of rates is the right
    # kind of value, one per state, and the GRU has one state.
    if isinstance(zoneout, (tuple, list)):
        raise ValueError(f"zoneout of a GRU should be a number (the rate of its one state, h), "  # noqa: TRY004
                         f"got a {type(zoneout).__name__}")
    return check_zoneout(zoneout)[:1]


def check_gru_layer_zoneout(zoneout, hx: Tensor, steps: int):
    """The functional GRU layer's `zoneout` argument: None (off), a keep rate in [0, 1) (eval:
    the expectation) or a 0/1 mask [T, B, H] (T = steps; packed input too: step t uses rows
    :batch_sizes[t] of mask[t]); returned unchanged."""
    if zoneout is not None:
        check_zoneout_keep(zoneout, hx.expand(steps, *hx.shape), "keep_h")
    return zoneout


def check_zoneout_keep(keep, state: Tensor, name: str) -> None:
    """One keep value of the functional `zoneout=(keep_h, keep_c)` argument, against the state
    it mixes (`name`: "keep_h" against hx, "keep_c" against cx): a rate in [0, 1) (the eval
    expectation) or a mask tensor with the state's shape, dtype and device (training)."""
    if isinstance(keep, Tensor):
        if keep.shape != state.shape:
            raise ValueError(f"zoneout {name}: expected a mask of shape {tuple(state.shape)} "
                             f"(the state it mixes), got {tuple(keep.shape)}")
        if keep.dtype != state.dtype:
            raise TypeError(f"zoneout {name}: expected a mask of dtype {state.dtype} (the "
                            f"state's), got {keep.dtype}")
        if keep.device != state.device:
            raise RuntimeError(f"zoneout {name}: expected a mask on {state.device} (the "
                               f"state's device), got {keep.device}")
        return
    if not isinstance(keep, numbers.Real) or isinstance(keep, bool):
        raise TypeError(f"zoneout {name}: expected a number or a mask tensor, got "
                        f"{type(keep).__name__}")
    if not 0 <= keep < 1:
        raise ValueError(f"zoneout {name}: expected a keep rate in [0, 1), got {keep!r}")


def check_zoneout_pair(zoneout, hx: Tensor, cx: Tensor):
    """The functional `zoneout` argument: None (off) or (keep_h, keep_c), each as
    check_zoneout_keep takes it; returned unchanged (None when both are 0)."""
    if zoneout is None:
        return None
    if not isinstance(zoneout, (tuple, list)) or len(zoneout) != 2:
        raise ValueError(f"zoneout should be None or a pair (keep_h, keep_c), got "
                         f"{type(zoneout).__name__}")
    check_zoneout_keep(zoneout[0], hx, "keep_h")
    check_zoneout_keep(zoneout[1], cx, "keep_c")
    return tuple(zoneout)


def check_layer_zoneout(zoneout, hx: Tensor, cx: Tensor, steps: int):
    """The functional layer's `zoneout` argument: None (off) or (keep_h, keep_c), each a rate in
    [0, 1) or a mask [T, B, R] / [T, B, H] (T = steps; for packed input too: step t uses rows
    :batch_sizes[t] of mask[t]); returned unchanged (None when off)."""
    if zoneout is None:
        return None
    if not isinstance(zoneout, (tuple, list)) or len(zoneout) != 2:
        raise ValueError(f"zoneout should be None or a pair (keep_h, keep_c), got "
                         f"{type(zoneout).__name__}")
    check_zoneout_keep(zoneout[0], hx.expand(steps, *hx.shape), "keep_h")
    check_zoneout_keep(zoneout[1], cx.expand(steps, *cx.shape), "keep_c")
    return tuple(zoneout)


# --------------------------------------------------------------------------------------------
# State clipping (cell_clip, proj_clip): TensorFlow LSTMCell's options
# --------------------------------------------------------------------------------------------


def check_clip(name: str, value) -> float:
    """`cell_clip` or `proj_clip` as the ops take it: None or 0 -> 0.0 (off), a finite number
    > 0 -> that float. A non-number is a TypeError; a negative, NaN or infinite one a
    ValueError."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (None or 0: no clipping), got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (None or 0: no clipping), got {value}")
    return value


def check_clips(cell_clip, proj_clip, projected: bool) -> tuple[float, float]:
    """(cell_clip, proj_clip) as floats (0.0 = off); proj_clip clips the projected h, so it
    needs a projection (proj_size > 0, weight_hr)."""
    cell_clip, proj_clip = check_clip("cell_clip", cell_clip), check_clip("proj_clip", proj_clip)
    if proj_clip > 0 and not projected:
        raise ValueError(f"proj_clip clips the projected h and needs a projection (proj_size > 0 "
                         f"or weight_hr), got proj_clip={proj_clip} without one")
    return cell_clip, proj_clip


# --------------------------------------------------------------------------------------------
# Layer normalisation (layer_norm, layer_norm_eps, weight_ln): issue 22, docs/layer-norm.md
# --------------------------------------------------------------------------------------------


def check_layer_norm_eps(value) -> float:
    """layer_norm_eps as a float: a real number (TypeError otherwise) that is finite and > 0
    (ValueError otherwise: the norm divides by sqrt(var + eps))."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"layer_norm_eps should be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"layer_norm_eps should be a finite number > 0, got {value}")
    return value


def check_layer_norm_options(layer_norm, layer_norm_eps) -> tuple[bool, float]:
    """The modules' layer_norm (a bool: TypeError otherwise) and layer_norm_eps."""
    _require_type("layer_norm", layer_norm, bool)
    return layer_norm, check_layer_norm_eps(layer_norm_eps)


def check_weight_ln(weight_ln, input: Tensor, weight_ih: Tensor, coupled: bool) -> None:
    """weight_ln (γ of the per-gate layer norm): None, or a [G, H] tensor on input's device of
    its dtype, G = 3 when coupled else 4 and H = weight_ih rows / G."""
    _require_tensor("weight_ln", weight_ln, optional=True)
    if weight_ln is None:
        return
    _check_dtypes_and_devices(input, {"weight_ln": weight_ln})
    G = len(_gate_names(coupled))
    expected = (G, weight_ih.shape[0] // G)
    if tuple(weight_ln.shape) != expected:
        raise ValueError(f"expected weight_ln of shape [G, H] = {list(expected)} (G = {G} gates, "
                         f"{'coupled' if coupled else 'standard'}; H from weight_ih), got "
                         f"{list(weight_ln.shape)}")


# --------------------------------------------------------------------------------------------
# Modules: forward arguments, as torch.nn.LSTM / torch.nn.LSTMCell check them
# --------------------------------------------------------------------------------------------


def _states(cls: str, hx, paired: bool) -> tuple[Tensor, ...]:
    """The module's hx as a tuple of state tensors: (h_0, c_0) for an LSTM (`paired`), (h_0,) for
    a GRU, whose hx is the tensor itself. A wrong type is a TypeError."""
    if not paired:
        if not isinstance(hx, Tensor):
            raise TypeError(f"{cls}: expected hx to be a Tensor, got {type(hx).__name__}")
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{cls}: expected hx to be a tuple (h_0, c_0), got {type(hx).__name__}")
    for index, state in enumerate(hx):
        if not isinstance(state, Tensor):
            raise TypeError(f"{cls}: expected hx[{index}] to be a Tensor, got "
                            f"{type(state).__name__}")
    return hx[0], hx[1]


def _state_labels(states: tuple[Tensor, ...]) -> tuple[str, ...]:
    """How torch's messages name each state: hx[0], hx[1] of an LSTM; hx of a GRU."""
    return ("hx",) if len(states) == 1 else tuple(f"hx[{i}]" for i in range(len(states)))


def _check_states_like_input(cls: str, states, input: Tensor) -> None:
    """States on input's device and (outside autocast) of its dtype: RuntimeError, as torch."""
    labels = _state_labels(states)
    for label, state in zip(labels, states, strict=True):
        if state.device != input.device:
            named = f" {label}" if len(states) > 1 else ""  # nn.GRU's message names none
            raise RuntimeError(f"{cls}: Input and hidden tensors are not at the same device, found "
                               f"input tensor at {input.device} and hidden tensor{named} at "
                               f"{state.device}")
        if state.dtype != input.dtype and not autocast_enabled(input.device):
            raise RuntimeError(f"{cls}: {label} dtype ({state.dtype}) does not match input "
                               f"dtype ({input.dtype})")


def _check_device(cls: str, input: Tensor, weight: Tensor) -> None:
    if input.device != weight.device:
        raise RuntimeError(f"{cls}: Input and parameter tensors are not at the same device, found "
                           f"input tensor at {input.device} and parameter tensor at "
                           f"{weight.device}")


def _check_rnn_forward(module, input, hx, paired: bool) -> list[int] | None:
    """The forward arguments of a layer stack, `paired` for the LSTM's (h_0, c_0), else the
    GRU's h_0 alone: input [T, B, I] ([B, T, I] if batch_first), [T, I] or a PackedSequence;
    hx None, (h_0 [D*L, B, R], c_0 [D*L, B, H]) or h_0 [D*L, B, H] ([D*L, R], ... for
    unbatched input). Checked in torch.nn.LSTM's / nn.GRU's order, with their exception types
    and messages (hidden sizes are compared after unbatched states get their batch dimension of
    1, as torch does). Returns the PackedSequence's batch sizes as a list of ints (None for a
    tensor)."""
    cls = type(module).__name__
    weight = module.weight_ih_l0
    sizes = None
    if isinstance(input, PackedSequence):
        data = input.data
        _require_tensor("input.data", data)
        sizes = as_batch_sizes(input.batch_sizes)
        batched, batch, steps = True, (sizes[0] if sizes else 0), len(sizes)
        expected_dim = 2
    elif isinstance(input, Tensor):
        data = input
        if data.dim() not in (2, 3):
            raise ValueError(f"{cls}: Expected input to be 2D or 3D, got {data.dim()}D instead")
        batched = data.dim() == 3
        time_dim = 1 if batched and module.batch_first else 0
        batch = data.shape[1 - time_dim] if batched else 1
        steps = data.shape[time_dim]
        expected_dim = data.dim()
    else:
        raise TypeError(f"{cls}: expected input to be a Tensor or PackedSequence, got "
                        f"{type(input).__name__}")
    if hx is not None:
        states = _states(cls, hx, paired)
        if sizes is None:
            dims = 3 if batched else 2
            if any(state.dim() != dims for state in states):
                kind = "batched 3" if batched else "unbatched 2"
                if paired:
                    raise RuntimeError(
                        f"{cls}: For {kind}-D input, hx and cx should also be {dims}-D but got "
                        f"({states[0].dim()}-D, {states[1].dim()}-D) tensors")
                raise RuntimeError(f"{cls}: For {kind}-D input, hx should also be {dims}-D but "
                                   f"got {states[0].dim()}-D tensor")
    if data.dtype != weight.dtype and not autocast_enabled(data.device):
        raise ValueError(f"{cls}: RNN input dtype ({data.dtype}) does not match weight dtype "
                         f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert "
                         f"model: model.to({data.dtype})")
    if data.dim() != expected_dim:
        raise RuntimeError(f"{cls}: input must have {expected_dim} dimensions, got {data.dim()}")
    if data.shape[-1] != module.input_size:
        raise RuntimeError(f"{cls}: input.size(-1) must be equal to input_size. Expected "
                           f"{module.input_size}, got {data.shape[-1]}")
    if sizes is not None:
        check_batch_sizes(sizes, data.shape[0])
    rows = module.num_layers * (2 if module.bidirectional else 1)
    if hx is not None:
        widths = ((module.proj_size or module.hidden_size, module.hidden_size) if paired
                  else (module.hidden_size,))
        for index, (state, width) in enumerate(zip(states, widths, strict=True)):
            shape = (rows, batch, width)
            size = list(state.shape) if batched else [state.shape[0], 1, *state.shape[1:]]
            if tuple(size) != shape:
                hidden = f"hidden[{index}]" if paired else "hidden"
                raise RuntimeError(f"{cls}: Expected {hidden} size {shape}, got {size}")
    _check_device(cls, data, weight)
    if hx is not None:
        _check_states_like_input(cls, states, data)
    if steps == 0:
        raise RuntimeError(f"{cls}: Expected sequence length to be larger than 0 in RNN; got "
                           f"input of shape {tuple(data.shape)}")
    return sizes


def check_lstm_forward(lstm, input, hx) -> list[int] | None:
    """LSTM.forward(input, hx), hx None or (h_0 [D*L, B, R], c_0 [D*L, B, H]), as
    torch.nn.LSTM checks it (_check_rnn_forward)."""
    return _check_rnn_forward(lstm, input, hx, paired=True)


def check_gru_forward(gru, input, hx) -> list[int] | None:
    """GRU.forward(input, hx), hx None or h_0 [D*L, B, H], as torch.nn.GRU checks it
    (_check_rnn_forward)."""
    return _check_rnn_forward(gru, input, hx, paired=False)


def _check_cell_forward(cell, input, hx, paired: bool) -> None:
    """A cell's forward arguments, `paired` for LSTMCell's (h_0, c_0), else GRUCell's h_0 alone:
    input [B, I] or [I]; each state [B, H] (or [H] for unbatched input). Checked as
    torch.nn.LSTMCell / nn.GRUCell check them (ValueError for a rank, RuntimeError for a size or
    batch mismatch, with their messages); a dtype or device mismatch is a RuntimeError, as
    there."""
    cls = type(cell).__name__
    _require_tensor("input", input)
    if input.dim() not in (1, 2):
        raise ValueError(f"{cls}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if hx is not None:
        states = _states(cls, hx, paired)
        labels = _state_labels(states)
        for label, state in zip(labels, states, strict=True):
            if state.dim() not in (1, 2):
                # nn.GRUCell calls its state "hidden" here, nn.LSTMCell "hx[i]"
                named = label if paired else "hidden"
                raise ValueError(f"{cls}: Expected {named} to be 1D or 2D, got "
                                 f"{state.dim()}D instead")
            if state.dim() != input.dim():
                raise RuntimeError(f"{cls}: for {input.dim()}-D input, {label} should also "
                                   f"be {input.dim()}-D but got {state.dim()}-D")
    # Sizes first, then dtypes and devices: torch.nn.LSTMCell / GRUCell check the sizes in
    # torch._VF.{lstm,gru}_cell (aten/src/ATen/native/RNN.cpp, check_rnn_cell_forward_input,
    # then check_rnn_cell_forward_hidden per state: batch, then hidden size) and meet a dtype or
    # device mismatch only later, in their GEMMs.
    weight = cell.weight_ih
    if input.shape[-1] != cell.input_size:
        raise RuntimeError(f"{cls}: input has inconsistent input_size: got {input.shape[-1]} "
                           f"expected {cell.input_size}")
    if hx is not None:
        batch = input.shape[0] if input.dim() == 2 else 1
        for index, state in enumerate(states):
            state = state if state.dim() == 2 else state.unsqueeze(0)
            if state.shape[0] != batch:
                raise RuntimeError(f"{cls}: Input batch size {batch} doesn't match hidden{index} "
                                   f"batch size {state.shape[0]}")
            if state.shape[1] != cell.hidden_size:
                raise RuntimeError(f"{cls}: hidden{index} has inconsistent hidden_size: got "
                                   f"{state.shape[1]}, expected {cell.hidden_size}")
    if input.dtype != weight.dtype and not autocast_enabled(input.device):
        raise RuntimeError(f"{cls}: input dtype ({input.dtype}) does not match weight dtype "
                           f"({weight.dtype}). Convert input: input.to({weight.dtype}), or "
                           f"convert model: model.to({input.dtype})")
    _check_device(cls, input, weight)
    if hx is not None:
        _check_states_like_input(cls, states, input)


def check_cell_forward(cell, input, hx) -> None:
    """LSTMCell.forward(input, hx), hx None or (h_0, c_0), as torch.nn.LSTMCell checks it
    (_check_cell_forward)."""
    _check_cell_forward(cell, input, hx, paired=True)


def check_gru_cell_forward(cell, input, hx) -> None:
    """GRUCell.forward(input, hx), hx None or h_0, as torch.nn.GRUCell checks it
    (_check_cell_forward)."""
    _check_cell_forward(cell, input, hx, paired=False)
