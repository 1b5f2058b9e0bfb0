"""Export models that use lstm_fused layers or cells to ONNX, with standard operators only.

    import lstm_fused.onnx
    lstm_fused.onnx.export(model, (x,), "model.onnx")      # batch and time dynamic
    # or, with torch's exporter directly:
    torch.onnx.export(model, (x,), "model.onnx", dynamo=True,
                      custom_translation_table=lstm_fused.onnx.translation_table())

What each fused op becomes (ONNX gate order is i, o, f, c; B = [Wb, Rb]; P order i, o, f):

- `layer_forward` with peephole "none" or "diagonal" and no projection: ONE standard `LSTM`
  node (direction "forward" or "reverse": a bidirectional module gives one node per layer and
  direction, as the module runs each direction as its own op). The weights are re-ordered into
  ONNX's gate order by Slice/Concat nodes that the exporter's optimiser folds into initializers.
  Coupled gates (i = 1 - f) use `input_forget=0` with the input-gate rows set to the NEGATED
  forget-gate rows (W, R, both biases and P_i = -w_cf): sigmoid(-z) = 1 - sigmoid(z), so this is
  exactly i = 1 - f in every runtime (onnxruntime's own input_forget=1 couples the other way,
  f = 1 - i, and onnx's reference evaluator ignores it).
- `layer_forward` with peephole "full", a projection (`proj_size`) or state clipping
  (`cell_clip`, `proj_clip`): the input projection of all steps as one MatMul, then a standard
  `Scan` over time whose body is the step written with standard ops (MatMul, Sigmoid, Tanh, Mul,
  Add, and `Clip` after the cell update and the projection). ONNX's LSTM has a `clip` attribute,
  but it clips the gate pre-activations, not the cell state, so it cannot express cell_clip.
- `layer_forward` with zoneout (eval mode: the rates, the expectation; training mode is refused):
  the same Scan, the keep values as two more scan inputs, and after the step (and its clips)
  h = m h_prev + (1 - m) h~, c likewise.
- `layer_forward` with layer norm (`layer_norm=True`): the same Scan, the input projection
  without biases, and in the body one `LayerNormalization` per gate (axis -1 over its H units,
  scale γ_k = row k of weight_ln, bias b_ih,k + b_hh,k, the module's epsilon) on the gate's
  pre-activation with its peephole term; needs opset_version >= 17 (LayerNormalization's).
- `cell_forward` (LSTMCell and variants): the same step ops, a dozen standard nodes (an LSTMCell's
  zoneout is plain torch ops around it, exported by torch).
- `gru_layer_forward` (GRU, GRUCell): ONE standard `GRU` node with `linear_before_reset=1`
  (PyTorch's n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), built by the same code as the LSTM
  node with the cell type as a parameter: gate blocks re-ordered from ours (r, z, n) to ONNX's
  (z, r, h), B = [Wb, Rb]. `export` then merges the forward and the reverse GRU node that read
  the same input into one `direction="bidirectional"` node, so a GRU is one node per layer (the
  translation table alone, used with torch.onnx.export directly, leaves the two nodes). A
  GRUCell is a GRU node over one step. With zoneout (eval mode: the rates) a `Scan` of the
  GRU's step and the mix with the previous h (the GRU node cannot express it).
- A `PackedSequence` cannot be exported (torch.export cannot trace `pack_padded_sequence`).

Importing this module imports onnx, onnxscript and onnx_ir; `import lstm_fused` does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import evaluator

from .ops import ops

__all__ = ["export", "translation_table"]


def translation_table() -> dict[Callable, Callable]:
    """{torch op overload: ONNX translation} for `torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)`. Merge it with your own table if you have one."""
    return {ops.layer_forward.default: _layer_forward, ops.cell_forward.default: _cell_forward,
            ops.gru_layer_forward.default: _gru_layer_forward}


def export(model: torch.nn.Module, args: tuple, f=None, *, dynamic: bool = True,
           opset_version: int | None = None, **kwargs: Any) -> torch.onnx.ONNXProgram:
    """Export `model` called on `args` to ONNX through `torch.onnx.export(dynamo=True)` with
    this module's translation table; returns the ONNXProgram and saves it to `f` if given.

    `dynamic=True` (default) makes every dimension of every tensor in `args` dynamic where the
    model allows it (`torch.export.Dim.AUTO`): batch and time stay free. Give example sizes of
    at least 2 (a size-1 dimension may be specialised). Passing `dynamic_shapes` yourself
    overrides this. `opset_version`: torch's default (20) when None; 14 to 17 are reached by
    checking that every node means the same at the lower opset (ours do: LSTM, Scan and the
    element-wise ops), with a ValueError naming the first node that does not. Other keyword
    arguments go to `torch.onnx.export` (e.g. `input_names`, `verbose`); a
    `custom_translation_table` of yours is merged with ours.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lstm_fused.onnx.export: expected model to be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, tuple):
        raise TypeError(f"lstm_fused.onnx.export: expected args to be a tuple of the model's "
                        f"positional inputs, got {type(args).__name__}")
    if opset_version is not None and (not isinstance(opset_version, int)
                                      or opset_version < MIN_OPSET):
        raise ValueError(f"lstm_fused.onnx.export: opset_version must be an int >= {MIN_OPSET} "
                         f"(the LSTM and GRU operators as used here), got {opset_version!r}")
    _refuse_training_regularizers(model)
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    if dynamic and "dynamic_shapes" not in kwargs and "dynamic_axes" not in kwargs:
        kwargs["dynamic_shapes"] = torch.utils._pytree.tree_map(_auto_dims, args)
    lower = opset_version is not None and opset_version < _TORCHLIB_OPSET
    program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=table,
                                opset_version=None if lower else opset_version, **kwargs)
    _merge_bidirectional(program.model.graph, _MERGED_CELLS)
    if lower:
        _lower_opset(program.model, opset_version)
    if f is not None:
        program.save(f)
    return program


