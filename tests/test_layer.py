"""The fused layer op and the LSTM module against torch.nn.LSTM and the reference."""

import io

import pytest
import torch
from conftest import VARIANTS, assert_close, grid, variant_params
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import reference

T, B, I, H, PROJ = 5, 4, 3, 6, 2
LENGTHS = [5, 4, 4, 2]  # for packed inputs (sorted: enforce_sorted=True and False both tested)


def make_input(mode, batch_first, dtype, generator, requires_grad=True):
    """(module input, a function turning the module output into a padded tensor)."""
    x = torch.randn(T, B, I, generator=generator, dtype=torch.float64).to(dtype)
    if mode == "unbatched":
        x = x[:, 0]
        return x.requires_grad_(requires_grad), lambda out: out
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    x.requires_grad_(requires_grad)
    if mode == "padded":
        return x, lambda out: out
    lengths = torch.tensor([LENGTHS[1], LENGTHS[0], LENGTHS[3], LENGTHS[2]])  # unsorted
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    return packed, lambda out: pad_packed_sequence(out, batch_first=batch_first)[0]


def grads_of(module, inputs, outputs):
    """Gradients of a fixed random projection of all outputs w.r.t. inputs and parameters."""
    g = torch.Generator().manual_seed(123)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
               for o in outputs)
    params = list(module.parameters())
    return torch.autograd.grad(loss, [inputs] + params, allow_unused=False)


def run(module, x, hx, to_padded):
    out, (h_n, c_n) = module(x, hx)
    return [to_padded(out), h_n, c_n]


def leaf_input(x):
    return x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x


@grid(num_layers=[1, 2, 3], bidirectional=[False, True], batch_first=[False, True],
      proj=[0, PROJ], mode=["padded", "packed", "unbatched"],
      dtype=[torch.float64, torch.float32],
      where=lambda mode, batch_first, **_: not (mode == "unbatched" and batch_first))
