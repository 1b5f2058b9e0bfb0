"""The registered operators (schemas and device kernels are in C++, csrc/register.cpp): their
fake (meta) kernels for torch.compile / export, and their autograd formulas.

    torch.ops.lstm_fused.cell_forward(gates [B, G*H], c_prev [B, H], weight_ch, peephole, coupled,
        cell_clip=0.0)
        -> (h [B, H], c [B, H], gates_out [B, G*H])
    torch.ops.lstm_fused.layer_forward(input [T, B, I] | [N, I], h0 [B, R], c0 [B, H], weight_ih,
        weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, batch_sizes, reverse, peephole, coupled,
        need_backward=True, cell_clip=0.0, proj_clip=0.0, zoneout_h=None, zoneout_c=None,
        weight_ln=None, layer_norm_eps=1e-5)
        -> (output [T, B, R] | [N, R], h_n [B, R], c_n [B, H], gates, cells)
    torch.ops.lstm_fused.gru_layer_forward(input [T, B, I] | [N, I], h0 [B, H], weight_ih [3H, I],
        weight_hh [3H, H], bias_ih, bias_hh, batch_sizes, reverse, need_backward=True,
        zoneout_h=None)
        -> (output [T, B, H] | [N, H], h_n [B, H], gates [..., 4H])   (the GRU, nn.GRU's gates
        r, z, n; `gates` saves r, z, n and W_hn h_{t-1} + b_hn of every step; zoneout_h
        [..., H] the keep values of zoneout, as the LSTM's)
    torch.ops.lstm_fused.gru_cell_step(input [B, I], hx [B, H], weight_ih, weight_hh, bias_ih,
        bias_hh) -> h [B, H]       (forward only, nothing saved: GRUCell's latency path)

`peephole` is the string "none", "diagonal" or "full"; `gates`/`cells` are what the backward
needs (activated gates and cell states of every step); with need_backward=False (inference) they
are not written and come back empty. `cell_clip` > 0 clips every c_t to [-cell_clip, cell_clip]
after the update, `proj_clip` > 0 the projected h (TensorFlow LSTMCell's state clipping; 0 = off);
the gradient is zero where a clip is active. `zoneout_h` [T, B, R] | [N, R] and `zoneout_c`
[T, B, H] | [N, H] are zoneout's keep values (1 keeps a unit's previous value: 0/1 masks in
training, the rates p in eval, e.g. expanded; None = off): h_t = m_h h_{t-1} + (1 - m_h) h~_t and
likewise c (docs/regularizers.md); with zoneout_c `cells` is [..., 2H] (the computed c~_t, then the
zoned c_t). `weight_ln` [G, H] (γ) turns on layer normalisation of each gate over its H units
(docs/layer-norm.md; the biases are then added after the norm), and the saved `gates` rows are
[activated gates | x̂ (G*H) | (mean, rstd) per gate (2*G)]. Zoneout and layer norm together are
refused (not built yet).
The *_backward ops are what autograd calls for a first-order
backward; a backward that builds a graph (create_graph=True, for double backward) differentiates a
recomputation in torch ops instead (lstm_fused._double_backward).

Autocast (CPU and CUDA) kernels are registered in C++ (csrc/autocast.cpp): under torch.autocast the
forward ops run in the autocast dtype, the backward ops in the dtype of the forward they
differentiate (docs/gpu.md).
"""

import functools

import torch

from . import (
    _C,  # loading the library registers the operators
    _double_backward,
)

ops = torch.ops.lstm_fused
OP_NAMES = ("cell_forward", "cell_backward", "layer_forward", "layer_backward",
            "gru_layer_forward", "gru_layer_backward")
BUILT_WITH_CUDA = bool(_C.built_with_cuda)


def num_gates(coupled: bool) -> int:
    return 3 if coupled else 4


def _saved_width(gate_rows: int, gates: int, layer_norm: bool) -> int:
    """Columns of layer_forward's saved `gates` rows: G*H, or with layer norm 2*G*H + 2*G
    (the activated gates, x̂, and (mean, rstd) of each gate)."""
    return 2 * gate_rows + 2 * gates if layer_norm else gate_rows


# --- fake kernels: output shapes only --------------------------------------------------------


@torch.library.register_fake("lstm_fused::keep_mask")
def _keep_mask_fake(seed, size, p, dtype):
    return seed.new_empty(size, dtype=dtype)