def _refuse_training_regularizers(model: torch.nn.Module) -> None:
    """A ValueError for a module of ours (LSTM, GRU and their cells) in training mode with
    weight_dropout > 0 or zoneout: the export would freeze one random mask into the graph (or
    export a random op). In eval mode DropConnect is the identity, zoneout its expectation, and
    the export is the inference function."""
    from .modules import GRU, LSTM, GRUCell, LSTMCell  # modules imports the ops translated here

    ours = (LSTM, LSTMCell, GRU, GRUCell)
    for name, module in model.named_modules():
        if (isinstance(module, ours) and module.training
                and any(getattr(module, "zoneout", ()))):
            raise ValueError(
                f"lstm_fused.onnx.export: {name or 'the model'} ({type(module).__name__}) is in "
                f"training mode with zoneout={module.zoneout}, which draws random masks on each "
                f"call; call model.eval() before exporting (in eval mode zoneout is its "
                f"expectation, p h_(t-1) + (1 - p) h~_t, which is exported)")
        if (isinstance(module, ours) and module.training
                and module.weight_dropout > 0):
            raise ValueError(
                f"lstm_fused.onnx.export: {name or 'the model'} ({type(module).__name__}) is in "
                f"training mode with weight_dropout={module.weight_dropout}, which draws a "
                f"random mask on each call; call model.eval() before exporting (DropConnect is "
                f"the identity in eval mode)")


MIN_OPSET = 14
_TORCHLIB_OPSET = 18  # the opset torch's exporter builds with; it cannot convert below it


def _lower_opset(model: ir.Model, target: int) -> None:
    """Relabel `model` to opset `target` after checking that each node (also in Scan bodies)
    has the same inputs and attributes there: the later versions of our operators only added
    types or optional attributes. Raises ValueError naming a node that differs."""
    current = model.opset_imports.get("", target)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            raise ValueError(f"lstm_fused.onnx.export: node {node.name!r} is of domain "
                             f"{node.domain!r}, which opset_version cannot lower")
        try:
            old = onnx.defs.get_schema(node.op_type, target, "")
        except onnx.defs.SchemaError:
            old = None
        new = onnx.defs.get_schema(node.op_type, current, "")
        if old is None or not _same_interface(node, old, new):
            raise ValueError(f"lstm_fused.onnx.export: node {node.name!r} ({node.op_type}) is "
                             f"not the same operator at opset_version={target}; export with "
                             f"opset_version >= {_TORCHLIB_OPSET}")
    model.opset_imports[""] = target
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def _same_interface(node: ir.Node, old, new) -> bool:
    """The node's inputs and attributes mean the same in schema `old` as in `new`."""
    if old.since_version == new.since_version:
        return True
    variadic = old.inputs and old.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    return ((variadic or len(node.inputs) <= len(old.inputs))
            and [p.name for p in old.inputs] == [p.name for p in new.inputs][:len(old.inputs)]
            and set(node.attributes) <= set(old.attributes))


