"""Drop-in replacements for torch.nn.LSTM / torch.nn.LSTMCell with peephole and coupled-gate
variants, and for torch.nn.GRU / torch.nn.GRUCell. Parameter names, shapes, gate order and
calling conventions are torch.nn's, so `peephole=None, coupled=False` loads an nn.LSTM
state_dict (and GRU an nn.GRU one) and gives the same results.

LSTM and GRU are one layer stack (`_LayerStack`: layers x directions, the state rows, inter-layer
dropout, packing, batch_first, unbatched input) with the cell as a parameter: the per-layer
function (`_layer_fn`), the argument check, the state widths and each layer's arguments.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from ._checks import (
    check_cell_forward,
    check_cell_options,
    check_clips,
    check_gru_cell_forward,
    check_gru_forward,
    check_gru_zoneout,
    check_layer_norm_options,
    check_lstm_forward,
    check_regularizer_options,
    check_rnn_options,
    check_zoneout,
)
from .ops import BUILT_WITH_CUDA


class _RecurrentMixin:
    """What every module here has: the gate parameters weight_ih, weight_hh, bias_ih, bias_hh
    (G = self.num_gates blocks of H rows), torch.nn's initialisation and DropConnect."""

    def _make_gate_parameters(self, suffix, input_size, recurrent_size, factory):
        """Registers weight_ih{suffix} [G*H, input_size], weight_hh [G*H, recurrent_size] and,
        with bias, bias_ih and bias_hh [G*H]."""
        rows = self.num_gates * self.hidden_size
        self._add_parameter("weight_ih" + suffix, factory, rows, input_size)
        self._add_parameter("weight_hh" + suffix, factory, rows, recurrent_size)
        if self.bias:
            self._add_parameter("bias_ih" + suffix, factory, rows)
            self._add_parameter("bias_hh" + suffix, factory, rows)

    def _add_parameter(self, name, factory, *shape):
        self.register_parameter(name, nn.Parameter(torch.empty(*shape, **factory)))

    def reset_parameters(self) -> None:
        """Every parameter uniform in (-1/sqrt(H), 1/sqrt(H)), as torch.nn.LSTM / nn.GRU (in
        registration order, so the same seed draws the same weights as theirs)."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, weight in self.named_parameters():
            self._init_parameter(name, weight, bound)

    def _init_parameter(self, name: str, weight: Tensor, bound: float) -> None:
        nn.init.uniform_(weight, -bound, bound)

    def __setattr__(self, name, value):
        # torch.ao.quantization (quantize_dynamic, prepare, prepare_qat) assigns every module
        # its `qconfig` before swapping the modules it knows by exact type, which never
        # includes ours: the module would silently stay in floating point.
        if name == "qconfig":
            _refuse_quantization(self, value)
        super().__setattr__(name, value)

    def _zoneout_keeps(self, like: Tensor, steps: tuple[int, ...], widths: tuple[int, ...]):
        """The zoneout keep values of one layer/direction or cell call, one per state (self.zoneout
        holds a rate per state: (p_h, p_c) for the LSTM, (p_h,) for the GRU): None when off; in
        training fresh 0/1 keep masks [*steps, width] (LSTM: h [..., R], c [..., H]), each unit
        kept with its state's probability, drawn on like's device (functional.keep_mask: a key
        from torch's generator, the mask by a Philox kernel); in eval the rates themselves (the
        expectation, deterministic). A rate of 0 draws nothing."""
        if not any(self.zoneout):
            return None
        if not self.training:
            return self.zoneout
        return tuple(functional.keep_mask(like, (*steps, width), rate) if rate > 0 else 0.0
                     for rate, width in zip(self.zoneout, widths, strict=True))

    def _cell_repr(self) -> str:
        """A cell's extra_repr: torch.nn's (input_size, hidden_size, bias=False), then ours."""
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + self._options_repr()

    # --- the cells' latency path (no_grad / inference_mode): one op per step --------------

    @property
    def _step_parameter_names(self):
        """The parameters the cell step reads, in order: weights, biases if any (and the LSTM's
        peephole if any)."""
        return ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.bias else ())

    def _latency_step_weights(self, input) -> list[Tensor] | None:
        """The parameters of the one-op step (torch.ops.lstm_fused.cell_step / gru_cell_step),
        for a batched plain tensor input on a device with its kernel, outside autocast and
        torch.compile; None where the general path must run instead: DropConnect in training (a
        mask per call), a parameter replaced (weight norm, pruning, parametrizations). The op
        checks the rest (shapes, dtypes, devices): _one_op_step."""
        if self.training and self.weight_dropout > 0:
            return None
        if type(input) is not Tensor or input.dim() != 2:
            return None
        device_type = "cpu" if input.is_cpu else input.device.type
        if (device_type not in _STEP_DEVICES or torch.is_autocast_enabled(device_type)
                or torch.compiler.is_compiling()):
            return None
        params = self._parameters  # a dict lookup, not nn.Module.__getattr__, per parameter
        weights = []
        for name in self._step_parameter_names:
            weight = params.get(name)
            if weight is None:
                return None
            weights.append(weight)
        return weights

    @staticmethod
    def _one_op_step(op, *args):
        """op(*args), or None where the op refuses its arguments (a shape, dtype or device that
        does not fit, a state that is not a tensor): the caller then takes the general path,
        whose checks raise what torch.nn's cell raises. Checking them here first took about 2 us
        of a 15 us step at H = 64; the op checks them anyway."""
        try:
            return op(*args)
        except (RuntimeError, TypeError, ValueError):
            return None

    def _recurrent_weight(self, weight_hh: Tensor) -> Tensor:
        """weight_hh as this forward call uses it: in training with weight_dropout > 0 a
        DropConnect copy (one Bernoulli mask over the whole [G*H, R] matrix per call, kept
        entries scaled by 1/(1-p)), shared by every step and row; the parameter itself is never
        replaced, and autograd carries the mask into its gradient. Identity otherwise."""
        if self.training and self.weight_dropout > 0:
            return F.dropout(weight_hh, p=self.weight_dropout, training=True)
        return weight_hh


class _VariantMixin(_RecurrentMixin):
    """Parameters and repr shared by the LSTM cell and the LSTM layer stack."""

    def _init_variant(self, input_size, hidden_size, bias, peephole, coupled):
        """Sets the options; `peephole` is already checked and in canonical form."""
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.peephole = peephole
        self.coupled = coupled
        self.num_gates = 3 if self.coupled else 4
        self.num_peepholes = 2 if self.coupled else 3

    def _make_parameters(self, suffix, input_size, recurrent_size, proj_size, factory):
        """Registers weight_ih{suffix}, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr."""
        H, G, P = self.hidden_size, self.num_gates, self.num_peepholes

        def add(name, *shape):
            self._add_parameter(name + suffix, factory, *shape)

        self._make_gate_parameters(suffix, input_size, recurrent_size, factory)
        if self.peephole == "diagonal":
            add("weight_ch", P, H)
        elif self.peephole == "full":
            add("weight_ch", P * H, H)
        if self.layer_norm:
            add("weight_ln", G, H)
        if proj_size > 0:
            add("weight_hr", proj_size, H)

    def _init_regularizers(self, forget_bias, weight_dropout):
        """Sets the regularizer options (docs/regularizers.md); checks them first."""
        self.forget_bias, self.weight_dropout = check_regularizer_options(
            self.bias, forget_bias, weight_dropout)

    def _forget_rows(self) -> slice:
        """The forget gate's rows in bias_ih: block 1 of (i, f, g, o), block 0 of coupled (f, g, o)."""
        H = self.hidden_size
        return slice(0, H) if self.coupled else slice(H, 2 * H)

    def _add_forget_bias(self) -> None:
        """Adds forget_bias to the forget slice of every bias_ih (Keras unit_forget_bias)."""
        if self.forget_bias == 0:
            return
        with torch.no_grad():
            for name, bias in self.named_parameters():
                if name.startswith("bias_ih"):
                    bias[self._forget_rows()] += self.forget_bias

    def _parameters_for(self, suffix):
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr), None where absent."""
        return tuple(getattr(self, name + suffix, None) for name in
                     ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch", "weight_hr"))

    def reset_parameters(self) -> None:
        """Every parameter uniform in (-1/sqrt(H), 1/sqrt(H)), as torch.nn.LSTM; the layer
        norm's γ (weight_ln) ones, so a fresh norm only standardises; then forget_bias."""
        super().reset_parameters()
        self._add_forget_bias()

    def _init_parameter(self, name: str, weight: Tensor, bound: float) -> None:
        if name.startswith("weight_ln"):
            nn.init.ones_(weight)
        else:
            super()._init_parameter(name, weight, bound)

    # --- layer normalisation (docs/layer-norm.md) --------------------------------------------

    def _init_layer_norm(self, layer_norm, layer_norm_eps) -> None:
        """Sets layer_norm and layer_norm_eps; checks them first."""
        self.layer_norm, self.layer_norm_eps = check_layer_norm_options(layer_norm,
                                                                        layer_norm_eps)

    def _layer_norm_arguments(self, suffix) -> dict:
        """weight_ln{suffix} and layer_norm_eps as the functional layer and cell take them
        (nothing when layer_norm is off, so the op calls are those of before)."""
        if not self.layer_norm:
            return {}
        return {"weight_ln": getattr(self, "weight_ln" + suffix),
                "layer_norm_eps": self.layer_norm_eps}

    def _init_clips(self, cell_clip, proj_clip, proj_size):
        """Sets cell_clip and proj_clip: None when off (given as None or 0), else the float."""
        cell_clip, proj_clip = check_clips(cell_clip, proj_clip, proj_size > 0)
        self.cell_clip = cell_clip or None
        self.proj_clip = proj_clip or None

    def _clip_arguments(self) -> dict[str, float]:
        """The clips as the functional layer and cell take them (0.0 = off)."""
        return {"cell_clip": self.cell_clip or 0.0, "proj_clip": self.proj_clip or 0.0}

    def _init_zoneout(self, zoneout) -> None:
        """Sets zoneout as (p_h, p_c) floats (docs/regularizers.md); checks it first."""
        self.zoneout = check_zoneout(zoneout)

    def _options_repr(self) -> str:
        s = ""
        if self.peephole is not None:
            s += f", peephole={self.peephole!r}"
        if self.coupled:
            s += ", coupled=True"
        if self.forget_bias != 0:
            s += f", forget_bias={self.forget_bias}"
        if self.weight_dropout != 0:
            s += f", weight_dropout={self.weight_dropout}"
        if getattr(self, "cell_clip", None):
            s += f", cell_clip={self.cell_clip}"
        if getattr(self, "proj_clip", None):
            s += f", proj_clip={self.proj_clip}"
        if any(getattr(self, "zoneout", (0.0, 0.0))):
            s += f", zoneout={self.zoneout}"
        if getattr(self, "layer_norm", False):
            s += ", layer_norm=True"
            if self.layer_norm_eps != 1e-5:
                s += f", layer_norm_eps={self.layer_norm_eps}"
        return s

    # --- torch.ao.quantization: no quantized version, and no silent skip -------------------

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
        weight_ln = state_dict.get(prefix + "weight_ln" + suffix)
        if weight_ln is None and self.layer_norm:
            found.append(f"it has no weight_ln{suffix}, as with layer_norm=False")
        elif weight_ln is not None and not self.layer_norm:
            found.append(f"it has weight_ln{suffix}, as with layer_norm=True")
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
        forget_bias: added to the forget gate's slice of bias_ih by reset_parameters() (so
            also at construction); needs bias=True when non-zero.
        weight_dropout: DropConnect rate on weight_hh in training, in [0, 1); identity in eval.
        cell_clip (keyword): None or 0 (off), or clip c_1 to [-cell_clip, cell_clip] after the
            update (TensorFlow LSTMCell's cell_clip); the clipped c_1 is returned and seen by
            the output gate; zero gradient where the clip is active.
        zoneout (keyword): p or (p_h, p_c), each in [0, 1): in training each unit of h_1 / c_1
            keeps its value in h_0 / c_0 with that probability (a fresh Bernoulli mask per call),
            h_1 = m h_0 + (1 - m) h~_1; in eval the expectation p h_0 + (1 - p) h~_1.
        layer_norm, layer_norm_eps (keywords): normalise each gate over its H units before its
            activation (mean, biased variance, eps), scale by weight_ln and add the biases after
            the norm (TFLite's layer-norm LSTM; docs/layer-norm.md). Default off, eps 1e-5.
            Composes with zoneout.

    Inputs: input [B, I] or [I]; (h_0, c_0) each [B, H] or [H], zeros when omitted.
    Outputs: (h_1, c_1), each [B, H] (or [H] for unbatched input).

    Parameters: weight_ih [G*H, I], weight_hh [G*H, H], bias_ih and bias_hh [G*H],
    weight_ch [P, H] (diagonal) or [P*H, H] (full), weight_ln [G, H] (layer norm); G = 3
    coupled else 4, P = 2 coupled else 3.
    """

    _first_suffix = ""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, peephole=None,
                 coupled: bool = False, device=None, dtype=None, *, forget_bias: float = 0.0,
                 weight_dropout: float = 0.0, cell_clip=None, zoneout=0.0,
                 layer_norm: bool = False, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        peephole = check_cell_options(input_size, hidden_size, bias, peephole, coupled)
        self._init_variant(input_size, hidden_size, bias, peephole, coupled)
        self._init_regularizers(forget_bias, weight_dropout)
        self._init_clips(cell_clip, None, 0)
        self._init_zoneout(zoneout)
        self._init_layer_norm(layer_norm, layer_norm_eps)
        factory = {"device": device, "dtype": dtype}
        self._make_parameters("", self.input_size, self.hidden_size, 0, factory)
        self.reset_parameters()

    @classmethod
    def from_torch(cls, cell: nn.LSTMCell) -> LSTMCell:
        """A vanilla lstm_fused.LSTMCell with the options, device, dtype and weights of `cell`
        (weight_ih [4H, I], weight_hh [4H, H], bias_ih and bias_hh [4H])."""
        return _cell_from_torch(LSTMCell, nn.LSTMCell, cell)

    def to_torch(self) -> nn.LSTMCell:
        """The torch.nn.LSTMCell with this cell's options, device, dtype and weights; only for
        the vanilla variant (peephole=None, coupled=False), which is exactly nn.LSTMCell."""
        return _cell_to_torch(self, nn.LSTMCell)

    def extra_repr(self) -> str:
        return self._cell_repr()

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        """input [B, I] or [I]; hx (h_0, c_0) each [B, H] or [H] -> (h_1, c_1), same batching.
        Bad arguments raise what torch.nn.LSTMCell raises (lstm_fused._checks)."""
        if not torch.is_grad_enabled():
            step = self._inference_step(input, hx)
            if step is not None:
                return step
        check_cell_forward(self, input, hx)
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        weight_ih, weight_hh, *rest = self._parameters_for("")
        h, c = functional.fused_cell(input, hx[0], hx[1], weight_ih,
                                     self._recurrent_weight(weight_hh), *rest,
                                     peephole=self.peephole, coupled=self.coupled,
                                     **self._clip_arguments(),
                                     **self._layer_norm_arguments(""),
                                     zoneout=self._zoneout_keeps(
                                         input, (input.shape[0],), (self.hidden_size,) * 2))
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c


    # --- latency path (no_grad / inference_mode) ------------------------------------------------

    def _inference_step(self, input, hx):
        """(h_1 [B, H], c_1 [B, H]) from ONE op, torch.ops.lstm_fused.cell_step (both GEMMs and the
        fused kernel, nothing saved for backward), for a batched CPU or CUDA input whose
        arguments the op accepts (one device, one dtype, matching shapes), outside autocast and
        torch.compile; None otherwise: forward() then takes the general path, which checks every
        argument with its own error."""
        if any(self.zoneout):  # zoneout mixes in the previous state: general path
            return None
        if self.layer_norm:  # the norm runs in the layer op's row kernels: general path
            return None
        weights = self._latency_step_weights(input)
        if weights is None:
            return None
        if hx is None:
            h0 = c0 = input.new_zeros(input.shape[0], self.hidden_size)
        elif type(hx) is tuple and len(hx) == 2:
            h0, c0 = hx
        else:
            return None
        weight_ih, weight_hh, *rest = weights
        bias_ih, bias_hh = rest[:2] if self.bias else (None, None)
        weight_ch = rest[-1] if self.peephole else None
        return self._one_op_step(_cell_step, input, h0, c0, weight_ih, weight_hh, bias_ih,
                                 bias_hh, weight_ch, self.peephole or "none", self.coupled,
                                 self.cell_clip or 0.0)

    @property
    def _step_parameter_names(self):
        return (("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.bias else ())
                + (("weight_ch",) if self.peephole else ()))


_cell_step = torch.ops.lstm_fused.cell_step.default
_gru_cell_step = torch.ops.lstm_fused.gru_cell_step.default
_STEP_DEVICES = ("cpu", "cuda") if BUILT_WITH_CUDA else ("cpu",)  # where cell_step has a kernel


class _LayerStack(nn.Module):
    """The multi-layer, optionally bidirectional network around a per-layer function: what
    torch.nn.LSTM and nn.GRU share (torch's RNNBase), written once for LSTM and GRU.

    forward() runs layers x directions, each on state row layer * D + direction, concatenates
    the directions, applies inter-layer dropout in training, and handles PackedSequence (sorting
    the state rows), batch_first and unbatched input. The states are a tuple of tensors
    [D*L, B, width]: (h, c) for the LSTM, whose hx is that pair, (h,) for the GRU, whose hx is
    the tensor itself. A subclass names its cell:

      _layer_fn            the per-layer function (class attribute; the tests swap in the
                           reference twin): (input, *states, *weights, reverse=, batch_sizes=,
                           **options) -> (output, final states: a tuple, or one tensor)
      _check_forward       forward's argument check; returns the packed batch sizes or None
      _state_widths        the width of each state
      _layer_arguments     (weights, keyword options) of one layer and direction per call
      _direction_parameter_names   the parameter names of one direction, without suffix
    """

    _first_suffix = "_l0"

    def _init_stack(self, mode: str, num_layers: int, batch_first: bool, dropout: float,
                    bidirectional: bool, proj_size: int) -> None:
        """Sets torch.nn's layer-stack attributes (options already checked)."""
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        self.mode = mode
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

    def _suffixes(self, layer):
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    @property
    def _output_size(self) -> int:
        return self.proj_size or self.hidden_size

    # --- torch.nn's view of the parameters, for tools that read it (weight_norm, prune, ...) ---
    # Computed on each access from the module's current attributes, so it stays in sync when a
    # parameter is replaced (weight_norm / parametrizations, pruning, to(), load_state_dict):
    # torch.nn keeps a cached list and refreshes it in __setattr__ and _apply instead.

    @property
    def _all_weights(self) -> list[list[str]]:
        """Parameter names per layer and direction, in torch.nn's order."""
        names = self._direction_parameter_names()
        return [[name + suffix for name in names]
                for layer in range(self.num_layers) for suffix in self._suffixes(layer)]

    @property
    def _flat_weights_names(self) -> list[str]:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The tensors named by _flat_weights_names, as the module holds them now (Parameters,
        or plain tensors while a weight_norm or pruning reparametrization is applied)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """The parameters per layer and direction, as torch.nn's all_weights."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, for torch.nn compatibility: the fused ops need no flat weight buffer."""

    def _stack_repr(self) -> str:
        """torch.nn's extra_repr of the layer stack."""
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
        return s

    def forward(self, input, hx=None):
        """input [T, B, I] ([B, T, I] if batch_first), [T, I] or a PackedSequence; hx None or
        the initial states [D*L, B, width] ([D*L, width] for unbatched input) -> (output, the
        final states), as torch.nn.LSTM / nn.GRU. Bad arguments raise what torch.nn raises
        (lstm_fused._checks)."""
        batch_sizes = self._check_forward(input, hx)
        packed = batch_sizes is not None
        if packed:
            data, _, sorted_indices, unsorted_indices = input
            batched, batch = True, batch_sizes[0]
        else:
            sorted_indices = unsorted_indices = None
            batched = input.dim() == 3
            data = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                data = data.transpose(0, 1)
            batch = data.shape[1]

        directions = 2 if self.bidirectional else 1
        if hx is None:
            states = tuple(data.new_zeros(self.num_layers * directions, batch, width)
                           for width in self._state_widths)
        else:
            states = (hx,) if isinstance(hx, Tensor) else tuple(hx)
            if not batched:
                states = tuple(state.unsqueeze(1) for state in states)
            if sorted_indices is not None:
                states = tuple(state.index_select(1, sorted_indices) for state in states)

        # Per-call draws (zoneout masks) are [T, B, ...] for padded and packed input alike
        # (packed: step t uses rows :batch_sizes[t]), so no row's draws depend on another's length.
        steps = (len(batch_sizes) if packed else data.shape[0], batch)
        layer_input = data
        finals: list[list[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                row = layer * directions + direction
                weights, options = self._layer_arguments(suffix, data, steps)
                out, final = self._layer_fn(layer_input, *(state[row] for state in states),
                                            *weights, reverse=direction == 1,
                                            batch_sizes=batch_sizes, **options)
                outputs.append(out)
                for collected, state in zip(finals, (final,) if isinstance(final, Tensor)
                                            else final, strict=True):
                    collected.append(state)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        finals = [torch.stack(collected) for collected in finals]

        if packed:
            if unsorted_indices is not None:
                finals = [state.index_select(1, unsorted_indices) for state in finals]
            output = PackedSequence(layer_input, input.batch_sizes, sorted_indices,
                                    unsorted_indices)
        elif not batched:
            output, finals = layer_input.squeeze(1), [state.squeeze(1) for state in finals]
        else:
            output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        return output, (finals[0] if len(finals) == 1 else tuple(finals))


class LSTM(_VariantMixin, _LayerStack):
    r"""Multi-layer LSTM, a drop-in replacement for torch.nn.LSTM with peephole and coupled-gate
    variants. Each layer runs as one fused op: the time loop is C++, each step is one recurrent
    GEMM plus one fused pointwise kernel, on CPU and CUDA.

    Args (as torch.nn.LSTM): input_size, hidden_size, num_layers=1, bias=True,
        batch_first=False, dropout=0.0 (between layers, in training), bidirectional=False,
        proj_size=0; and
        peephole: None, "diagonal" (or True) or "full" — the gates see the cell state
            (input and forget gates c_{t-1}, the output gate the new c_t);
        coupled: i = 1 - f (CIFG), 3 gate blocks instead of 4;
        forget_bias: added to the forget gate's slice of every bias_ih_l{k} by
            reset_parameters() (so also at construction); needs bias=True when non-zero;
        weight_dropout: DropConnect rate on every weight_hh_l{k} in training, in [0, 1): each
            layer and direction draws its own mask per forward call; identity in eval.
        cell_clip, proj_clip (keywords): None or 0 (off), or clip every c_t to
            [-cell_clip, cell_clip] after the update, and the projected h_t (needs proj_size) to
            [-proj_clip, proj_clip] (TensorFlow LSTMCell's options); the clipped values are the
            states and outputs; zero gradient where a clip is active.
        zoneout (keyword): p or (p_h, p_c), each in [0, 1): in training every unit of h_t / c_t
            keeps its previous value with that probability (fresh Bernoulli masks per call,
            layer and direction), h_t = m h_{t-1} + (1 - m) h~_t, applied in the fused time loop
            (with a projection to the projected h); in eval the expectation
            p h_{t-1} + (1 - p) h~_t. The zoned values are the states and the outputs.
        layer_norm, layer_norm_eps (keywords): normalise each gate over its H units before its
            activation, scale by weight_ln_l{k}, add the biases after the norm (TFLite's
            layer-norm LSTM; docs/layer-norm.md). Default off, eps 1e-5. Composes with
            zoneout (the norm sees the step's computed c, the zoned values are the states).

    Inputs: input [T, B, I] ([B, T, I] if batch_first), [T, I] unbatched, or a PackedSequence;
        optional (h_0 [D*L, B, R], c_0 [D*L, B, H]) with D = 2 if bidirectional else 1 and
        R = proj_size or H.
    Outputs: output [T, B, D*R] (or PackedSequence), (h_n [D*L, B, R], c_n [D*L, B, H]).

    Parameters per layer k (suffix _reverse for the backward direction): weight_ih_l{k}
    [G*H, I_k], weight_hh_l{k} [G*H, R], bias_ih_l{k}, bias_hh_l{k} [G*H],
    weight_ch_l{k} [P, H] (diagonal) or [P*H, H] (full), weight_ln_l{k} [G, H] (layer norm),
    weight_hr_l{k} [R, H].
    """

    # The per-layer function, called with arguments checked already; tests swap in
    # lstm_fused.reference.lstm_layer (same signature).
    _layer_fn = staticmethod(functional.fused_layer)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, peephole=None, coupled: bool = False, device=None,
                 dtype=None, *, forget_bias: float = 0.0, weight_dropout: float = 0.0,
                 cell_clip=None, proj_clip=None, zoneout=0.0, layer_norm: bool = False,
                 layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        peephole = check_rnn_options(input_size, hidden_size, num_layers, bias, batch_first,
                                      dropout, bidirectional, proj_size, peephole, coupled)
        self._init_variant(input_size, hidden_size, bias, peephole, coupled)
        self._init_regularizers(forget_bias, weight_dropout)
        self._init_clips(cell_clip, proj_clip, proj_size)
        self._init_zoneout(zoneout)
        self._init_layer_norm(layer_norm, layer_norm_eps)
        self._init_stack("LSTM", num_layers, batch_first, dropout, bidirectional, proj_size)
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

    # --- the cell of the layer stack (_LayerStack) ----------------------------------------

    def _check_forward(self, input, hx):
        return check_lstm_forward(self, input, hx)

    @property
    def _state_widths(self) -> tuple[int, int]:
        return (self._output_size, self.hidden_size)  # (h: R, c: H)

    def _layer_arguments(self, suffix, like, steps):
        """(weights, options) of fused_layer for one layer and direction: the parameters with
        weight_hh through DropConnect, the variant, clips, zoneout masks and layer norm."""
        weight_ih, weight_hh, *rest = self._parameters_for(suffix)
        weights = (weight_ih, self._recurrent_weight(weight_hh), *rest)
        options = {"peephole": self.peephole, "coupled": self.coupled,
                   **self._clip_arguments(),
                   "zoneout": self._zoneout_keeps(like, steps,
                                                  (self._output_size, self.hidden_size)),
                   **self._layer_norm_arguments(suffix)}
        return weights, options

    def _direction_parameter_names(self) -> list[str]:
        """nn.LSTM's order (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr); peepholes add
        weight_ch before weight_hr, layer norm weight_ln after weight_ch."""
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        names += ["weight_ch"] if self.peephole is not None else []
        names += ["weight_ln"] if self.layer_norm else []
        names += ["weight_hr"] if self.proj_size > 0 else []
        return names

    def extra_repr(self) -> str:
        return self._stack_repr() + self._options_repr()


def _refuse_quantization(module, qconfig) -> None:
    """What torch.ao.quantization gets when it reaches one of our modules (it assigns `qconfig`):
    with a qconfig (it was asked to quantize this module) a NotImplementedError, without one (it
    quantizes other modules of the model) a warning that this one stays in floating point."""
    name = type(module).__name__
    if isinstance(module, _VariantMixin):
        variant = f" (peephole={module.peephole!r}, coupled={module.coupled})"
        vanilla = module.peephole is None and not module.coupled
        torch_name = "LSTMCell" if isinstance(module, LSTMCell) else "LSTM"
        what = "the vanilla variant is"
    else:  # the GRU: always its torch.nn counterpart (less DropConnect)
        variant, vanilla, torch_name, what = "", True, name, "it is"
    advice = (f"convert it with {name}.to_torch() before quantizing ({what} exactly "
              f"torch.nn.{torch_name})"
              if vanilla else "torch has no quantized peephole or coupled-gate LSTM")
    if qconfig is not None:
        raise NotImplementedError(
            f"lstm_fused.{name}{variant} cannot be quantized by torch.ao.quantization, which "
            f"would leave it in floating point without saying so: {advice}; or keep it in "
            f"floating point by leaving it out of qconfig_spec / qconfig")
    warnings.warn(f"torch.ao.quantization leaves lstm_fused.{name}{variant} in floating "
                  f"point (it quantizes only its own module types): {advice}", stacklevel=4)


def _cell_from_torch(ours: type, theirs: type, cell):
    """The `ours` cell (LSTMCell, GRUCell: the vanilla class) with the options, device, dtype,
    weights and training mode of `cell`, a torch.nn `theirs`; a TypeError for anything else."""
    if not isinstance(cell, theirs):
        raise TypeError(f"{ours.__name__}.from_torch: expected a torch.nn.{theirs.__name__}, got "
                        f"{type(cell).__name__}")
    weight = cell.weight_ih
    result = ours(cell.input_size, cell.hidden_size, bias=cell.bias, device=weight.device,
                  dtype=weight.dtype)
    result.load_state_dict(cell.state_dict())
    return result.train(cell.training)


def _cell_to_torch(cell, theirs: type):
    """The torch.nn `theirs` cell with the options, device, dtype, weights and training mode of
    our `cell` (only what torch.nn has: _require_vanilla)."""
    _require_vanilla(cell, "to_torch")
    weight = cell.weight_ih
    result = theirs(cell.input_size, cell.hidden_size, bias=cell.bias, device=weight.device,
                    dtype=weight.dtype)
    result.load_state_dict(cell.state_dict())
    return result.train(cell.training)


def _require_vanilla(module, method):
    """The module is exactly its torch.nn counterpart (a GRU has no variant options, only
    weight_dropout), or a ValueError says which option is not."""
    if getattr(module, "peephole", None) is not None or getattr(module, "coupled", False):
        raise ValueError(f"{type(module).__name__}.{method}() needs the vanilla variant "
                         f"(peephole=None, coupled=False), the only one torch.nn has; this module "
                         f"has peephole={module.peephole!r}, coupled={module.coupled}")
    if module.weight_dropout != 0:
        raise ValueError(f"{type(module).__name__}.{method}(): torch.nn has no DropConnect; this "
                         f"module has weight_dropout={module.weight_dropout} (build it with "
                         f"weight_dropout=0 to convert it)")
    if any(getattr(module, "zoneout", (0.0, 0.0))):
        raise ValueError(f"{type(module).__name__}.{method}(): torch.nn has no zoneout; this "
                         f"module has zoneout={module.zoneout} (build it with zoneout=0 to "
                         f"convert it)")
    if getattr(module, "layer_norm", False):
        raise ValueError(f"{type(module).__name__}.{method}() needs a module without layer "
                         f"normalisation (torch.nn has none); this module has layer_norm=True")
    clips = {name: getattr(module, name, None) for name in ("cell_clip", "proj_clip")}
    if any(clips.values()):
        raise ValueError(f"{type(module).__name__}.{method}() needs a module without state "
                         f"clipping (torch.nn has none); this module has "
                         + ", ".join(f"{name}={value}" for name, value in clips.items() if value))


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


class LayerNormLSTM(LSTM):
    """LSTM with layer-normalised gates (layer_norm=True preset; docs/layer-norm.md)."""

    def __init__(self, *args, layer_norm=True, **kwargs):
        super().__init__(*args, layer_norm=layer_norm, **kwargs)


class LayerNormLSTMCell(LSTMCell):
    """LSTMCell with layer-normalised gates (layer_norm=True preset)."""

    def __init__(self, *args, layer_norm=True, **kwargs):
        super().__init__(*args, layer_norm=layer_norm, **kwargs)


# --- GRU -------------------------------------------------------------------------------------


class _GRUMixin(_RecurrentMixin):
    """The GRU's options and gate count, shared by GRU and GRUCell."""

    num_gates = 3  # (r, z, n)

    def _init_gru(self, input_size, hidden_size, bias, weight_dropout, zoneout) -> None:
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        _, self.weight_dropout = check_regularizer_options(bias, 0.0, weight_dropout)
        self.zoneout = check_gru_zoneout(zoneout)  # (p_h,): one rate for the one state

    def _options_repr(self) -> str:
        s = f", weight_dropout={self.weight_dropout}" if self.weight_dropout != 0 else ""
        return s + (f", zoneout={self.zoneout[0]}" if self.zoneout[0] != 0 else "")


class GRU(_GRUMixin, _LayerStack):
    r"""Multi-layer GRU, a drop-in replacement for torch.nn.GRU (its equations, gate order
    (r, z, n), parameters, initialisation and calling conventions). Each layer runs as one
    fused op: the time loop is C++, each step one recurrent GEMM plus one fused pointwise
    kernel, on CPU and CUDA.

        r = σ(W_ir x + b_ir + W_hr h + b_hr)
        z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
        h' = (1 − z) ⊙ n + z ⊙ h

    Args (as torch.nn.GRU): input_size, hidden_size, num_layers=1, bias=True,
        batch_first=False, dropout=0.0 (between layers, in training), bidirectional=False,
        device, dtype; and
        weight_dropout (keyword): DropConnect rate on every weight_hh_l{k} in training, in
            [0, 1): each layer and direction draws its own mask per forward call; identity in
            eval.
        zoneout (keyword): p in [0, 1): in training every unit of h_t keeps its previous value
            with probability p (fresh Bernoulli masks per call, layer and direction),
            h_t = m h_{t-1} + (1 - m) h~_t, in the fused time loop; in eval the expectation
            p h_{t-1} + (1 - p) h~_t. The zoned values are the states and the outputs.

    Inputs: input [T, B, I] ([B, T, I] if batch_first), [T, I] unbatched, or a PackedSequence;
        optional h_0 [D*L, B, H] ([D*L, H] unbatched), D = 2 if bidirectional else 1.
    Outputs: output [T, B, D*H] ([B, T, D*H] if batch_first, [T, D*H] unbatched, or a
        PackedSequence), h_n [D*L, B, H] ([D*L, H] unbatched).

    Parameters per layer k (suffix _reverse for the backward direction): weight_ih_l{k}
    [3H, I_k] (I_0 = input_size, else D*H), weight_hh_l{k} [3H, H], bias_ih_l{k},
    bias_hh_l{k} [3H]; all uniform in (-1/sqrt(H), 1/sqrt(H)) at initialisation.
    """

    # The per-layer function, called with arguments checked already; tests swap in
    # lstm_fused.reference.gru_layer (same signature).
    _layer_fn = staticmethod(functional.fused_gru_layer)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, weight_dropout: float = 0.0,
                 zoneout: float = 0.0) -> None:
        super().__init__()
        check_rnn_options(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                          bidirectional)
        self._init_gru(input_size, hidden_size, bias, weight_dropout, zoneout)
        self._init_stack("GRU", num_layers, batch_first, dropout, bidirectional, 0)
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in self._suffixes(layer):
                self._make_gate_parameters(suffix, layer_input, hidden_size, factory)
        self.reset_parameters()

    @classmethod
    def from_torch(cls, gru: nn.GRU) -> GRU:
        """An lstm_fused.GRU with the options, device, dtype, weights and training mode of
        `gru`: same parameter names and shapes, so both compute the same function."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"GRU.from_torch: expected a torch.nn.GRU, got {type(gru).__name__}")
        weight = gru.weight_ih_l0
        with warnings.catch_warnings():  # nn.GRU already warned about its own options
            warnings.simplefilter("ignore", UserWarning)
            ours = cls(gru.input_size, gru.hidden_size, num_layers=gru.num_layers, bias=gru.bias,
                       batch_first=gru.batch_first, dropout=gru.dropout,
                       bidirectional=gru.bidirectional, device=weight.device,
                       dtype=weight.dtype)
        ours.load_state_dict(gru.state_dict())
        return ours.train(gru.training)

    def to_torch(self) -> nn.GRU:
        """The torch.nn.GRU with this module's options, device, dtype, weights and training
        mode (only without weight_dropout, which torch.nn has not)."""
        _require_vanilla(self, "to_torch")
        weight = self.weight_ih_l0
        with warnings.catch_warnings():  # this module already warned about its own options
            warnings.simplefilter("ignore", UserWarning)
            theirs = nn.GRU(self.input_size, self.hidden_size, num_layers=self.num_layers,
                            bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                            bidirectional=self.bidirectional, device=weight.device,
                            dtype=weight.dtype)
        theirs.load_state_dict(self.state_dict())
        return theirs.train(self.training)

    # --- the cell of the layer stack (_LayerStack) ----------------------------------------

    def _check_forward(self, input, hx):
        return check_gru_forward(self, input, hx)

    @property
    def _state_widths(self) -> tuple[int]:
        return (self.hidden_size,)

    def _layer_arguments(self, suffix, like, steps):
        """(weight_ih, weight_hh through DropConnect, bias_ih, bias_hh) and the zoneout keeps."""
        weights = (getattr(self, "weight_ih" + suffix),
                   self._recurrent_weight(getattr(self, "weight_hh" + suffix)),
                   getattr(self, "bias_ih" + suffix, None), getattr(self, "bias_hh" + suffix, None))
        keeps = self._zoneout_keeps(like, steps, (self.hidden_size,))
        return weights, {"zoneout": keeps[0] if keeps else None}

    def _direction_parameter_names(self) -> list[str]:
        return ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])

    def extra_repr(self) -> str:
        return self._stack_repr() + self._options_repr()


class GRUCell(_GRUMixin, nn.Module):
    r"""One GRU step, a drop-in replacement for torch.nn.GRUCell (same equations as GRU, gate
    order (r, z, n)). With autograd it runs the fused GRU layer op on a sequence of one step (cell
    and layer share one kernel path); under no_grad / inference_mode one forward-only op,
    torch.ops.lstm_fused.gru_cell_step (both GEMMs and the same fused kernel).

    Args (as torch.nn.GRUCell): input_size, hidden_size, bias=True, device, dtype; and
        weight_dropout (keyword): DropConnect rate on weight_hh in training, in [0, 1); identity
            in eval.
        zoneout (keyword): p in [0, 1), as GRU's: h_1 = m h_0 + (1 - m) h~_1 with a fresh mask
            per call in training, the expectation in eval.

    Inputs: input [B, I] or [I]; h_0 [B, H] or [H], zeros when omitted.
    Output: h_1 [B, H] (or [H] for unbatched input).

    Parameters: weight_ih [3H, I], weight_hh [3H, H], bias_ih and bias_hh [3H].
    """

    # The per-layer function the step runs on a one-step sequence; tests swap in
    # lstm_fused.reference.gru_layer.
    _layer_fn = staticmethod(functional.fused_gru_layer)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, weight_dropout: float = 0.0, zoneout: float = 0.0) -> None:
        super().__init__()
        check_cell_options(input_size, hidden_size, bias)
        self._init_gru(input_size, hidden_size, bias, weight_dropout, zoneout)
        self._make_gate_parameters("", input_size, hidden_size, {"device": device,
                                                                 "dtype": dtype})
        if not bias:  # as nn.GRUCell: the attributes exist, None
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @classmethod
    def from_torch(cls, cell: nn.GRUCell) -> GRUCell:
        """An lstm_fused.GRUCell with the options, device, dtype, weights and training mode of
        `cell`."""
        return _cell_from_torch(GRUCell, nn.GRUCell, cell)

    def to_torch(self) -> nn.GRUCell:
        """The torch.nn.GRUCell with this cell's options, device, dtype, weights and training
        mode (only without weight_dropout)."""
        return _cell_to_torch(self, nn.GRUCell)

    def extra_repr(self) -> str:
        return self._cell_repr()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """input [B, I] or [I]; hx h_0 [B, H] or [H] (zeros when None) -> h_1, same batching.
        Bad arguments raise what torch.nn.GRUCell raises (lstm_fused._checks)."""
        if not torch.is_grad_enabled() and not any(self.zoneout):
            weights = self._latency_step_weights(input)
            if weights is not None:
                if hx is None:
                    hx = input.new_zeros(input.shape[0], self.hidden_size)
                h = self._one_op_step(_gru_cell_step, input, hx, *weights,
                                      *((None, None) if not self.bias else ()))
                if h is not None:
                    return h
        check_gru_cell_forward(self, input, hx)
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            hx = hx.unsqueeze(0) if hx is not None else None
        if hx is None:
            hx = input.new_zeros(input.shape[0], self.hidden_size)
        keeps = self._zoneout_keeps(input, (1, input.shape[0]), (self.hidden_size,))
        _, h = self._layer_fn(input.unsqueeze(0), hx, self.weight_ih,
                              self._recurrent_weight(self.weight_hh), self.bias_ih, self.bias_hh,
                              reverse=False, batch_sizes=None,
                              zoneout=keeps[0] if keeps else None)
        return h if batched else h.squeeze(0)
