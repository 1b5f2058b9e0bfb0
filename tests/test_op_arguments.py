"""No op trusts its arguments: every tensor argument of every operator (torch.ops.lstm_fused and the
host shim's torch.ops.lstm_fused_host_shim), taken from the op's schema, is spoiled one at a time
(wrong dtype, device, layout, shape) in an otherwise valid call, and the call must raise a Python
exception of nn.LSTM's type that names the argument, before any kernel runs (the shared checks of
csrc/common.cpp). Arguments the kernels may get in any layout (strided, broadcast rows) give the
results of contiguous ones, and absent gradients (None, as autograd passes them) mean zeros."""

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    VARIANTS,
    assert_close,
    layer_op_args,
    load_host_shim,
    make_weight_ch,
    variant_id,
)

from lstm_fused.ops import OP_NAMES, ops

LIBRARIES = ("lstm_fused", "lstm_fused_host_shim")
SHIM_GEOMETRY = {"blocks": 0, "threads": 0}  # the shim's two extra arguments: the CUDA default
DTYPE = torch.float32
OPTIONAL_TENSOR = torch._C.OptionalType.ofTensor()


def op_of(library, name):
    if library == "lstm_fused_host_shim":
        load_host_shim()  # a test-only library, built and loaded on first use
    return getattr(getattr(torch.ops, library), name)


def schema_arguments(library, name):
    return op_of(library, name).default._schema.arguments


def tensor_arguments(library, name):
    """Names of the op's Tensor and Tensor? arguments, in schema order."""
    return [a.name for a in schema_arguments(library, name) if a.type.isSubtypeOf(OPTIONAL_TENSOR)]


# --- valid calls --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """A valid call of each op of one kind: the cell ops, the layer ops padded or packed, or the
    GRU's layer ops padded or packed."""

    kind: str  # "cell", "layer" or "gru_layer"
    variant: tuple = (None, False)  # the LSTM's; the GRU has none
    packed: bool = False
    proj: int = 0

    @property
    def id(self):
        if self.kind == "cell":
            return f"cell-{variant_id(self.variant)}"
        if self.kind == "gru_layer":
            return f"gru-{'packed' if self.packed else 'padded'}"
        return (f"layer-{variant_id(self.variant)}-{'packed' if self.packed else 'padded'}"
                f"-proj{self.proj}")

    def calls(self):
        """{op name: keyword arguments of a valid call} (float32, bias present; the backward ops
        take the outputs of the forward)."""
        g = torch.Generator().manual_seed(0)
        peephole, coupled = self.variant
        if self.kind == "cell":
            B, H = 3, 6
            forward = {"gates": torch.randn(B, (3 if coupled else 4) * H, generator=g),
                       "c_prev": torch.randn(B, H, generator=g),
                       "weight_ch": make_weight_ch(peephole, coupled, H, g),
                       "peephole": peephole or "none", "coupled": coupled, "cell_clip": 0.0}
            _, c, gates_out = ops.cell_forward(**forward)
            backward = {"grad_h": torch.randn(B, H, generator=g),
                        "grad_c": torch.randn(B, H, generator=g), "gates": gates_out,
                        "c_prev": forward["c_prev"], "c": c, "weight_ch": forward["weight_ch"],
                        "peephole": forward["peephole"], "coupled": coupled, "cell_clip": 0.0}
            return {"cell_forward": forward, "cell_backward": backward}
        if self.kind == "gru_layer":
            return self.gru_calls(g)
        # The arguments both libraries' layer_forward share (the shim has no need_backward), the
        # state clips (off), zoneout's keep masks and layer norm apart.
        clips = {"cell_clip": 0.0, "proj_clip": 0.0}
        zoneout = ("zoneout_h", "zoneout_c")
        # Layer norm (its γ [G, H] a tensor argument like the others) in the projected configs,
        # zoneout's keep masks in the others (the two together are refused).
        G, H = (3 if coupled else 4), 6  # layer_op_args' H
        layer_norm = {"weight_ln": torch.rand(G, H, generator=g) + 0.5 if self.proj else None}
        names = [a.name for a in schema_arguments("lstm_fused", "layer_forward")
                 if a.name not in ("need_backward", "layer_norm_eps", *clips, *zoneout,
                                   *layer_norm)]
        values = layer_op_args(self.variant, DTYPE, self.packed, False, self.proj, g)
        forward = dict(zip(names, values, strict=True))
        lead = forward["input"].shape[:-1]
        keeps = {name: None if self.proj
                 else (torch.rand(*lead, state.shape[-1], generator=g) < 0.5).to(DTYPE)
                 for name, state in zip(zoneout, (forward["h0"], forward["c0"]), strict=True)}
        forward = {**forward, **clips, **keeps, **layer_norm}
        output, h_n, c_n, gates, cells = ops.layer_forward(**forward, need_backward=True)
        grads = {name: torch.randn(t.shape, generator=g)
                 for name, t in [("grad_output", output), ("grad_h_n", h_n), ("grad_c_n", c_n)]}
        backward = {**grads, **forward, "output": output, "gates": gates, "cells": cells,
                    "need_input_grad": True}
        forward["layer_norm_eps"] = 1e-5  # the forward's only
        return {"layer_forward": forward, "layer_backward": backward}

    def gru_calls(self, g):
        """The GRU's layer ops: padded [T, B, I] with zoneout's keep mask, packed without."""
        T, B, I, H = 4, 3, 5, 6
        sizes = [3, 3, 2, 1] if self.packed else None
        x = torch.randn(sum(sizes), I, generator=g) if self.packed else torch.randn(T, B, I,
                                                                                     generator=g)
        keep = None if self.packed else (torch.rand(T, B, H, generator=g) < 0.5).to(DTYPE)
        forward = {"input": x, "h0": torch.randn(B, H, generator=g),
                   "weight_ih": torch.randn(3 * H, I, generator=g),
                   "weight_hh": torch.randn(3 * H, H, generator=g),
                   "bias_ih": torch.randn(3 * H, generator=g),
                   "bias_hh": torch.randn(3 * H, generator=g), "batch_sizes": sizes,
                   "reverse": False, "zoneout_h": keep}
        output, h_n, gates = ops.gru_layer_forward(**forward, need_backward=True)
        backward = {"grad_output": torch.randn(output.shape, generator=g),
                    "grad_h_n": torch.randn(h_n.shape, generator=g), **forward, "output": output,
                    "gates": gates, "need_input_grad": True}
        return {"gru_layer_forward": forward, "gru_layer_backward": backward}