def _auto_dims(value):
    if isinstance(value, torch.Tensor):
        return {axis: torch.export.Dim.AUTO for axis in range(value.dim())}
    return None


# --- building nodes ----------------------------------------------------------------------------


class _Nodes:
    """Records ONNX nodes with onnx_ir: `g.Sigmoid(x)`, `g.Slice(x, starts, ends, axes)`,
    `g.LSTM(..., _outputs=3)`. Attributes are keyword arguments. The same code builds the
    exported graph and the body of a Scan."""

    def __init__(self):
        self.tape = ir.tape.Tape()

    def __getattr__(self, op_type: str):
        def node(*inputs, _outputs: int = 1, **attributes):
            if _outputs == 1:
                return self.tape.op(op_type, inputs, attributes)
            return self.tape.op_multi_out(op_type, inputs, attributes, num_outputs=_outputs)
        return node

    def ints(self, *values: int) -> ir.Value:
        return self.tape.op("Constant", [], {"value": ir.tensor(np.array(values, np.int64))})

    def clip(self, x: ir.Value, bound: float, dtype: ir.DataType) -> ir.Value:
        """x clipped to [-bound, bound] (x itself when bound is 0: no clipping)."""
        if not bound > 0:
            return x
        def scalar(value):
            value = ir.tensor(np.array(value, dtype.numpy()))
            return self.tape.op("Constant", [], {"value": value})

        return self.Clip(x, scalar(-bound), scalar(bound))

    def rows(self, x: ir.Value, start: int, stop: int, axis: int = 0) -> ir.Value:
        """x[start:stop] along `axis`."""
        return self.Slice(x, self.ints(start), self.ints(stop), self.ints(axis))


def _emit(g: _Nodes, outputs: list[ir.Value]):
    """Hands the recorded nodes to torch's exporter (the graph it is translating the current op
    into) and returns `outputs` as the exporter's own values (through Identity nodes, which its
    optimiser removes)."""
    recorder = evaluator.default()
    if not hasattr(recorder, "nodes"):
        raise RuntimeError("lstm_fused.onnx: this translation runs only inside "
                           "torch.onnx.export(..., dynamo=True)")
    recorder.nodes.extend(g.tape.nodes)
    identity = recorder.opset.Identity
    return tuple(identity(value) for value in outputs)


def _gate_names(coupled: bool, cell: str = "LSTM") -> tuple[str, ...]:
    """Our gate blocks, in the order of the rows of weight_ih / weight_hh / the biases (the
    GRU's are nn.GRU's: reset, update, new)."""
    if cell == "GRU":
        return ("r", "z", "n")
    return ("f", "g", "o") if coupled else ("i", "f", "g", "o")


# The gate blocks in the order of ONNX's LSTM node (i, o, f, c) and GRU node (z, r, h), in our
# names (g = c: the cell candidate; n = h: the GRU's new gate).
_ONNX_GATES = {"LSTM": ("i", "o", "f", "g"), "GRU": ("z", "r", "n")}


def _peephole_names(coupled: bool) -> tuple[str, ...]:
    """Our peephole rows (diagonal) or [H, H] blocks (full), in the order of weight_ch."""
    return ("f", "o") if coupled else ("i", "f", "o")


def _hidden_size(gate_rows, coupled: bool, cell: str = "LSTM") -> int:
    """H from G*H, the gate rows of the weights (static, unlike the states' sizes)."""
    if not isinstance(gate_rows, int):
        raise TypeError(f"lstm_fused.onnx: the gate size must be static, got {gate_rows}")
    return gate_rows // len(_gate_names(coupled, cell))


# --- the cell step with standard ops (cells, and the Scan body) --------------------------------


