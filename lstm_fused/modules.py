"""Drop-in replacements for torch.nn.LSTM / torch.nn.LSTMCell with peephole and coupled-gate
variants. Parameter names, shapes, gate order and calling conventions are nn.LSTM's, so
`peephole=None, coupled=False` loads an nn.LSTM state_dict and gives the same results.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from .reference import (
    as_batch_sizes,
    autocast_enabled,
    check_batch_sizes,
    normalize_peephole,
)


class _VariantMixin:
    """Parameters and repr shared by the cell and the layer stack."""

    def _init_variant(self, input_size, hidden_size, bias, peephole, coupled):
        if not isinstance(hidden_size, numbers.Integral) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not isinstance(input_size, numbers.Integral) or input_size < 0:
            raise ValueError(f"input_size must be a non-negative integer, got {input_size!r}")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.bias = bool(bias)
        self.peephole = normalize_peephole(peephole)
        self.coupled = bool(coupled)
        self.num_gates = 3 if self.coupled else 4
        self.num_peepholes = 2 if self.coupled else 3

    def _make_parameters(self, suffix, input_size, recurrent_size, proj_size, factory):
        """Registers weight_ih{suffix}, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr."""
        H, G, P = self.hidden_size, self.num_gates, self.num_peepholes

        def add(name, *shape):
            self.register_parameter(name + suffix, nn.Parameter(torch.empty(*shape, **factory)))

        add("weight_ih", G * H, input_size)
        add("weight_hh", G * H, recurrent_size)
        if self.bias:
            add("bias_ih", G * H)
            add("bias_hh", G * H)
        if self.peephole == "diagonal":
            add("weight_ch", P, H)
        elif self.peephole == "full":
            add("weight_ch", P * H, H)
        if proj_size > 0:
            add("weight_hr", proj_size, H)

    def _parameters_for(self, suffix):
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr), None where absent."""
        return tuple(getattr(self, name + suffix, None) for name in
                     ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch", "weight_hr"))

    def reset_parameters(self) -> None:
        """Every parameter uniform in (-1/sqrt(H), 1/sqrt(H)), as torch.nn.LSTM."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _variant_repr(self) -> str:
        s = ""
        if self.peephole is not None:
            s += f", peephole={self.peephole!r}"
        if self.coupled:
            s += ", coupled=True"
        return s

    # --- argument checks: each error names the argument and what was expected ----------------

    def _check_tensor(self, name, t, like, like_name):
        """t is a Tensor on like's device and (outside autocast) of like's dtype."""
        cls = type(self).__name__
        if not isinstance(t, Tensor):
            raise TypeError(f"{cls}: expected {name} to be a Tensor, got {type(t).__name__}")
        if t.device != like.device:
            raise RuntimeError(f"{cls}: expected {name} on device {like.device} (the device of "
                               f"{like_name}), got {t.device}")
        # As torch.nn.LSTM: a dtype mismatch is a ValueError, and autocast casts at the op.
        if t.dtype != like.dtype and not autocast_enabled(t.device):
            raise ValueError(f"{cls}: expected {name} of dtype {like.dtype} (the dtype of "
                             f"{like_name}), got {t.dtype}; convert {name} with "
                             f".to({like.dtype}) or the module with .to({t.dtype})")

    def _check_state(self, name, state, expected):
        if tuple(state.shape) != tuple(expected):
            raise ValueError(f"{type(self).__name__}: expected {name} of shape {tuple(expected)}, "
                             f"got {tuple(state.shape)}")

    def _unpack_hx(self, hx):
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{type(self).__name__}: expected hx to be a tuple (h_0, c_0), got "
                            f"{type(hx).__name__}")
        return hx

    # --- state_dict: a parameter set of another variant fails with a message saying so -------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if strict:
            found = self._state_dict_variant_differences(state_dict, prefix)
            if found:
                error_msgs.append(
                    f"the state_dict is for another LSTM variant than this {type(self).__name__} "
                    f"(peephole={self.peephole!r}, coupled={self.coupled}): {'; '.join(found)}. "
                    f"Build the module with the options the state_dict was saved with.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _state_dict_variant_differences(self, state_dict, prefix) -> list[str]:
        """How the first layer's parameters in state_dict show a different (peephole, coupled)."""
        suffix = self._first_suffix
        H, found = self.hidden_size, []
        weight_ih = state_dict.get(prefix + "weight_ih" + suffix)
        if weight_ih is None:
            return found
        for coupled, gates in ((True, 3), (False, 4)):
            if coupled != self.coupled and weight_ih.shape[0] == gates * H:
                found.append(f"weight_ih{suffix} has {gates}*hidden_size rows, as with "
                             f"coupled={coupled}")
        weight_ch = state_dict.get(prefix + "weight_ch" + suffix)
        if weight_ch is None and self.peephole is not None:
            found.append(f"it has no weight_ch{suffix}, as with peephole=None")
        elif weight_ch is not None and self.peephole is None:
            found.append(f"it has weight_ch{suffix}, as with peephole='diagonal' or 'full'")
        elif weight_ch is not None and tuple(weight_ch.shape) != tuple(
                getattr(self, "weight_ch" + suffix).shape):
            kind = "diagonal" if weight_ch.shape[0] in (2, 3) else "full"
            if kind != self.peephole:
                found.append(f"weight_ch{suffix} has shape {tuple(weight_ch.shape)}, as with "
                             f"peephole={kind!r}")
        return found


class LSTMCell(_VariantMixin, nn.Module):
    r"""One LSTM step, optionally with peepholes and/or coupled input/forget gates.

    Args:
        input_size: features of the input x.
        hidden_size: features of the hidden and cell state.
        bias: add bias_ih and bias_hh. Default True.
        peephole: None (no peepholes), "diagonal" (or True) or "full".
        coupled: couple input and forget gates, i = 1 - f (CIFG); 3 gate blocks instead of 4.

    Inputs: input [B, I] or [I]; (h_0, c_0) each [B, H] or [H], zeros when omitted.
    Outputs: (h_1, c_1), each [B, H] (or [H] for unbatched input).

    Parameters: weight_ih [G*H, I], weight_hh [G*H, H], bias_ih and bias_hh [G*H],
    weight_ch [P, H] (diagonal) or [P*H, H] (full); G = 3 coupled else 4, P = 2 coupled else 3.
    """

    _first_suffix = ""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, peephole=None,
                 coupled: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self._init_variant(input_size, hidden_size, bias, peephole, coupled)
        factory = {"device": device, "dtype": dtype}
        self._make_parameters("", self.input_size, self.hidden_size, 0, factory)
        self.reset_parameters()

    @classmethod
    def from_torch(cls, cell: nn.LSTMCell) -> LSTMCell:
        """A vanilla lstm_fused.LSTMCell with the options, device, dtype and weights of `cell`
        (weight_ih [4H, I], weight_hh [4H, H], bias_ih and bias_hh [4H])."""
        if not isinstance(cell, nn.LSTMCell):
            raise TypeError(f"LSTMCell.from_torch: expected a torch.nn.LSTMCell, got "
                            f"{type(cell).__name__}")
        weight = cell.weight_ih
        ours = LSTMCell(cell.input_size, cell.hidden_size, bias=cell.bias, device=weight.device,
                        dtype=weight.dtype)
        ours.load_state_dict(cell.state_dict())
        return ours.train(cell.training)

    def to_torch(self) -> nn.LSTMCell:
        """The torch.nn.LSTMCell with this cell's options, device, dtype and weights; only for
        the vanilla variant (peephole=None, coupled=False), which is exactly nn.LSTMCell."""
        _require_vanilla(self, "to_torch")
        weight = self.weight_ih
        theirs = nn.LSTMCell(self.input_size, self.hidden_size, bias=self.bias,
                             device=weight.device, dtype=weight.dtype)
        theirs.load_state_dict(self.state_dict())
        return theirs.train(self.training)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + self._variant_repr()

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        """input [B, I] or [I]; hx (h_0, c_0) each [B, H] or [H] -> (h_1, c_1), same batching."""
        if not torch.is_grad_enabled():
            step = self._inference_step(input, hx)
            if step is not None:
                return step
        self._check_tensor("input", input, self.weight_ih, "the parameters")
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__}: expected input to be 1-D or 2-D, got "
                             f"{input.dim()}-D with shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: expected input with {self.input_size} "
                             f"features (input_size), got {input.shape[-1]}")
        batched = input.dim() == 2
        state_shape = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        if hx is None:
            zeros = input.new_zeros(state_shape)
            hx = (zeros, zeros)
        else:
            hx = self._unpack_hx(hx)
            for name, state in zip(("h_0", "c_0"), hx):
                self._check_tensor(name, state, input, "input")
                self._check_state(name, state, state_shape)
        if not batched:
            input, hx = input.unsqueeze(0), (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = functional.lstm_cell(input, hx[0], hx[1], *self._parameters_for(""),
                                    peephole=self.peephole, coupled=self.coupled)
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c


    # --- latency path (no_grad / inference_mode) ------------------------------------------------

    def _inference_step(self, input, hx):
        """(h_1 [B, H], c_1 [B, H]) from ONE op, torch.ops.lstm_fused.cell_step (both GEMMs and the
        fused kernel, nothing saved for backward), for a batched CPU input whose arguments are
        plainly valid, outside autocast and torch.compile; None otherwise: forward() then takes
        the general path, which checks every argument with its own error."""
        params = self._parameters  # a dict lookup, not nn.Module.__getattr__, per parameter
        w = params["weight_ih"]
        if (type(input) is not Tensor or input.dim() != 2 or not input.is_cpu or not w.is_cpu
                or input.dtype != w.dtype or input.shape[1] != self.input_size
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
            return None
        shape = (input.shape[0], self.hidden_size)
        if hx is None:
            h0 = c0 = input.new_zeros(shape)
        elif type(hx) is tuple and len(hx) == 2:
            h0, c0 = hx
            if not (type(h0) is Tensor and type(c0) is Tensor and h0.shape == shape
                    and c0.shape == shape and h0.dtype == c0.dtype == w.dtype and h0.is_cpu
                    and c0.is_cpu):
                return None
        else:
            return None
        return _cell_step(input, h0, c0, w, params["weight_hh"], params.get("bias_ih"),
                          params.get("bias_hh"), params.get("weight_ch"), self.peephole or "none",
                          self.coupled)


_cell_step = torch.ops.lstm_fused.cell_step.default


class LSTM(_VariantMixin, nn.Module):
    r"""Multi-layer LSTM, a drop-in replacement for torch.nn.LSTM with peephole and coupled-gate
    variants. Each layer runs as one fused op: the time loop is C++, each step is one recurrent
    GEMM plus one fused pointwise kernel, on CPU and CUDA.

    Args (as torch.nn.LSTM): input_size, hidden_size, num_layers=1, bias=True,
        batch_first=False, dropout=0.0 (between layers, in training), bidirectional=False,
        proj_size=0; and
        peephole: None, "diagonal" (or True) or "full" — the gates see the cell state
            (input and forget gates c_{t-1}, the output gate the new c_t);
        coupled: i = 1 - f (CIFG), 3 gate blocks instead of 4.

    Inputs: input [T, B, I] ([B, T, I] if batch_first), [T, I] unbatched, or a PackedSequence;
        optional (h_0 [D*L, B, R], c_0 [D*L, B, H]) with D = 2 if bidirectional else 1 and
        R = proj_size or H.
    Outputs: output [T, B, D*R] (or PackedSequence), (h_n [D*L, B, R], c_n [D*L, B, H]).

    Parameters per layer k (suffix _reverse for the backward direction): weight_ih_l{k}
    [G*H, I_k], weight_hh_l{k} [G*H, R], bias_ih_l{k}, bias_hh_l{k} [G*H],
    weight_ch_l{k} [P, H] (diagonal) or [P*H, H] (full), weight_hr_l{k} [R, H].
    """

    # The per-layer function; tests swap in lstm_fused.reference.lstm_layer (same signature).
    _layer_fn = staticmethod(functional.lstm_layer)
    _first_suffix = "_l0"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, peephole=None, coupled: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        self._init_variant(input_size, hidden_size, bias, peephole, coupled)
        if not isinstance(num_layers, numbers.Integral) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if not isinstance(proj_size, numbers.Integral) or proj_size < 0:
            raise ValueError(f"proj_size must be a non-negative integer, got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size ({proj_size}) must be smaller than hidden_size "
                             f"({hidden_size})")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=2)
        self.num_layers = int(num_layers)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = int(proj_size)
        self.mode = "LSTM"
        factory = {"device": device, "dtype": dtype}
        directions = 2 if self.bidirectional else 1
        R = self.proj_size or self.hidden_size
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else R * directions
            for suffix in self._suffixes(layer):
                self._make_parameters(suffix, layer_input, R, self.proj_size, factory)
        self.reset_parameters()

    @classmethod
    def from_torch(cls, lstm: nn.LSTM) -> LSTM:
        """A vanilla lstm_fused.LSTM (peephole=None, coupled=False) with the options, device,
        dtype, weights and training mode of `lstm`: same parameter names and shapes
        (weight_ih_l{k} [4H, I_k], weight_hh_l{k} [4H, R], biases [4H], weight_hr_l{k} [R, H]),
        so both compute the same function."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"LSTM.from_torch: expected a torch.nn.LSTM, got {type(lstm).__name__}")
        weight = lstm.weight_ih_l0
        with warnings.catch_warnings():  # nn.LSTM already warned about its own options
            warnings.simplefilter("ignore", UserWarning)
            ours = LSTM(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers,
                        bias=lstm.bias, batch_first=lstm.batch_first, dropout=lstm.dropout,
                        bidirectional=lstm.bidirectional, proj_size=lstm.proj_size,
                        device=weight.device, dtype=weight.dtype)
        ours.load_state_dict(lstm.state_dict())
        return ours.train(lstm.training)

    def to_torch(self) -> nn.LSTM:
        """The torch.nn.LSTM with this module's options, device, dtype, weights and training
        mode; only for the vanilla variant (peephole=None, coupled=False), which is exactly
        nn.LSTM."""
        _require_vanilla(self, "to_torch")
        weight = self.weight_ih_l0
        with warnings.catch_warnings():  # this module already warned about its own options
            warnings.simplefilter("ignore", UserWarning)
            theirs = nn.LSTM(self.input_size, self.hidden_size, num_layers=self.num_layers,
                             bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                             bidirectional=self.bidirectional, proj_size=self.proj_size,
                             device=weight.device, dtype=weight.dtype)
        theirs.load_state_dict(self.state_dict())
        return theirs.train(self.training)

    def _suffixes(self, layer):
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    @property
    def _output_size(self) -> int:
        return self.proj_size or self.hidden_size

    def flatten_parameters(self) -> None:
        """No-op, for nn.LSTM compatibility: the fused ops need no flat weight buffer."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + self._variant_repr()

    def _unpack_input(self, input):
        """(data [T, B, I] or packed [N, I], batch_sizes list or None, sorted_indices,
        unsorted_indices, batched, batch B), after checking input."""
        cls = type(self).__name__
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_tensor("input", data, self.weight_ih_l0, "the parameters")
            if data.dim() != 2:
                raise ValueError(f"{cls}: expected PackedSequence data of shape [N, input_size], "
                                 f"got {tuple(data.shape)}")
            sizes = as_batch_sizes(batch_sizes)
            check_batch_sizes(sizes, data.shape[0])
            return data, sizes, sorted_indices, unsorted_indices, True, sizes[0] if sizes else 0
        self._check_tensor("input", input, self.weight_ih_l0, "the parameters")
        if input.dim() not in (2, 3):
            raise ValueError(f"{cls}: expected input to be 2-D (unbatched) or 3-D, got "
                             f"{input.dim()}-D with shape {tuple(input.shape)}")
        batched = input.dim() == 3
        data = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            data = data.transpose(0, 1)
        return data, None, None, None, batched, data.shape[1]

    def forward(self, input, hx: tuple[Tensor, Tensor] | None = None):
        if not isinstance(input, (Tensor, PackedSequence)):
            raise TypeError(f"{type(self).__name__}: expected input to be a Tensor or "
                            f"PackedSequence, got {type(input).__name__}")
        data, batch_sizes, sorted_indices, unsorted_indices, batched, batch = (
            self._unpack_input(input))
        packed = batch_sizes is not None
        if data.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: expected input with {self.input_size} "
                             f"features (input_size), got {data.shape[-1]}")
        if (len(batch_sizes) if packed else data.shape[0]) == 0:
            # As torch.nn.LSTM, which refuses an empty sequence.
            raise ValueError(f"{type(self).__name__}: expected sequence length to be larger "
                             f"than 0, got input of shape {tuple(data.shape)}")

        directions = 2 if self.bidirectional else 1
        state_rows = self.num_layers * directions
        if hx is None:
            h0 = data.new_zeros(state_rows, batch, self._output_size)
            c0 = data.new_zeros(state_rows, batch, self.hidden_size)
        else:
            h0, c0 = self._unpack_hx(hx)
            for name, state in (("h_0", h0), ("c_0", c0)):
                self._check_tensor(name, state, data, "input")
            if not batched:
                for name, state in (("h_0", h0), ("c_0", c0)):
                    if state.dim() != 2:
                        raise ValueError(f"{type(self).__name__}: for unbatched 2-D input, "
                                         f"{name} should also be 2-D but got {state.dim()}-D")
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            self._check_state("h_0", h0, (state_rows, batch, self._output_size))
            self._check_state("c_0", c0, (state_rows, batch, self.hidden_size))
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
                c0 = c0.index_select(1, sorted_indices)

        layer_input = data
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                row = layer * directions + direction
                out, (h, c) = self._layer_fn(
                    layer_input, h0[row], c0[row], *self._parameters_for(suffix),
                    peephole=self.peephole, coupled=self.coupled, reverse=direction == 1,
                    batch_sizes=batch_sizes)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)

        if packed:
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices)
            output = PackedSequence(layer_input, input.batch_sizes, sorted_indices,
                                    unsorted_indices)
            return output, (h_n, c_n)
        output = layer_input
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)