@torch.library.register_fake("lstm_fused::cell_forward")
def _cell_forward_fake(gates, c_prev, weight_ch, peephole, coupled, cell_clip=0.0):
    return c_prev.new_empty(c_prev.shape), c_prev.new_empty(c_prev.shape), gates.new_empty(gates.shape)


@torch.library.register_fake("lstm_fused::cell_backward")
def _cell_backward_fake(grad_h, grad_c, gates, c_prev, c, weight_ch, peephole, coupled,
                        cell_clip=0.0):
    grad_weight_ch = (
        weight_ch.new_empty(weight_ch.shape) if peephole != "none" else c.new_empty(0)
    )
    return gates.new_empty(gates.shape), c_prev.new_empty(c_prev.shape), grad_weight_ch


@torch.library.register_fake("lstm_fused::cell_step")
def _cell_step_fake(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, peephole,
                    coupled, cell_clip=0.0):
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape)


@torch.library.register_fake("lstm_fused::layer_forward")
def _layer_forward_fake(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                        weight_hr, batch_sizes, reverse, peephole, coupled, need_backward=True,
                        cell_clip=0.0, proj_clip=0.0, zoneout_h=None, zoneout_c=None,
                        weight_ln=None, layer_norm_eps=1e-5):
    lead = input.shape[:-1]
    gate_rows, hidden, proj = weight_ih.shape[0], c0.shape[-1], h0.shape[-1]
    saved_width = _saved_width(gate_rows, num_gates(coupled), weight_ln is not None)
    cells_width = 2 * hidden if zoneout_c is not None else hidden
    saved = ((input.new_empty(*lead, saved_width), input.new_empty(*lead, cells_width))
             if need_backward else (input.new_empty(0), input.new_empty(0)))
    return (input.new_empty(*lead, proj), h0.new_empty(h0.shape), c0.new_empty(c0.shape), *saved)


@torch.library.register_fake("lstm_fused::layer_backward")
def _layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                         bias_ih, bias_hh, weight_ch, weight_hr, output, gates, cells,
                         batch_sizes, reverse, peephole, coupled, need_input_grad, cell_clip=0.0,
                         proj_clip=0.0, zoneout_h=None, zoneout_c=None, weight_ln=None):
    empty = input.new_empty(0)
    return (input.new_empty(input.shape) if need_input_grad else empty,
            h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            weight_ih.new_empty(weight_ih.shape), weight_hh.new_empty(weight_hh.shape),
            input.new_empty(weight_ih.shape[0]),
            weight_ch.new_empty(weight_ch.shape) if peephole != "none" else empty,
            weight_hr.new_empty(weight_hr.shape) if weight_hr is not None else empty,
            weight_ln.new_empty(weight_ln.shape) if weight_ln is not None else empty)


# --- autograd --------------------------------------------------------------------------------


def _cell_setup_context(ctx, inputs, output):
    gates, c_prev, weight_ch, peephole, coupled, *clip = inputs
    _, c, gates_out = output
    # The pre-activation gates only serve a double backward; keeping them costs no time.
    ctx.save_for_backward(gates_out, c_prev, c, weight_ch, gates)
    ctx.peephole, ctx.coupled = peephole, coupled
    ctx.cell_clip = clip[0] if clip else 0.0
    ctx.mark_non_differentiable(gates_out)
    _no_zero_gradients(ctx)


def _cell_backward(ctx, grad_h, grad_c, _grad_gates_out):
    gates_out, c_prev, c, weight_ch, gates = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        forward = functools.partial(_double_backward.cell_pointwise, peephole=ctx.peephole,
                                    coupled=ctx.coupled, cell_clip=ctx.cell_clip)
        grads = _double_backward.differentiable_gradients(
            forward, (gates, c_prev, weight_ch), (grad_h, grad_c))
        return *grads, *_no_grads(ctx, 3)
    grad_gates, grad_c_prev, grad_weight_ch = ops.cell_backward(
        grad_h, grad_c, gates_out, c_prev, c, weight_ch, ctx.peephole, ctx.coupled, ctx.cell_clip)
    return (grad_gates, grad_c_prev, grad_weight_ch if weight_ch is not None else None,
            *_no_grads(ctx, 3))