def _peephole_terms(g: _Nodes, weight_ch, peephole: str, coupled: bool, H: int) -> dict:
    """{gate: weight} for the peephole terms: a row [H] (diagonal: c * w) or the transposed block
    [H, H] (full: c @ W_ck.T). Empty without peepholes."""
    if peephole == "none":
        return {}
    terms = {}
    for k, gate in enumerate(_peephole_names(coupled)):
        if peephole == "diagonal":
            terms[gate] = g.Reshape(g.rows(weight_ch, k, k + 1), g.ints(H))
        else:
            terms[gate] = g.Transpose(g.rows(weight_ch, k * H, (k + 1) * H), perm=[1, 0])
    return terms


def _step(g: _Nodes, z, c_prev, peepholes: dict, peephole: str, coupled: bool, H: int,
          cell_clip: float = 0.0, dtype: ir.DataType | None = None, norms: dict | None = None):
    """One step after the GEMMs: z [B, G*H] (our gate order), c_prev [B, H] -> (h, c), as
    lstm_fused.reference._step; with coupled gates i = sigmoid(-(z_f + peep_f)) = 1 - f;
    cell_clip > 0 clips c (of `dtype`) after the update. `norms` (layer norm): {gate: a
    function of the gate's pre-activation (with its peephole term) -> the normalised one}."""
    blocks = {gate: g.rows(z, k * H, (k + 1) * H, axis=-1)
              for k, gate in enumerate(_gate_names(coupled))}

    def pre(gate, c):
        value = blocks[gate]
        if gate in peepholes:
            term = (g.Mul(c, peepholes[gate]) if peephole == "diagonal"
                    else g.MatMul(c, peepholes[gate]))
            value = g.Add(value, term)
        return norms[gate](value) if norms else value

    z_f = pre("f", c_prev)
    f = g.Sigmoid(z_f)
    i = g.Sigmoid(g.Neg(z_f)) if coupled else g.Sigmoid(pre("i", c_prev))
    c = g.clip(g.Add(g.Mul(f, c_prev), g.Mul(i, g.Tanh(pre("g", c_prev)))), cell_clip, dtype)
    o = g.Sigmoid(pre("o", c))
    return g.Mul(o, g.Tanh(c)), c


def _layer_norms(g: _Nodes, body: _Nodes, weight_ln, shift, coupled: bool, H: int,
                 eps: float) -> dict:
    """{gate: v -> LayerNormalization(v) (a node of `body`) over its H units, scale γ_k, bias
    shift_k (nodes of the outer graph `g`)}; shift [G*H] (b_ih + b_hh) or None."""
    norms = {}
    for k, gate in enumerate(_gate_names(coupled)):
        scale = g.Squeeze(g.rows(weight_ln, k, k + 1), g.ints(0))
        bias = None if shift is None else g.rows(shift, k * H, (k + 1) * H)

        def norm(v, scale=scale, bias=bias):
            return body.LayerNormalization(v, scale, bias, axis=-1, epsilon=float(eps))
        norms[gate] = norm
    return norms


def _cell_forward(gates, c_prev, weight_ch, peephole, coupled, cell_clip=0.0):
    """cell_forward(gates [B, G*H], c_prev [B, H], ...) -> (h [B, H], c [B, H]); gates_out,
    saved for the backward, is not exported."""
    g = _Nodes()
    H = _hidden_size(gates.shape[-1], coupled)
    h, c = _step(g, gates, c_prev, _peephole_terms(g, weight_ch, peephole, coupled, H),
                 peephole, coupled, H, cell_clip, gates.dtype)
    return _emit(g, [h, c])


# --- the layer ---------------------------------------------------------------------------------