def _require_vanilla(module, method):
    if module.peephole is not None or module.coupled:
        raise ValueError(f"{type(module).__name__}.{method}() needs the vanilla variant "
                         f"(peephole=None, coupled=False), the only one torch.nn has; this module "
                         f"has peephole={module.peephole!r}, coupled={module.coupled}")


class PeepholeLSTM(LSTM):
    """LSTM with diagonal peepholes (peephole="diagonal" preset); all LSTM arguments apply."""

    def __init__(self, *args, peephole="diagonal", **kwargs):
        super().__init__(*args, peephole=peephole, **kwargs)


class CoupledLSTM(LSTM):
    """LSTM with coupled input/forget gates, i = 1 - f (coupled=True preset)."""

    def __init__(self, *args, coupled=True, **kwargs):
        super().__init__(*args, coupled=coupled, **kwargs)


class PeepholeLSTMCell(LSTMCell):
    """LSTMCell with diagonal peepholes (peephole="diagonal" preset)."""

    def __init__(self, *args, peephole="diagonal", **kwargs):
        super().__init__(*args, peephole=peephole, **kwargs)


class CoupledLSTMCell(LSTMCell):
    """LSTMCell with coupled input/forget gates, i = 1 - f (coupled=True preset)."""

    def __init__(self, *args, coupled=True, **kwargs):
        super().__init__(*args, coupled=coupled, **kwargs)
