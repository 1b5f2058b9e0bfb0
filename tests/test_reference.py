"""Tests of the plain-PyTorch reference (lstm_fused/reference.py) against torch.nn.LSTM /
torch.nn.LSTMCell, against identities between the variants, and against hand-computed numbers."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

try:
    from lstm_fused import reference as ref
except ImportError:
    # The reference is plain PyTorch: test it even when the package cannot be imported because
    # the C++ extension is not built (tests of the package itself report that failure).
    _path = Path(__file__).resolve().parents[1] / "lstm_fused" / "reference.py"
    _spec = importlib.util.spec_from_file_location("lstm_fused_reference", _path)
    ref = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(ref)

DT = torch.float64
TOL = {"rtol": 0, "atol": 1e-12}


def close(a, b):
    torch.testing.assert_close(a, b, **TOL)


def rand(*shape, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=DT, generator=g) * 0.5


def make_params(I, H, *, peephole=None, coupled=False, proj=0, bias=True, seed=0):
    """Random parameters in the layout of docs/design.md section 2 (cell names, no _l{k} suffix)."""
    torch.manual_seed(seed)
    G = 3 if coupled else 4
    P = 2 if coupled else 3
    R = proj or H
    p = {
        "weight_ih": rand(G * H, I),
        "weight_hh": rand(G * H, R),
        "bias_ih": rand(G * H) if bias else None,
        "bias_hh": rand(G * H) if bias else None,
        "weight_ch": None,
        "weight_hr": rand(proj, H) if proj else None,
    }
    peephole = ref.normalize_peephole(peephole)
    if peephole == "diagonal":
        p["weight_ch"] = rand(P, H)
    elif peephole == "full":
        p["weight_ch"] = rand(P * H, H)
    return p


def args(p):
    return (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], p["weight_ch"], p["weight_hr"])


# ---------------------------------------------------------------------------------------------
# 1. vanilla == torch.nn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_nn_lstmcell(bias):
    torch.manual_seed(1)
    I, H, B = 5, 7, 4
    cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=DT)
    x, h0, c0 = rand(B, I), rand(B, H), rand(B, H)
    h_exp, c_exp = cell(x, (h0, c0))
    h, c = ref.lstm_cell(x, h0, c0, cell.weight_ih, cell.weight_hh,
                         cell.bias_ih if bias else None, cell.bias_hh if bias else None)
    close(h, h_exp)
    close(c, c_exp)


def _nn_params(lstm, suffix):
    def get(name):
        return getattr(lstm, name + suffix, None)

    return (get("weight_ih_l0"), get("weight_hh_l0"), get("bias_ih_l0"), get("bias_hh_l0"),
            None, get("weight_hr_l0"))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("proj", [0, 3], ids=["noproj", "proj3"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_layer_matches_nn_lstm(bidirectional, proj, packed):
    torch.manual_seed(2)
    I, H, B, T = 4, 6, 5, 7
    D = 2 if bidirectional else 1
    R = proj or H
    lstm = torch.nn.LSTM(I, H, bidirectional=bidirectional, proj_size=proj, dtype=DT)
    x = rand(T, B, I)
    h0, c0 = rand(D, B, R), rand(D, B, H)
    lengths = [7, 7, 5, 2, 1]  # sorted, variable, including a full-length tie

    if packed:
        xp = pack_padded_sequence(x, lengths, enforce_sorted=True)
        out_exp, (hn_exp, cn_exp) = lstm(xp, (h0, c0))
        out_exp = out_exp.data  # [N, D*R]
        inp, bs = xp.data, xp.batch_sizes
    else:
        out_exp, (hn_exp, cn_exp) = lstm(x, (h0, c0))
        inp, bs = x, None

    for d, suffix in enumerate(["", "_reverse"][:D]):
        out, (hn, cn) = ref.lstm_layer(inp, h0[d], c0[d], *_nn_params(lstm, suffix),
                                       reverse=(d == 1), batch_sizes=bs)
        close(out, out_exp[..., d * R:(d + 1) * R])
        close(hn, hn_exp[d])
        close(cn, cn_exp[d])


def test_layer_packed_batch_sizes_as_list():
    p = make_params(3, 4, peephole="full", coupled=True, proj=2)
    bs = torch.tensor([3, 2, 2, 1])
    x, h0, c0 = rand(int(bs.sum()), 3), rand(3, 2), rand(3, 4)
    for reverse in (False, True):
        a = ref.lstm_layer(x, h0, c0, *args(p), peephole="full", coupled=True, reverse=reverse,
                           batch_sizes=bs)
        b = ref.lstm_layer(x, h0, c0, *args(p), peephole="full", coupled=True, reverse=reverse,
                           batch_sizes=bs.tolist())
        close(a[0], b[0])
        close(a[1][0], b[1][0])
        close(a[1][1], b[1][1])


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_equals_per_sequence_padded(reverse):
    """Every variant: a packed batch equals running each sequence alone, unpadded (so packing is
    right for peepholes / coupling too, not only for the vanilla LSTM that nn.LSTM checks)."""
    I, H = 3, 4
    p = make_params(I, H, peephole="diagonal", coupled=False, proj=2, seed=3)
    lengths = [4, 3, 3, 1]
    x = rand(max(lengths), len(lengths), I)
    h0, c0 = rand(len(lengths), 2), rand(len(lengths), H)
    xp = pack_padded_sequence(x, lengths, enforce_sorted=True)
    out, (hn, cn) = ref.lstm_layer(xp.data, h0, c0, *args(p), peephole="diagonal",
                                   reverse=reverse, batch_sizes=xp.batch_sizes)
    out_padded = torch.nn.utils.rnn.pad_packed_sequence(
        torch.nn.utils.rnn.PackedSequence(out, xp.batch_sizes))[0]
    for b, L in enumerate(lengths):
        o_b, (h_b, c_b) = ref.lstm_layer(x[:L, b:b + 1], h0[b:b + 1], c0[b:b + 1], *args(p),
                                         peephole="diagonal", reverse=reverse)
        close(out_padded[:L, b], o_b[:, 0])
        close(hn[b], h_b[0])
        close(cn[b], c_b[0])


# ---------------------------------------------------------------------------------------------
# 2. coupled == standard with i-gate parameters = -(f-gate parameters)
# ---------------------------------------------------------------------------------------------


def coupled_as_standard(p, peephole):
    """Standard-LSTM parameters equal to coupled ones: sigma(-z_f - peep_f) = 1 - sigma(z_f + peep_f)."""
    def gates(w):  # (f, g, o) -> (i=-f, f, g, o)
        f, g, o = w.chunk(3, dim=0)
        return torch.cat([-f, f, g, o], dim=0)

    q = dict(p)
    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if p[k] is not None:
            q[k] = gates(p[k])
    if peephole is not None:
        f, o = p["weight_ch"].chunk(2, dim=0)  # rows (diagonal) or [H, H] blocks (full)
        q["weight_ch"] = torch.cat([-f, f, o], dim=0)
    return q


@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("peephole", [None, "diagonal", "full"])
def test_coupled_equals_standard_with_negated_forget_gate(peephole, proj):
    I, H, B, T = 3, 5, 4, 6
    p = make_params(I, H, peephole=peephole, coupled=True, proj=proj, seed=4)
    q = coupled_as_standard(p, peephole)
    R = proj or H
    x, h0, c0 = rand(T, B, I), rand(B, R), rand(B, H)

    h_c, c_c = ref.lstm_cell(x[0], h0, c0, *args(p), peephole=peephole, coupled=True)
    h_s, c_s = ref.lstm_cell(x[0], h0, c0, *args(q), peephole=peephole, coupled=False)
    close(h_c, h_s)
    close(c_c, c_s)

    bs = [4, 4, 3, 2, 2, 1]
    xp = rand(sum(bs), I)
    for inp, batch_sizes in ((x, None), (xp, bs)):
        for reverse in (False, True):
            out_c, (hn_c, cn_c) = ref.lstm_layer(inp, h0, c0, *args(p), peephole=peephole,
                                                 coupled=True, reverse=reverse,
                                                 batch_sizes=batch_sizes)
            out_s, (hn_s, cn_s) = ref.lstm_layer(inp, h0, c0, *args(q), peephole=peephole,
                                                 coupled=False, reverse=reverse,
                                                 batch_sizes=batch_sizes)
            close(out_c, out_s)
            close(hn_c, hn_s)
            close(cn_c, cn_s)


# ---------------------------------------------------------------------------------------------
# 3. full peephole with diagonal blocks == diagonal peephole
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coupled", [False, True])
def test_full_with_diagonal_blocks_equals_diagonal(coupled):
    I, H, B, T = 3, 5, 4, 6
    p = make_params(I, H, peephole="diagonal", coupled=coupled, proj=2, seed=5)
    q = dict(p, weight_ch=torch.cat([torch.diag(row) for row in p["weight_ch"]], dim=0))
    assert q["weight_ch"].shape == ((2 if coupled else 3) * H, H)
    x, h0, c0 = rand(T, B, I), rand(B, 2), rand(B, H)
    out_d, (hn_d, cn_d) = ref.lstm_layer(x, h0, c0, *args(p), peephole="diagonal", coupled=coupled)
    out_f, (hn_f, cn_f) = ref.lstm_layer(x, h0, c0, *args(q), peephole="full", coupled=coupled)
    close(out_d, out_f)
    close(hn_d, hn_f)
    close(cn_d, cn_f)
    # peephole=True is "diagonal"
    out_t, _ = ref.lstm_layer(x, h0, c0, *args(p), peephole=True, coupled=coupled)
    close(out_t, out_d)


def test_full_peephole_uses_off_diagonal_entries():
    """A full peephole block is a matrix product, c @ W_ck.T (W_ck c), not its transpose."""
    H = 2
    c = torch.tensor([[1.0, 10.0]], dtype=DT)
    W = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=DT)  # row 0 reads c[1]
    weight_ch = torch.cat([W, torch.zeros(2 * H, H, dtype=DT)])
    peep_i = ref._peephole(c, weight_ch, "i", "full", coupled=False)
    close(peep_i, torch.tensor([[10.0, 0.0]], dtype=DT))


# ---------------------------------------------------------------------------------------------
# 4. hand-computed single step, H = 1
# ---------------------------------------------------------------------------------------------


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def th(v):
    return (math.exp(2 * v) - 1.0) / (math.exp(2 * v) + 1.0)


def _t(rows):
    return torch.tensor(rows, dtype=DT)


def test_diagonal_peephole_hand_computed_step():
    # I = H = B = 1, gate order (i, f, g, o); weight_ch rows (i, f, o).
    x, h0, c0 = 0.5, 0.2, -0.5
    weight_ih = _t([[0.1], [0.2], [0.3], [0.4]])
    weight_hh = _t([[-0.1], [0.5], [0.2], [-0.3]])
    bias_ih = _t([0.05, -0.05, 0.1, 0.0])
    bias_hh = _t([0.0, 0.0, 0.0, 0.0])
    weight_ch = _t([[0.7], [-0.4], [0.9]])

    # z = W_ih x + b_ih + W_hh h0 + b_hh
    z_i = 0.1 * 0.5 + 0.05 - 0.1 * 0.2  # 0.08
    z_f = 0.2 * 0.5 - 0.05 + 0.5 * 0.2  # 0.15
    z_g = 0.3 * 0.5 + 0.1 + 0.2 * 0.2  # 0.29
    z_o = 0.4 * 0.5 + 0.0 - 0.3 * 0.2  # 0.14
    i = sig(z_i + 0.7 * c0)  # sig(-0.27)
    f = sig(z_f - 0.4 * c0)  # sig(0.35)
    g = th(z_g)
    c1 = f * c0 + i * g  # about -0.171
    o = sig(z_o + 0.9 * c1)  # the NEW cell state
    h1 = o * th(c1)

    h, c = ref.lstm_cell(_t([[x]]), _t([[h0]]), _t([[c0]]), weight_ih, weight_hh, bias_ih, bias_hh,
                         weight_ch, peephole="diagonal")
    close(c, _t([[c1]]))
    close(h, _t([[h1]]))

    # The test discriminates: an output gate reading the OLD cell state, or a flipped sign of
    # its peephole, would give an h far outside the tolerance.
    h_old_c = sig(z_o + 0.9 * c0) * th(c1)
    h_neg = sig(z_o - 0.9 * c1) * th(c1)
    assert abs(h_old_c - h1) > 1e-3 and abs(h_neg - h1) > 1e-3

    # Same step through the layer, and with a projection W_hr = [[2]].
    out, (hn, cn) = ref.lstm_layer(_t([[[x]]]), _t([[h0]]), _t([[c0]]), weight_ih, weight_hh,
                                   bias_ih, bias_hh, weight_ch, peephole="diagonal")
    close(out, _t([[[h1]]]))
    close(hn, _t([[h1]]))
    close(cn, _t([[c1]]))
    h_p, _ = ref.lstm_cell(_t([[x]]), _t([[h0]]), _t([[c0]]), weight_ih, weight_hh, bias_ih,
                           bias_hh, weight_ch, _t([[2.0]]), peephole="diagonal")
    close(h_p, _t([[2.0 * h1]]))


def test_coupled_diagonal_peephole_hand_computed_step():
    # Coupled: gate order (f, g, o); weight_ch rows (f, o); i = 1 - f.
    x, h0, c0 = -1.0, 0.4, 0.8
    weight_ih = _t([[0.3], [-0.6], [0.5]])
    weight_hh = _t([[0.2], [0.1], [-0.7]])
    bias_ih = _t([0.1, 0.2, -0.1])
    weight_ch = _t([[-0.5], [1.5]])

    z_f = 0.3 * -1.0 + 0.1 + 0.2 * 0.4  # -0.12
    z_g = -0.6 * -1.0 + 0.2 + 0.1 * 0.4  # 0.84
    z_o = 0.5 * -1.0 - 0.1 - 0.7 * 0.4  # -0.88
    f = sig(z_f - 0.5 * c0)
    i = 1.0 - f
    g = th(z_g)
    c1 = f * c0 + i * g
    o = sig(z_o + 1.5 * c1)
    h1 = o * th(c1)

    h, c = ref.lstm_cell(_t([[x]]), _t([[h0]]), _t([[c0]]), weight_ih, weight_hh, bias_ih, None,
                         weight_ch, peephole="diagonal", coupled=True)
    close(c, _t([[c1]]))
    close(h, _t([[h1]]))


# ---------------------------------------------------------------------------------------------
# 5. argument validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (None, None), (False, None), (True, "diagonal"), ("diagonal", "diagonal"), ("full", "full"),
])
def test_normalize_peephole(value, expected):
    assert ref.normalize_peephole(value) == expected


@pytest.mark.parametrize("bad", ["Diagonal", "diag", "none", "", 1, 0, 2.0, "True", ["full"]])
def test_normalize_peephole_errors(bad):
    with pytest.raises(ValueError, match="peephole") as err:
        ref.normalize_peephole(bad)
    msg = str(err.value)
    for allowed in ("None", "True", "'diagonal'", "'full'"):
        assert allowed in msg


def test_variant_validation_errors():
    I, H, B = 3, 4, 2
    x, h0, c0 = rand(B, I), rand(B, H), rand(B, H)
    std = make_params(I, H, peephole="diagonal")
    cpl = make_params(I, H, peephole="full", coupled=True)

    with pytest.raises(ValueError, match="requires weight_ch"):
        ref.lstm_cell(x, h0, c0, *args(dict(std, weight_ch=None)), peephole="diagonal")
    with pytest.raises(ValueError, match="weight_ch was given but peephole is None"):
        ref.lstm_cell(x, h0, c0, *args(std))
    with pytest.raises(ValueError, match=r"weight_ch .*must have shape \[12, 4\]"):
        ref.lstm_cell(x, h0, c0, *args(std), peephole="full")  # diagonal-shaped for full
    with pytest.raises(ValueError, match=r"weight_ch .*must have shape \[2, 4\]"):
        ref.lstm_cell(x, h0, c0, *args(cpl), peephole="diagonal", coupled=True)
    with pytest.raises(ValueError, match=r"weight_ch .*must have shape \[8, 4\]"):
        # standard-LSTM [3H, H] weight_ch given to a coupled LSTM (gate weights still 3H)
        ref.lstm_cell(x, h0, c0, *args(dict(cpl, weight_ch=rand(3 * H, H))), peephole="full",
                      coupled=True)
    with pytest.raises(ValueError, match="weight_hh must have shape"):
        # standard weights with H=3 ([12, I]) read as coupled give H=4; weight_hh [12, 3] != [12, 4]
        p = make_params(I, 3, coupled=False)
        ref.lstm_cell(x, rand(B, 3), rand(B, 4), *args(p), coupled=True)
    with pytest.raises(ValueError, match="weight_ih must have shape"):
        ref.lstm_cell(x, h0, c0, *args(make_params(I, 5)), coupled=True)  # 20 rows, 20 % 3 != 0
    with pytest.raises(ValueError, match="hx must have last dimension 2"):
        ref.lstm_cell(x, h0, c0, *args(make_params(I, H, proj=2)))
    with pytest.raises(ValueError, match="batch_sizes must be positive and non-increasing"):
        ref.lstm_layer(rand(5, I), h0, c0, *args(make_params(I, H)), batch_sizes=[2, 3])
    with pytest.raises(ValueError, match="sum"):
        ref.lstm_layer(rand(5, I), h0, c0, *args(make_params(I, H)), batch_sizes=[2, 2])


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peephole, coupled", [(None, False), ("diagonal", False), ("full", True)])
def test_reference_gradcheck(peephole, coupled):
    I, H = 2, 3
    p = make_params(I, H, peephole=peephole, coupled=coupled, proj=2, seed=6)
    bs = [3, 2, 1]
    x, h0, c0 = rand(sum(bs), I), rand(3, 2), rand(3, H)
    names = [k for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch", "weight_hr")
             if p[k] is not None]
    tensors = [x, h0, c0] + [p[k] for k in names]
    tensors = [t.detach().requires_grad_() for t in tensors]

    def fn(x, h0, c0, *ws):
        q = dict(p, **dict(zip(names, ws, strict=True)))
        out, (hn, cn) = ref.lstm_layer(x, h0, c0, *args(q), peephole=peephole, coupled=coupled,
                                       reverse=True, batch_sizes=bs)
        return out, hn, cn

    assert torch.autograd.gradcheck(fn, tensors)