def _layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                   batch_sizes, reverse, peephole, coupled, need_backward=True, cell_clip=0.0,
                   proj_clip=0.0, zoneout_h=None, zoneout_c=None, weight_ln=None,
                   layer_norm_eps=1e-5):
    """layer_forward(input [T, B, I], h0 [B, R], c0 [B, H], ...) -> (output [T, B, R], h_n, c_n):
    one LSTM node, or a Scan for peephole="full", projections and clips. The op's two last outputs
    (gates and cells, saved for the backward) are not exported, so need_backward changes
    nothing here."""
    _refuse_packed(batch_sizes)
    g = _Nodes()
    H = _hidden_size(weight_ih.shape[0], coupled)
    zoneout = (zoneout_h, zoneout_c)
    if (peephole == "full" or weight_hr is not None or cell_clip > 0 or proj_clip > 0
            or any(k is not None for k in zoneout) or weight_ln is not None):
        outputs = _scan_layer(g, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                              weight_hr, bool(reverse), peephole, bool(coupled), H, cell_clip,
                              proj_clip, zoneout, weight_ln, layer_norm_eps)
    else:
        outputs = _rnn_node(g, "LSTM", input, (h0, c0), weight_ih, weight_hh, bias_ih, bias_hh,
                            bool(reverse), H, peephole=peephole, coupled=bool(coupled),
                            weight_ch=weight_ch)
    return _emit(g, outputs)


def _gru_layer_forward(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, reverse,
                       need_backward=True, zoneout_h=None):
    """gru_layer_forward(input [T, B, I], h0 [B, H], ...) -> (output [T, B, H], h_n [B, H]): one
    GRU node (linear_before_reset=1), or with zoneout (eval: the rates) a Scan. The op's last
    output (gates, saved for the backward) is not exported."""
    _refuse_packed(batch_sizes)
    g = _Nodes()
    H = _hidden_size(weight_ih.shape[0], False, "GRU")
    if zoneout_h is not None:
        return _emit(g, _gru_scan_layer(g, input, h0, weight_ih, weight_hh, bias_ih, bias_hh,
                                        bool(reverse), H, zoneout_h))
    return _emit(g, _rnn_node(g, "GRU", input, (h0,), weight_ih, weight_hh, bias_ih, bias_hh,
                              bool(reverse), H))


def _refuse_packed(batch_sizes) -> None:
    if batch_sizes is not None:
        raise ValueError("lstm_fused.onnx: a PackedSequence input cannot be exported; export "
                         "the model on a padded tensor")


def _zoneout(g: _Nodes, keep, previous, computed, dtype: ir.DataType):
    """m previous + (1 - m) computed (lstm_math.h zoneout), m the keep values (of `dtype`)."""
    one = g.tape.op("Constant", [], {"value": ir.tensor(np.array(1, dtype.numpy()))})
    one_minus = g.Sub(one, keep)
    return g.Add(g.Mul(keep, previous), g.Mul(one_minus, computed))


def _bias(g: _Nodes, bias_ih, bias_hh, rows: int):
    """(bias_ih, bias_hh) with zeros [rows] for a missing one; None when both are missing."""
    if bias_ih is None and bias_hh is None:
        return None
    present = bias_ih if bias_ih is not None else bias_hh
    zeros = g.ConstantOfShape(g.ints(rows),
                              value=ir.tensor(np.zeros(1, present.dtype.numpy())))
    return (bias_ih if bias_ih is not None else zeros,
            bias_hh if bias_hh is not None else zeros)


def _onnx_gate_order(g: _Nodes, w, H: int, cell: str = "LSTM", coupled: bool = False):
    """Rows of w ([G*H, ...] or [G*H]) from our gate order to ONNX's (_ONNX_GATES[cell]); a
    coupled LSTM's i rows are the negated f rows."""
    block = {gate: g.rows(w, k * H, (k + 1) * H)
             for k, gate in enumerate(_gate_names(coupled, cell))}
    if cell == "LSTM" and coupled:
        block["i"] = g.Neg(block["f"])
    return g.Concat(*(block[gate] for gate in _ONNX_GATES[cell]), axis=0)