def test_vanilla_matches_torch_lstm(num_layers, bidirectional, batch_first, proj, mode, dtype):
    g = torch.Generator().manual_seed(num_layers * 100 + proj)
    kwargs = {"num_layers": num_layers, "bidirectional": bidirectional, "batch_first": batch_first,
              "proj_size": proj, "dtype": dtype}
    theirs = torch.nn.LSTM(I, H, **kwargs)
    ours = lstm_fused.LSTM(I, H, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x, to_padded = make_input(mode, batch_first, dtype, g)
    D, R = (2 if bidirectional else 1), proj or H
    state_batch = () if mode == "unbatched" else (B,)
    hx = (torch.randn(num_layers * D, *state_batch, R, generator=g, dtype=torch.float64).to(dtype),
          torch.randn(num_layers * D, *state_batch, H, generator=g, dtype=torch.float64).to(dtype))

    a, b = run(ours, x, hx, to_padded), run(theirs, x, hx, to_padded)
    for u, v, name in zip(a, b, ("output", "h_n", "c_n")):
        assert_close(u, v, dtype, name)
    for u, v in zip(grads_of(ours, leaf_input(x), a), grads_of(theirs, leaf_input(x), b)):
        assert_close(u, v, dtype, "gradient")


def as_reference(module):
    module._layer_fn = reference.lstm_layer
    return module


@variant_params
@grid(num_layers=[1, 2], bidirectional=[False, True], proj=[0, PROJ],
      mode=["padded", "packed", "unbatched"])
def test_variants_match_reference(variant, num_layers, bidirectional, proj, mode):
    peephole, coupled = variant
    g = torch.Generator().manual_seed(7)
    kwargs = {"num_layers": num_layers, "bidirectional": bidirectional, "proj_size": proj,
              "peephole": peephole, "coupled": coupled, "dtype": torch.float32}
    ours = lstm_fused.LSTM(I, H, **kwargs)
    ref = as_reference(lstm_fused.LSTM(I, H, **kwargs))
    ref.load_state_dict(ours.state_dict())
    x, to_padded = make_input(mode, False, torch.float32, g)
    a, b = run(ours, x, None, to_padded), run(ref, x, None, to_padded)
    for u, v, name in zip(a, b, ("output", "h_n", "c_n")):
        assert_close(u, v, torch.float32, name)
    for u, v in zip(grads_of(ours, leaf_input(x), a), grads_of(ref, leaf_input(x), b)):
        assert_close(u, v, torch.float32, "gradient")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_coupled_layer_matches_torch_lstm_through_identity(bidirectional):
    """A coupled LSTM equals nn.LSTM whose input-gate weights/biases are minus the forget gate's."""
    torch.manual_seed(0)
    ours = lstm_fused.CoupledLSTM(I, H, num_layers=2, bidirectional=bidirectional,
                                  dtype=torch.float64)
    theirs = torch.nn.LSTM(I, H, num_layers=2, bidirectional=bidirectional, dtype=torch.float64)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            f_block = p[:H]
            getattr(theirs, name).copy_(torch.cat([-f_block, p]))
    x = torch.randn(T, B, I, dtype=torch.float64)
    for u, v in zip(run(ours, x, None, lambda o: o), run(theirs, x, None, lambda o: o)):
        assert_close(u, v, torch.float64, "coupled vs nn.LSTM")


@variant_params
@pytest.mark.parametrize("case", ["one-layer", "two-layer-bidirectional", "projected", "packed",
                                  "packed-bidirectional-projected", "cell_clip",
                                  "cell_clip-packed-two-layer-bidirectional",
                                  "clips-projected", "clips-projected-packed"])
def test_gradcheck_layers(variant, case):
    """float64 gradcheck of the module; the clip cases (TensorFlow's cell_clip / proj_clip, small
    enough that some states are clipped: zero gradient there) are tests/test_clip.py's."""
    peephole, coupled = variant
    kwargs = {"peephole": peephole, "coupled": coupled, "dtype": torch.float64}
    if "clip" in case:
        kwargs.update(cell_clip=0.1, proj_clip=0.02 if "projected" in case else None)
    if "two-layer" in case:
        kwargs.update(num_layers=2)
    if "bidirectional" in case:
        kwargs.update(bidirectional=True)
    if "projected" in case:
        kwargs.update(proj_size=2)
    torch.manual_seed(0)
    module = lstm_fused.LSTM(2, 3, **kwargs)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    D = 2 if module.bidirectional else 1
    h0 = torch.randn(module.num_layers * D, 2, module.proj_size or 3, dtype=torch.float64,
                     requires_grad=True)
    c0 = torch.randn(module.num_layers * D, 2, 3, dtype=torch.float64, requires_grad=True)
    packed = "packed" in case

    def f(x, h0, c0, *ps):
        inp = pack_padded_sequence(x, torch.tensor([3, 2]), enforce_sorted=True) if packed else x
        out, (h_n, c_n) = torch.func.functional_call(module, dict(zip(names, ps)), (inp, (h0, c0)))
        return (out.data if packed else out), h_n, c_n

    if "clip" in case:  # some final cell states at the bound, none beyond it
        out, _, c_n = f(x, h0, c0, *params)
        assert (c_n.abs() >= 0.1 * (1 - 1e-9)).any() and c_n.abs().max() <= 0.1
        assert out.abs().max() <= (0.02 if "projected" in case else 1)
    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


def children_per_step(fn, steps_a, steps_b, op):
    """Profiler events issued directly by op `op` per time step (views and allocations excluded)."""
    ignored = {"aten::narrow", "aten::slice", "aten::t", "aten::transpose", "aten::as_strided",
               "aten::empty", "aten::empty_strided", "aten::view", "aten::reshape",
               "aten::expand", "aten::select", "aten::detach", "aten::alias", "aten::resize_",
               "aten::clone", "aten::zeros", "aten::zero_", "aten::fill_", "aten::empty_like",
               "aten::contiguous", "aten::numpy_T", "aten::unsqueeze", "aten::squeeze"}

    def count(steps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(steps)
        events = prof.events()
        parents = [e for e in events if e.name == op]
        assert len(parents) == 1, [e.name for e in events]
        kids = [c.name for c in parents[0].cpu_children if c.name not in ignored]
        return len(kids), kids

    (na, _), (nb, kids) = count(steps_a), count(steps_b)
    return (nb - na) / (steps_b - steps_a), kids


@variant_params
@pytest.mark.parametrize("gemm", ["aten", "simd"])
def test_device_operations_per_step(variant, gemm):
    """Per step, in each in-place CPU GEMM path (forced: a measured choice could pick oneDNN,
    whose results are copied into z, and make the count depend on the machine's load)."""
    if gemm not in lstm_fused.cpu_gemm.available(torch.float32):
        pytest.skip(f"the {gemm} GEMM path does not run here")
    peephole, coupled = variant
    module = lstm_fused.LSTM(8, 16, peephole=peephole, coupled=coupled)
    previous = lstm_fused.cpu_gemm.get_mode()
    lstm_fused.cpu_gemm.set_mode(gemm)
    try:
        check_operations_per_step(module, peephole)
    finally:
        lstm_fused.cpu_gemm.set_mode(previous)


def check_operations_per_step(module, peephole):

    def forward(steps):
        with torch.no_grad():
            module(torch.randn(steps, 4, 8))

    def forward_backward(steps):
        x = torch.randn(steps, 4, 8, requires_grad=True)
        out, _ = module(x)
        out.sum().backward()

    # One recurrent GEMM + one fused kernel (or, on the simd path, one kernel doing both); full
    # peepholes: the GEMM split in two (blocks that see c_{t-1} and the others), the W_co GEMM,
    # and a second kernel part.
    limit = 5 if peephole == "full" else 2
    per_step, kids = children_per_step(forward, 10, 30, "lstm_fused::layer_forward")
    assert per_step <= limit, kids
    assert "lstm_fused::pointwise_forward" in kids or "lstm_fused::recurrent_step" in kids
    per_step, kids = children_per_step(forward_backward, 10, 30, "lstm_fused::layer_backward")
    assert per_step <= limit, kids
    assert "lstm_fused::pointwise_backward" in kids


@variant_params
def test_saved_for_backward_bytes(variant):
    peephole, coupled = variant
    G = 3 if coupled else 4
    steps, batch, hidden = 7, 3, 5
    module = lstm_fused.LSTM(4, hidden, peephole=peephole, coupled=coupled)
    x = torch.randn(steps, batch, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, (h_n, c_n) = module(x)
    known = {t.data_ptr() for t in [x, out, h_n, c_n, *module.parameters()]}
    extra = sum(t.numel() for t in saved if t.data_ptr() not in known and t.numel() > batch * 6)
    assert extra <= (G + 2) * steps * batch * hidden, [tuple(t.shape) for t in saved]
    assert extra >= G * steps * batch * hidden  # the gates really are saved, not recomputed


@variant_params
def test_training_reduces_loss_and_state_dict_round_trips(variant):
    """Learn to output the running mean of the input (needs memory across steps)."""
    peephole, coupled = variant
    torch.manual_seed(0)
    model = lstm_fused.LSTM(1, 16, num_layers=2, peephole=peephole, coupled=coupled,
                            batch_first=True)
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=1e-2)
    x = torch.randn(64, 12, 1)
    y = x.cumsum(1) / torch.arange(1, 13).view(1, 12, 1)

    def loss_fn():
        return torch.nn.functional.mse_loss(head(model(x)[0]), y)

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first, (first, loss.item())

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = lstm_fused.LSTM(1, 16, num_layers=2, peephole=peephole, coupled=coupled,
                            batch_first=True)
    clone.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(clone(x)[0], model(x)[0], rtol=0, atol=0)


def test_dropout_between_layers_and_flatten_parameters():
    torch.manual_seed(0)
    model = lstm_fused.LSTM(3, 8, num_layers=2, dropout=0.5)
    model.flatten_parameters()
    x = torch.randn(5, 2, 3)
    model.eval()
    a, b = model(x)[0], model(x)[0]
    torch.testing.assert_close(a, b)
    model.train()
    c, d = model(x)[0], model(x)[0]
    assert not torch.allclose(c, d)  # dropout active in training
    # No dropout after the last layer: its output is its h, unscaled and with no zeros.
    out, (h_n, _) = model(x)
    torch.testing.assert_close(out[-1], h_n[-1], rtol=0, atol=0)
    assert (out != 0).all()
    with pytest.warns(UserWarning, match="dropout"):
        lstm_fused.LSTM(3, 8, num_layers=1, dropout=0.2)


def test_module_repr_and_parameter_names():
    m = lstm_fused.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4, peephole=True,
                        coupled=True)
    names = dict(m.named_parameters())
    assert names["weight_ch_l1_reverse"].shape == (2, 8)
    assert names["weight_ih_l1"].shape == (3 * 8, 2 * 4)
    assert names["weight_hr_l0"].shape == (4, 8)
    assert "peephole='diagonal'" in repr(m) and "coupled=True" in repr(m)
    assert lstm_fused.PeepholeLSTM(3, 4).peephole == "diagonal"
    assert lstm_fused.CoupledLSTM(3, 4).coupled


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_length_and_empty_batch(variant):
    peephole, coupled = variant
    m = lstm_fused.LSTM(3, 4, peephole=peephole, coupled=coupled)
    with pytest.raises(RuntimeError, match="sequence length"):  # T = 0: refused, as by nn.LSTM
        m(torch.randn(0, 2, 3))
    out, (_, c) = m(torch.randn(5, 0, 3))
    assert out.shape == (5, 0, 4) and c.shape == (1, 0, 4)


@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_full_peephole_layer_with_diagonal_blocks_equals_diagonal(coupled, packed):
    torch.manual_seed(0)
    kwargs = {"num_layers": 2, "bidirectional": True, "coupled": coupled, "dtype": torch.float64}
    diag = lstm_fused.LSTM(I, H, peephole="diagonal", **kwargs)
    full = lstm_fused.LSTM(I, H, peephole="full", **kwargs)
    state = diag.state_dict()
    for name, w in list(state.items()):
        if name.startswith("weight_ch"):
            state[name] = torch.cat([torch.diag(row) for row in w])
    full.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x, to_padded = make_input("packed" if packed else "padded", False, torch.float64, g)
    a, b = run(full, x, None, to_padded), run(diag, x, None, to_padded)
    for u, v in zip(a, b):
        assert_close(u, v, torch.float64, "forward")
    ga, gb = grads_of(full, leaf_input(x), a), grads_of(diag, leaf_input(x), b)
    for (name, _), u, v in zip([("input", None)] + list(full.named_parameters()), ga, gb):
        if name.startswith("weight_ch"):
            P = v.shape[0]
            u = torch.stack([blk.diagonal() for blk in u.view(P, H, H)])
        assert_close(u, v, torch.float64, name)