def _no_zero_gradients(ctx) -> None:
    """The backward receives None, not a tensor of zeros, for an output that got no gradient:
    autograd would otherwise allocate and fill zeros shaped like every unused output on each
    backward, the saved `gates` and `cells` included ([T*B, 4H], with layer norm [T*B, 2GH+2G]:
    about 7% of a layer-norm training step at T=100 B=64 H=256 on an AMD EPYC Zen 4, 1% without
    layer norm). The backward ops take each gradient as optional."""
    ctx.set_materialize_grads(False)


def _no_grads(ctx, tensors: int) -> tuple[None, ...]:
    """None for each of an op's non-tensor inputs, those after its first `tensors` inputs (how
    many were passed: trailing defaults may be left out)."""
    return (None,) * (len(ctx.needs_input_grad) - tensors)


torch.library.register_autograd(
    "lstm_fused::cell_forward", _cell_backward, setup_context=_cell_setup_context)


def _layer_setup_context(ctx, inputs, output):
    (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
     batch_sizes, reverse, peephole, coupled, *extra) = inputs
    need_backward = extra[:1]
    cell_clip, proj_clip = (list(extra[1:3]) + [0.0, 0.0])[:2]
    zoneout_h, zoneout_c = (list(extra[3:5]) + [None, None])[:2]
    weight_ln, layer_norm_eps = _layer_norm_inputs(extra)
    if need_backward and not need_backward[0]:
        raise RuntimeError("lstm_fused: layer_forward(need_backward=False) saved nothing for "
                           "backward, but an input requires grad; call it with need_backward=True")
    out, _, _, gates, cells = output
    ctx.save_for_backward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                          weight_hr, out, gates, cells, zoneout_h, zoneout_c, weight_ln)
    ctx.options = (batch_sizes, reverse, peephole, coupled)
    ctx.clips = (cell_clip, proj_clip)
    ctx.layer_norm_eps = layer_norm_eps
    ctx.mark_non_differentiable(gates, cells)
    _no_zero_gradients(ctx)


# Positions of layer_forward's layer-norm arguments (after the 13 leading ones, need_backward,
# the two clips and zoneout's two keep tensors).
_WEIGHT_LN, _LAYER_NORM_EPS = 18, 19


def _layer_norm_inputs(extra):
    """(weight_ln, layer_norm_eps) from layer_forward's arguments after `coupled` (trailing
    defaults may be left out)."""
    tail = list(extra[_WEIGHT_LN - 13:_LAYER_NORM_EPS - 13 + 1])
    return (tail[0] if tail else None), (tail[1] if len(tail) > 1 else 1e-5)


def _layer_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
     out, gates, cells, zoneout_h, zoneout_c, weight_ln) = ctx.saved_tensors
    batch_sizes, reverse, peephole, coupled = ctx.options
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        options = functools.partial(_double_backward.layer, batch_sizes=batch_sizes,
                                    reverse=reverse, peephole=peephole, coupled=coupled,
                                    cell_clip=ctx.clips[0], proj_clip=ctx.clips[1],
                                    zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                                    layer_norm_eps=ctx.layer_norm_eps)

        def forward(*tensors):  # the 9 layer tensors, then weight_ln
            return options(*tensors[:9], weight_ln=tensors[9])

        grads = _double_backward.differentiable_gradients(
            forward, (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr,
                      weight_ln), (grad_output, grad_h_n, grad_c_n))
        return _with_layer_norm_grad(ctx, tuple(grads[:9]) + (None,) * 4, grads[9])
    need_input_grad = ctx.needs_input_grad[0]
    (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_ch,
     grad_weight_hr, grad_weight_ln) = ops.layer_backward(
        grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
        weight_ch, weight_hr, out, gates, cells, batch_sizes, reverse, peephole, coupled,
        need_input_grad, *ctx.clips, zoneout_h, zoneout_c, weight_ln)

    def when(present, grad):
        return grad if present else None

    return _with_layer_norm_grad(ctx, (
        when(need_input_grad, grad_input), grad_h0, grad_c0, grad_weight_ih, grad_weight_hh,
        when(bias_ih is not None, grad_bias), when(bias_hh is not None, grad_bias),
        when(weight_ch is not None, grad_weight_ch), when(weight_hr is not None, grad_weight_hr),
        None, None, None, None), when(weight_ln is not None, grad_weight_ln))