def _rnn_node(g: _Nodes, cell: str, input, states, weight_ih, weight_hh, bias_ih, bias_hh,
              reverse: bool, H: int, peephole: str = "none", coupled: bool = False,
              weight_ch=None) -> list:
    """One standard ONNX `LSTM` or `GRU` node (`cell`) for one direction of a layer: input
    [T, B, I], states (h0, c0) or (h0,) [B, H] -> [output [T, B, H], *final states [B, H]].
    W, R and B = [Wb, Rb] are our weights in ONNX's gate order; the LSTM gets the diagonal
    peepholes P, the GRU linear_before_reset=1 (PyTorch's GRU)."""
    def one_direction(x):  # [...] -> [1, ...]: the num_directions axis of ONNX's LSTM / GRU
        return g.Unsqueeze(x, g.ints(0))

    def onnx_order(w):
        return _onnx_gate_order(g, w, H, cell, coupled)

    W = one_direction(onnx_order(weight_ih))
    R = one_direction(onnx_order(weight_hh))
    biases = _bias(g, bias_ih, bias_hh, weight_ih.shape[0])
    B = None if biases is None else one_direction(
        g.Concat(*(onnx_order(b) for b in biases), axis=0))
    inputs = [input, W, R, B, None, *(one_direction(state) for state in states)]
    attributes = {"hidden_size": H, "direction": "reverse" if reverse else "forward"}
    if cell == "GRU":
        attributes["linear_before_reset"] = 1
    else:
        attributes["input_forget"] = 0
        if peephole == "diagonal":
            rows = {gate: g.rows(weight_ch, k, k + 1)
                    for k, gate in enumerate(_peephole_names(coupled))}
            p_i = g.Neg(rows["f"]) if coupled else rows["i"]
            inputs.append(g.Reshape(g.Concat(p_i, rows["o"], rows["f"], axis=0),
                                    g.ints(1, 3 * H)))
    Y, *finals = getattr(g, cell)(*inputs, _outputs=1 + len(states), **attributes)
    axis0, axis1 = g.ints(0), g.ints(1)
    return [g.Squeeze(Y, axis1), *(g.Squeeze(final, axis0) for final in finals)]


# --- one bidirectional node per layer (a post-pass of `export`) --------------------------------

_MERGED_CELLS = ("GRU",)  # the LSTM keeps a node per direction (docs/deploying.md)


def _merge_bidirectional(graph: ir.Graph, op_types=_MERGED_CELLS) -> None:
    """Replaces each pair of a "forward" and a "reverse" node of type `op_types` (as
    _rnn_node makes them) that read the same input X, with the same attributes otherwise and
    the same optional inputs present, by one node with direction="bidirectional": W, R, B and
    the initial states concatenated along the num_directions axis (constants are folded into
    one initializer), and the old outputs read back as Slices of the new ones ([T, 2, B, H]:
    axis 1; the final states [2, B, H]: axis 0). Other nodes are left alone."""
    def key(node):
        attributes = sorted((name, repr(attr.value)) for name, attr in node.attributes.items()
                            if name != "direction")
        present = tuple(value is not None for value in node.inputs[1:])
        return node.op_type, id(node.inputs[0]), present, tuple(attributes)

    waiting: dict = {}
    pairs = []
    for node in graph:
        if (node.op_type not in op_types or node.domain not in ("", "ai.onnx")
                or node.inputs[0] is None
                or (len(node.inputs) > 4 and node.inputs[4] is not None)):  # sequence_lens
            continue
        direction = node.attributes.get_string("direction", "forward")
        if direction not in ("forward", "reverse"):
            continue
        k = key(node)
        other = waiting.get(k)
        if other is not None and other[0] != direction:
            pairs.append((other[1], node) if direction == "reverse" else (node, other[1]))
            del waiting[k]
        elif other is None:
            waiting[k] = (direction, node)
    if not pairs:
        return
    for number, (forward, reverse) in enumerate(pairs):
        _merge_pair(graph, forward, reverse, f"lstm_fused_bidirectional{number}")
    graph.sort()


_RNN_INPUTS = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")