GRU_CONFIGS = [Config("gru_layer", packed=packed) for packed in (False, True)]
CONFIGS = [Config("cell", variant) for variant in VARIANTS] + [
    Config("layer", variant, packed, proj)
    for variant in VARIANTS for packed in (False, True) for proj in (0, 2)] + GRU_CONFIGS

# For the tests that run the kernels: every cell variant, and every layer variant once, padded
# and packed, with and without a projection, in turn; the GRU padded and packed.
SAMPLE_CONFIGS = CONFIGS[:len(VARIANTS)] + [
    Config("layer", variant, packed=i % 2 == 1, proj=2 * (i // 2 % 2))
    for i, variant in enumerate(VARIANTS)] + GRU_CONFIGS

config_params = pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
sample_config_params = pytest.mark.parametrize("config", SAMPLE_CONFIGS,
                                               ids=[c.id for c in SAMPLE_CONFIGS])
library_params = pytest.mark.parametrize("library", LIBRARIES, ids=["ops", "host_shim"])


def full_call(library, name, kwargs):
    """The keyword arguments for the op of `library`, checked against its schema: every argument
    given, so an argument added to a schema is not forgotten here."""
    extra = (SHIM_GEOMETRY if library == "lstm_fused_host_shim"
             else {"need_backward": True} if name in ("layer_forward", "gru_layer_forward")
             else {})
    call = {**kwargs, **extra}
    assert set(call) == {a.name for a in schema_arguments(library, name)}, (name, sorted(call))
    return call


# --- spoilers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spoil:
    what: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    changes: Callable[[torch.Tensor], object]  # the property the spoil must change
    error: type  # nn.LSTM's exception type for it


def dtype(t):
    return t.dtype


def device(t):
    return t.device


def shape(t):
    return tuple(t.shape)


SPOILS = [
    Spoil("float16", lambda t: t.to(torch.float16), dtype, TypeError),
    Spoil("float64", lambda t: t.to(torch.float64), dtype, TypeError),
    Spoil("int32", lambda t: t.to(torch.int32), dtype, TypeError),
    Spoil("float8", lambda t: t.to(torch.float8_e4m3fn), dtype, TypeError),
    Spoil("meta device", lambda t: t.to("meta"), device, RuntimeError),
    Spoil("sparse", lambda t: t.to_sparse(), lambda t: t.layout, TypeError),
    Spoil("last dimension one short", lambda t: t[..., :-1], shape, ValueError),
    Spoil("one more dimension", lambda t: t.unsqueeze(0), shape, ValueError),
    Spoil("one dimension fewer", lambda t: t.select(-1, 0), shape, ValueError),
]
if torch.cuda.is_available():  # a second real device: the other arguments stay on the CPU
    SPOILS.append(Spoil("cuda device", lambda t: t.to("cuda"), device, RuntimeError))


def names(message, name):
    """Whether `message` names the argument `name` as a word (c is not in c_prev)."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) is not None


def expect_rejected(op, call, what, error, name):
    """None if op(**call) raises exactly `error` with a message naming `name`, else why not."""
    try:
        op(**call)
    except Exception as raised:  # noqa: BLE001 - its exact type is checked below
        if type(raised) is not error or not names(str(raised), name):
            return f"{what}: {type(raised).__name__} (expected {error.__name__} naming {name}): " \
                   f"{str(raised).splitlines()[0][:160]}"
        return None
    return f"{what}: no error"


# --- tests --------------------------------------------------------------------------------------


@library_params
@config_params
def test_each_spoiled_tensor_argument_raises_naming_it(library, config):
    """Each op of the config: the valid call passes; each present tensor argument, spoiled by
    each spoiler, makes it raise the spoiler's exception type with the argument's name (all
    failures of the config are listed together)."""
    failures, spoiled_count = [], 0
    for name, kwargs in config.calls().items():
        op = op_of(library, name)
        call = full_call(library, name, kwargs)
        op(**call)  # the valid call passes: the errors below come from the spoils
        for argument in tensor_arguments(library, name):
            original = call[argument]
            if original is None:
                continue  # absent here; test_every_tensor_argument_is_spoiled covers it
            for spoil in SPOILS:
                spoiled = spoil.apply(original)
                assert spoil.changes(spoiled) != spoil.changes(original), (argument, spoil.what)
                spoiled_count += 1
                failures.append(expect_rejected(op, {**call, argument: spoiled},
                                                f"{name}({argument}: {spoil.what})", spoil.error,
                                                argument))
    assert spoiled_count > 0
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


@library_params
def test_every_tensor_argument_is_spoiled(library):
    """Each Tensor and Tensor? argument of every op is present in some valid call above."""
    present = {name: set() for name in OP_NAMES}
    for config in CONFIGS:
        for name, kwargs in config.calls().items():
            present[name] |= {a for a in tensor_arguments(library, name) if kwargs[a] is not None}
    for name in OP_NAMES:
        assert present[name] == set(tensor_arguments(library, name)), name


def scalar_spoils(config, name, call):
    """(what, spoiled call, argument to be named) for the non-tensor arguments: peephole, coupled
    (the LSTM's) and, for the layer ops, batch_sizes."""
    if config.kind != "gru_layer":
        peephole = call["peephole"]
        for other in ("diag", *({"none", "diagonal", "full"} - {peephole})):
            yield f"peephole={other!r}", {**call, "peephole": other}, "peephole"
        yield "coupled flipped", {**call, "coupled": not call["coupled"]}, "coupled"
    if config.kind in ("layer", "gru_layer"):
        sizes = call["batch_sizes"]
        if sizes is None:
            T, B = call["input"].shape[:2]
            yield "batch_sizes for padded input", {**call, "batch_sizes": [B] * T}, "batch_sizes"
        else:
            yield "batch_sizes one short", {**call, "batch_sizes": sizes[:-1]}, "batch_sizes"
            yield "batch_sizes increasing", {**call, "batch_sizes": sizes[::-1]}, "batch_sizes"


@library_params
@config_params
def test_each_spoiled_scalar_argument_raises_naming_it(library, config):
    failures = []
    for name, kwargs in config.calls().items():
        op = op_of(library, name)
        call = full_call(library, name, kwargs)
        for what, spoiled, argument in scalar_spoils(config, name, call):
            failures.append(expect_rejected(op, spoiled, f"{name}({what})", ValueError, argument))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


def strided(t, layout):
    """A copy of t with other strides: "spaced" every other element (no dimension contiguous),
    "padded rows" (last dimension contiguous, rows further apart), "broadcast rows" (stride 0
    over the first dimension, where all rows are equal)."""
    if layout == "broadcast rows":
        return t[:1].expand(t.shape) if t.dim() >= 2 else t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    if layout == "spaced":
        wide[..., ::2] = t
        return wide[..., ::2]
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


@library_params
@sample_config_params
@pytest.mark.parametrize("layout", ["spaced", "padded rows", "broadcast rows"])
def test_strided_arguments_give_contiguous_results(library, config, layout):
    """The kernels read raw rows: every tensor argument in another layout must be made fit for
    them (or read through its strides), not read as if it were contiguous."""
    for name, kwargs in config.calls().items():
        op = op_of(library, name)
        call = full_call(library, name, kwargs)
        given = {k: strided(v, layout) if isinstance(v, torch.Tensor) else v
                 for k, v in call.items()}
        changed = [k for k, v in given.items()
                   if isinstance(v, torch.Tensor) and v.stride() != call[k].stride()]
        assert changed, name
        if layout == "broadcast rows":  # the contiguous twin of the broadcast values
            call = {k: v.contiguous() if isinstance(v, torch.Tensor) else v
                    for k, v in given.items()}
        else:
            assert all(not given[k].is_contiguous() for k in changed)
        for got, expected in zip(op(**given), op(**call), strict=True):
            assert_close(got, expected, DTYPE, f"{name} with {layout} arguments")


@library_params
@sample_config_params
def test_absent_gradients_mean_zeros(library, config):
    """The backward ops take None for a gradient that autograd did not compute: the same results
    as zeros there."""
    name = f"{config.kind}_backward"
    kwargs = config.calls()[name]
    call = full_call(library, name, kwargs)
    op = op_of(library, name)
    gradients = [a for a in tensor_arguments(library, name) if a.startswith("grad_")]
    assert gradients
    for absent in [[g] for g in gradients] + [gradients]:
        without = op(**{**call, **dict.fromkeys(absent)})
        zeros = op(**{**call, **{g: torch.zeros_like(call[g]) for g in absent}})
        for got, expected in zip(without, zeros, strict=True):
            assert_close(got, expected, DTYPE, f"{name} without {absent}")