def _with_layer_norm_grad(ctx, grads13, grad_weight_ln):
    """layer_forward's input gradients: the 13 leading ones, None for the options after them,
    and weight_ln's gradient at its position (when that argument was passed)."""
    grads = list(grads13) + [None] * (len(ctx.needs_input_grad) - 13)
    if len(grads) > _WEIGHT_LN:
        grads[_WEIGHT_LN] = grad_weight_ln
    return tuple(grads)


torch.library.register_autograd(
    "lstm_fused::layer_forward", _layer_backward, setup_context=_layer_setup_context)


# --- GRU ------------------------------------------------------------------------------------


@torch.library.register_fake("lstm_fused::gru_layer_forward")
def _gru_layer_forward_fake(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes,
                            reverse, need_backward=True, zoneout_h=None):
    lead, hidden = input.shape[:-1], h0.shape[-1]
    gates = input.new_empty(*lead, 4 * hidden) if need_backward else input.new_empty(0)
    return input.new_empty(*lead, hidden), h0.new_empty(h0.shape), gates


@torch.library.register_fake("lstm_fused::gru_layer_backward")
def _gru_layer_backward_fake(grad_output, grad_h_n, input, h0, weight_ih, weight_hh, bias_ih,
                             bias_hh, output, gates, batch_sizes, reverse, need_input_grad,
                             zoneout_h=None):
    rows = weight_ih.shape[0]
    return (input.new_empty(input.shape) if need_input_grad else input.new_empty(0),
            h0.new_empty(h0.shape), weight_ih.new_empty(weight_ih.shape),
            weight_hh.new_empty(weight_hh.shape), input.new_empty(rows), input.new_empty(rows))


@torch.library.register_fake("lstm_fused::gru_cell_step")
def _gru_cell_step_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh):
    return hx.new_empty(hx.shape)


def _gru_layer_setup_context(ctx, inputs, output):
    input, h0, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, reverse, *extra = inputs
    zoneout_h = extra[1] if len(extra) > 1 else None
    if extra and not extra[0]:
        raise RuntimeError("lstm_fused: gru_layer_forward(need_backward=False) saved nothing for "
                           "backward, but an input requires grad; call it with "
                           "need_backward=True")
    out, _, gates = output
    ctx.save_for_backward(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, out, gates, zoneout_h)
    ctx.options = (batch_sizes, reverse)
    ctx.mark_non_differentiable(gates)
    _no_zero_gradients(ctx)


def _gru_layer_backward(ctx, grad_output, grad_h_n, _grad_gates):
    input, h0, weight_ih, weight_hh, bias_ih, bias_hh, out, gates, zoneout_h = ctx.saved_tensors
    batch_sizes, reverse = ctx.options
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        forward = functools.partial(_double_backward.gru_layer, batch_sizes=batch_sizes,
                                    reverse=reverse, zoneout_h=zoneout_h)
        grads = _double_backward.differentiable_gradients(
            forward, (input, h0, weight_ih, weight_hh, bias_ih, bias_hh), (grad_output, grad_h_n))
        return *grads, *_no_grads(ctx, 6)
    need_input_grad = ctx.needs_input_grad[0]
    (grad_input, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias_ih,
     grad_bias_hh) = ops.gru_layer_backward(
        grad_output, grad_h_n, input, h0, weight_ih, weight_hh, bias_ih, bias_hh, out, gates,
        batch_sizes, reverse, need_input_grad, zoneout_h)
    return (grad_input if need_input_grad else None, grad_h0, grad_weight_ih, grad_weight_hh,
            grad_bias_ih if bias_ih is not None else None,
            grad_bias_hh if bias_hh is not None else None, *_no_grads(ctx, 6))


torch.library.register_autograd(
    "lstm_fused::gru_layer_forward", _gru_layer_backward, setup_context=_gru_layer_setup_context)


# --- the backward ops themselves are not differentiable ---------------------------------------
# Autograd never differentiates them: a backward that builds a graph takes the recomputation
# above. Only a direct call of torch.ops.lstm_fused.*_backward on tensors that require grad
# comes here, and gets a clear error instead of one from inside a kernel.


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "lstm_fused: the *_backward ops are not differentiable; differentiate the forward ops "
        "(cell_forward, layer_forward) instead, whose backward supports create_graph=True and "
        "double backward")


for _backward_op in ("lstm_fused::cell_backward", "lstm_fused::layer_backward",
                     "lstm_fused::gru_layer_backward"):
    torch.library.register_autograd(_backward_op, _no_double_backward)