def _merge_pair(graph: ir.Graph, forward: ir.Node, reverse: ir.Node, name: str) -> None:
    """`forward` and `reverse` (same X) -> one bidirectional node `name` (_merge_bidirectional)."""
    added, indices = [], {}

    def index(v):  # a Slice bound or axis, one initializer per value
        if v not in indices:
            indices[v] = initializer(f"index{v}", np.array([v], np.int64))
        return indices[v]

    def initializer(suffix, array):
        tensor = ir.tensor(array)
        value = ir.Value(name=f"{name}_{suffix}", type=ir.TensorType(tensor.dtype),
                         shape=ir.Shape(tensor.shape), const_value=tensor)
        graph.register_initializer(value)
        return value

    def stack(k, a, b):  # [1, ...] and [1, ...] -> [2, ...] along num_directions
        if a is None:
            return None
        arrays = [ir.convenience.get_const_tensor(v) for v in (a, b)]
        if all(array is not None for array in arrays):
            return initializer(_RNN_INPUTS[k], np.concatenate([x.numpy() for x in arrays]))
        concat = ir.Node("", "Concat", [a, b], [ir.AttrInt64("axis", 0)],
                         name=f"{name}_{_RNN_INPUTS[k]}")
        added.append(concat)
        return concat.outputs[0]

    old_inputs = [*forward.inputs, *reverse.inputs]
    inputs = [forward.inputs[0], *(stack(k, a, b) for k, (a, b) in enumerate(
        zip(forward.inputs[1:], reverse.inputs[1:], strict=True), start=1))]
    attributes = dict(forward.attributes)
    attributes["direction"] = ir.AttrString("direction", "bidirectional")
    merged = ir.Node("", forward.op_type, inputs, attributes.values(),
                     num_outputs=len(forward.outputs), name=name)
    added.append(merged)
    for k, output in enumerate(merged.outputs):  # Y [T, 2, B, H]; Y_h, Y_c [2, B, H]
        axis = 1 if k == 0 else 0
        output.type = forward.outputs[k].type
        if forward.outputs[k].shape is not None:
            output.shape = ir.Shape([2 if d == axis else dim
                                     for d, dim in enumerate(forward.outputs[k].shape)])
        for row, old in enumerate((forward, reverse)):
            value = old.outputs[k]
            if not value.uses() and not value.is_graph_output():
                continue
            piece = ir.Node("", "Slice", [output, index(row), index(row + 1), index(axis)],
                            name=f"{name}_slice{k}_{row}")
            added.append(piece)
            part = piece.outputs[0]
            part.type, part.shape = value.type, value.shape
            if value.is_graph_output():  # the model's output keeps its name
                part.name, value.name = value.name, None
            ir.convenience.replace_all_uses_with(value, part, replace_graph_outputs=True)
    graph.insert_before(reverse, added)
    graph.remove([forward, reverse], safe=True)
    for value in old_inputs:  # the per-direction weights, now unused
        if (value is not None and value.is_initializer() and not value.uses()
                and not value.is_graph_input() and not value.is_graph_output()):
            del graph.initializers[value.name]


_scan_counter = itertools.count()


def _scan_layer(g: _Nodes, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                weight_hr, reverse, peephole, coupled, H, cell_clip=0.0, proj_clip=0.0,
                zoneout=(None, None), weight_ln=None, layer_norm_eps=1e-5):
    # Input projections of all steps at once: zx [T, B, G*H] = x W_ih^T + b_ih + b_hh (with
    # layer norm the biases come after the norm, in the body).
    zx = g.MatMul(input, g.Transpose(weight_ih, perm=[1, 0]))
    biases = _bias(g, bias_ih, bias_hh, weight_ih.shape[0])
    shift = None if biases is None else g.Add(*biases)
    if shift is not None and weight_ln is None:
        zx = g.Add(zx, shift)
    w_hh_t = g.Transpose(weight_hh, perm=[1, 0])
    w_hr_t = None if weight_hr is None else g.Transpose(weight_hr, perm=[1, 0])
    peepholes = _peephole_terms(g, weight_ch, peephole, coupled, H)

    # The body: (h_prev [B, R], c_prev [B, H], zx_t [B, G*H]) -> (h, c, output_t = h).
    body = _Nodes()
    dtype = ir.TensorType(input.dtype)
    batch = h0.shape[0]
    h_prev = ir.Value(type=dtype, shape=ir.Shape([batch, h0.shape[-1]]))
    c_prev = ir.Value(type=dtype, shape=ir.Shape([batch, H]))
    zx_t = ir.Value(type=dtype, shape=ir.Shape([batch, weight_ih.shape[0]]))
    z = body.Add(zx_t, body.MatMul(h_prev, w_hh_t))
    norms = (None if weight_ln is None
             else _layer_norms(g, body, weight_ln, shift, coupled, H, layer_norm_eps))
    h, c = _step(body, z, c_prev, peepholes, peephole, coupled, H, cell_clip, input.dtype, norms)
    if w_hr_t is not None:
        h = body.clip(body.MatMul(h, w_hr_t), proj_clip, input.dtype)
    # Zoneout (docs/regularizers.md): the keep values of step t [B, R] / [B, H] are scan inputs.
    keeps = []
    for keep, state, width in ((zoneout[0], h_prev, h0.shape[-1]), (zoneout[1], c_prev, H)):
        keeps.append(None if keep is None else ir.Value(
            type=dtype, shape=ir.Shape([batch, width])))
    if keeps[0] is not None:
        h = _zoneout(body, keeps[0], h_prev, h, input.dtype)
    if keeps[1] is not None:
        c = _zoneout(body, keeps[1], c_prev, c, input.dtype)
    scan_inputs = [zx_t, *(k for k in keeps if k is not None)]
    h_n, c_n, output = _scan(g, body, [h_prev, c_prev], [h, c], [h0, c0], scan_inputs,
                             [zx, *(k for k in zoneout if k is not None)], reverse)
    return [output, h_n, c_n]


def _scan(g: _Nodes, body: _Nodes, states: list, new_states: list, initial_states: list,
          step_inputs: list, sequences: list, reverse: bool) -> list:
    """A Scan over time of `body`: (states, step inputs) -> (new states, the first new state as
    the step's output), started from `initial_states`, the step inputs the time slices of
    `sequences`; returns [final states..., output [T, ...]]."""
    graph = ir.Graph([*states, *step_inputs], [*new_states, body.Identity(new_states[0])],
                     nodes=body.tape.nodes, name="lstm_fused_step")
    # Names are unique in the whole model, subgraphs included (ONNX's SSA rule).
    scan = next(_scan_counter)
    for k, value in enumerate([*states, *step_inputs, *(v for n in graph for v in n.outputs)]):
        value.name = f"lstm_fused_scan{scan}_{k}"
    directions = [1 if reverse else 0] * len(step_inputs)
    return g.Scan(*initial_states, *sequences, body=graph, num_scan_inputs=len(step_inputs),
                  scan_input_directions=directions, scan_output_directions=directions[:1],
                  _outputs=len(states) + 1)


def _gru_scan_layer(g: _Nodes, input, h0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, H,
                    zoneout_h):
    """A GRU layer as a Scan (the GRU node cannot mix in the previous state, as zoneout does):
    a = x W_ihᵀ + b_ih for all steps; per step b = h W_hhᵀ + b_hh, nn.GRU's update, then
    h_t = m h_{t-1} + (1 - m) h_t with m the step's keep values (the rates, in eval)."""
    a = g.MatMul(input, g.Transpose(weight_ih, perm=[1, 0]))
    if bias_ih is not None:
        a = g.Add(a, bias_ih)
    w_hh_t = g.Transpose(weight_hh, perm=[1, 0])
    body = _Nodes()
    dtype = ir.TensorType(input.dtype)
    batch = h0.shape[0]
    h_prev = ir.Value(type=dtype, shape=ir.Shape([batch, H]))
    a_t = ir.Value(type=dtype, shape=ir.Shape([batch, 3 * H]))
    keep = ir.Value(type=dtype, shape=ir.Shape([batch, H]))
    b = body.MatMul(h_prev, w_hh_t)
    if bias_hh is not None:
        b = body.Add(b, bias_hh)
    a_r, a_z, a_n = (body.rows(a_t, k * H, (k + 1) * H, axis=-1) for k in range(3))
    b_r, b_z, b_n = (body.rows(b, k * H, (k + 1) * H, axis=-1) for k in range(3))
    r, z = body.Sigmoid(body.Add(a_r, b_r)), body.Sigmoid(body.Add(a_z, b_z))
    n = body.Tanh(body.Add(a_n, body.Mul(r, b_n)))
    h = body.Add(n, body.Mul(z, body.Sub(h_prev, n)))
    h = _zoneout(body, keep, h_prev, h, input.dtype)
    h_n, output = _scan(g, body, [h_prev], [h], [h0], [a_t, keep], [a, zoneout_h], reverse)
    return [output, h_n]
