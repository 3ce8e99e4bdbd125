"""Cells against references: PyTorch's nn.RNN/LSTM/GRU, float64 gradcheck, hand-computed RHN steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnrhn.cells import CELLS, RHNCell, build_cell, cell_options
from bnrhn.nn import Recurrent

TORCH_RNNS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def copy_weights(ours: Recurrent, ref: nn.RNNBase) -> None:
    with torch.no_grad():
        for k, cell in enumerate(ours.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(ref, f"{name}_l{k}"))


def run_reference(ref, x, lengths):
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, final = ref(packed)
    out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    return out, final


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("vendor", [False, True], ids=["step-loop", "vendor-kernel"])
def test_parity_with_torch_outputs_states_and_gradients(name, num_layers, seed, vendor):
    """vendor=False: our cells' equations, step by step, against PyTorch's module; vendor=True: the runner's
    hand-over of our parameters, padding and states to PyTorch's kernel, layer by layer."""
    torch.manual_seed(seed)
    T, B, I, H = 7, 5, 6, 8
    ref = TORCH_RNNS[name](I, H, num_layers=num_layers)
    ours = Recurrent(name, I, H, num_layers=num_layers, use_vendor_kernel=vendor)
    copy_weights(ours, ref)
    x = torch.randn(T, B, I)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T  # the longest sequence fills the padded batch, as pad_packed_sequence returns it
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_ref, final_ref = run_reference(ref, x_ref, lengths)
    out, final = ours(x_ours, lengths=lengths)
    assert (out - out_ref).abs().max() <= 1e-5
    h_ref = final_ref[0] if name == "lstm" else final_ref
    for k in range(num_layers):
        assert (final[k][0] - h_ref[k]).abs().max() <= 1e-5
        if name == "lstm":
            assert (final[k][1] - final_ref[1][k]).abs().max() <= 1e-5

    # Same gradients for a loss touching outputs and final states.
    w = torch.randn_like(out)
    loss_ref = (out_ref * w).sum() + h_ref.square().sum()
    loss = (out * w).sum() + sum(f[0].square().sum() for f in final)
    if name == "lstm":  # the memory's own gradient path too
        loss_ref = loss_ref + final_ref[1].sin().sum()
        loss = loss + sum(f[1].sin().sum() for f in final)
    loss_ref.backward()
    loss.backward()
    assert (x_ours.grad - x_ref.grad).abs().max() <= 1e-5
    for k, cell in enumerate(ours.cells):
        for pname in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            g_ref = getattr(ref, f"{pname}_l{k}").grad
            assert (getattr(cell, pname).grad - g_ref).abs().max() <= 1e-5, (k, pname)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("vendor", [False, True], ids=["step-loop", "vendor-kernel"])
def test_initial_state_and_batch_first_match_torch(name, vendor):
    torch.manual_seed(1)
    ref = TORCH_RNNS[name](4, 5, batch_first=True)
    ours = Recurrent(name, 4, 5, batch_first=True, use_vendor_kernel=vendor)
    copy_weights(ours, ref)
    x = torch.randn(3, 6, 4)
    h0 = torch.randn(1, 3, 5)
    if name == "lstm":
        c0 = torch.randn(1, 3, 5)
        out_ref, _ = ref(x, (h0, c0))
        out, _ = ours(x, state=[(h0[0], c0[0])])
    else:
        out_ref, _ = ref(x, h0)
        out, _ = ours(x, state=[(h0[0],)])
    assert (out - out_ref).abs().max() <= 1e-5


GRADCHECK_CASES = [
    ("rnn", {"use_vendor_kernel": False}),  # our step loop
    ("lstm", {"use_vendor_kernel": False}),
    ("gru", {"use_vendor_kernel": False}),
    ("rnn", {}),  # PyTorch's kernel with our parameters
    ("lstm", {}),
    ("gru", {}),
    ("rhn", {"depth": 2}),
    ("bn_rhn", {"depth": 2}),
    ("bn_rhn", {"depth": 2, "normalize": "h,t,c", "stats": "cumulative"}),
    ("bn_rhn", {"depth": 2, "per_step": False}),
    ("bn_rhn_tf", {"depth": 2}),
    ("bn_lstm", {}),
    ("bn_lstm", {"carry_norm": "recurrence"}),
]


@pytest.mark.parametrize("name,opts", GRADCHECK_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRADCHECK_CASES)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["projected", "full"])
def test_gradcheck_float64(name, opts, training, full):
    """Analytical against finite-difference gradients. Default suite: gradcheck's fast mode (uᵀJv for random
    u, v of the input and every parameter, each against finite differences; a wrong entry of J shows up
    in it with probability 1); slow suite: the full Jacobian (up to 15 s a case on an AVX2 processor)."""
    torch.manual_seed(0)
    if training and name in ("bn_rhn", "bn_lstm") and "stats" not in opts:
        # batch renormalization (these cells' default) reads and updates the population statistics at every
        # call and treats r, d as constants: finite differences of repeated calls do not apply to it (its own
        # gradchecks are in test_batchnorm_options.py); here the plain batch-norm training step is checked
        opts = {**opts, "stats": "momentum"}
    rnn = Recurrent(name, 3, 4, num_layers=2, **opts).double()
    if not training:
        rnn.train()
        rnn(torch.randn(4, 6, 3, dtype=torch.float64))  # give batch-norm cells population statistics
        rnn.eval()
    else:
        rnn.train()
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    names = [n for n, _ in rnn.named_parameters()]

    def f(x, *ps):
        out, final = torch.func.functional_call(rnn, dict(zip(names, ps)), (x,), {"lengths": lengths})
        return out, *(t for state in final for t in state)  # every layer's final state, c included

    params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]
    # the input and every parameter against finite differences
    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6, rtol=1e-4, fast_mode=not full)


def test_rhn_with_very_negative_transform_bias_passes_state_through():
    torch.manual_seed(0)
    cell = build_cell("rhn", 4, 6, depth=3, transform_bias=-60.0)
    s0 = (torch.randn(2, 6),)
    x = torch.randn(5, 2, 4)
    xp = cell.project_input(x)
    s = s0
    for t in range(5):
        s = cell.recur(xp[t], s, t)
    assert torch.allclose(s[0], s0[0], atol=1e-12, rtol=0)


def test_rhn_hand_computed_two_steps_depth_two():
    """s_l = h_l t_l + s_{l-1}(1 - t_l) with x entering layer 1 only, computed by hand with 1-unit weights."""
    cell = RHNCell(1, 1, depth=2, transform_bias=0.0)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.tensor([[0.5], [-1.0]]))  # W_H, W_T
        cell.weight_hh[0].copy_(torch.tensor([[0.3], [0.2]]))  # R_{H,1}, R_{T,1}
        cell.weight_hh[1].copy_(torch.tensor([[-0.4], [0.7]]))  # R_{H,2}, R_{T,2}
        cell.bias[0].copy_(torch.tensor([0.1, -0.2]))  # b_{H,1}, b_{T,1}
        cell.bias[1].copy_(torch.tensor([0.05, 0.3]))  # b_{H,2}, b_{T,2}
    sig = lambda v: 1 / (1 + math.exp(-v))

    def by_hand(x, s):
        for l, (wh, wt, rh, rt, bh, bt) in enumerate([(0.5, -1.0, 0.3, 0.2, 0.1, -0.2), (0, 0, -0.4, 0.7, 0.05, 0.3)]):
            xin = x if l == 0 else 0.0
            h = math.tanh(wh * xin + rh * s + bh)
            t = sig(wt * xin + rt * s + bt)
            s = h * t + s * (1 - t)
        return s

    xs, s = [0.8, -1.3], 0.25
    expected = []
    for x in xs:
        s = by_hand(x, s)
        expected.append(s)
    rnn_in = torch.tensor(xs).reshape(2, 1, 1)
    state = (torch.tensor([[0.25]]),)
    xp = cell.project_input(rnn_in)
    got = []
    for t in range(2):
        state = cell.recur(xp[t], state, t)
        got.append(state[0].item())
    assert got == pytest.approx(expected, abs=1e-6)


def test_free_carry_and_every_layer_input_shapes_and_flops():
    cell = build_cell("bn_rhn_tf", 5, 7, depth=4)
    assert cell.weight_ih.shape == (4 * 3 * 7, 5)  # every layer, 3 gates
    assert len(cell.weight_hh) == 4 and cell.weight_hh[0].shape == (3 * 7, 7)
    assert cell.matmul_flops(2, 3) == 2 * 2 * 3 * 3 * 7 * (4 * 5 + 4 * 7)
    for b in cell.bias:
        assert torch.allclose(b[7:], torch.full((14,), -3.0))


def test_bn_lstm_gamma_init_and_no_shift_on_gate_terms():
    cell = build_cell("bn_lstm", 3, 4)
    assert torch.allclose(cell.bn_x.weight, torch.full((16,), 0.1))
    assert cell.bn_x.bias is None and cell.bn_h.bias is None and cell.bn_c.bias is not None


# The options and defaults of every cell as documented (docs/cells.md: the table, "RHN options" and the presets
# of bnrhn.cells), written out by hand: cell_options() must report exactly these.
_RHN_DOCUMENTED = dict(depth=3, norm="none", normalize=("h",), carry="coupled", input_at="first", transform_bias=-2.0,
                       carry_bias=None, max_steps=100, per_step=True, stats="momentum", momentum=0.1, gamma_init=None,
                       min_rows=0, renorm_rmax=3.0, renorm_dmax=5.0, renorm_warmup=100)
DOCUMENTED_OPTIONS = {
    "rnn": {"bias": True},
    "lstm": {"bias": True, "forget_bias": 1.0},
    "gru": {"bias": True},
    "mut1": {}, "mut2": {}, "mut3": {},
    "rhn": _RHN_DOCUMENTED,
    "bn_rhn": {**_RHN_DOCUMENTED, "norm": "batch", "carry": "free", "stats": "renorm"},
    "bn_rhn_tf": {**_RHN_DOCUMENTED, "norm": "layer", "carry": "free", "input_at": "every", "transform_bias": -3.0,
                  "carry_bias": -3.0},
    "bn_lstm": {"max_steps": 100, "per_step": True, "stats": "renorm", "momentum": 0.1, "gamma_init": 0.1,
                "forget_bias": 1.0, "carry_norm": "output", "min_rows": 0, "renorm_rmax": 3.0, "renorm_dmax": 5.0,
                "renorm_warmup": 100},
}


def test_documented_options_cover_every_cell():
    assert set(DOCUMENTED_OPTIONS) == set(CELLS)


@pytest.mark.parametrize("name", list(CELLS))
def test_every_registered_cell_runs_and_reports_its_options(name):
    opts = cell_options(name)
    assert opts == DOCUMENTED_OPTIONS[name]
    cell = build_cell(name, 4, 4)  # the defaults it reports are the ones a cell is built with
    if isinstance(cell, RHNCell):
        assert (cell.depth, cell.norm, cell.carry, cell.input_at, cell.transform_bias) == \
            (opts["depth"], opts["norm"], opts["carry"], opts["input_at"], opts["transform_bias"])
        assert cell.carry_bias == (-opts["transform_bias"] if opts["carry_bias"] is None else opts["carry_bias"])
    if name == "lstm":
        assert cell.forget_bias == opts["forget_bias"]
    if name == "bn_lstm":
        assert torch.equal(cell.bias[4:8], torch.full((4,), opts["forget_bias"]))  # b_f (gate order i, f, g, o)
        assert torch.allclose(cell.bn_x.weight, torch.full((16,), opts["gamma_init"]))
    I = 4 if name in ("mut1", "mut2") else 3  # they add the raw input to a hidden-sized vector
    rnn = Recurrent(name, I, 4, num_layers=2, dropout=0.2, recurrent_dropout=0.2, input_dropout=0.1)
    out, final = rnn(torch.randn(5, 2, I), lengths=[5, 2])
    assert out.shape == (5, 2, 4) and len(final) == 2
    assert (out[2:, 1] == 0).all()  # padded positions output zeros


def test_bad_input_raises_clear_value_errors():
    with pytest.raises(ValueError, match="unknown cell 'lstn'"):
        build_cell("lstn", 3, 4)
    with pytest.raises(ValueError, match="unknown option.*'dept'"):
        build_cell("rhn", 3, 4, dept=2)
    with pytest.raises(ValueError, match="depth"):
        build_cell("rhn", 3, 4, depth=0)
    with pytest.raises(ValueError, match="hidden_size"):
        build_cell("lstm", 3, 0)
    with pytest.raises(ValueError, match="hidden_size"):
        Recurrent("gru", 3, -2)
    with pytest.raises(ValueError, match="input_size"):
        build_cell("gru", 0, 3)
    with pytest.raises(ValueError, match="num_layers"):
        Recurrent("gru", 3, 4, num_layers=0)
    with pytest.raises(ValueError, match="norm must be"):
        build_cell("rhn", 3, 4, norm="group")
    with pytest.raises(ValueError, match="normalize"):
        build_cell("rhn", 3, 4, norm="batch", normalize="c")  # coupled carry has no c pre-activation
    with pytest.raises(ValueError, match="dropout"):
        Recurrent("gru", 3, 4, dropout=1.5)
    rnn = Recurrent("lstm", 3, 4)
    with pytest.raises(ValueError, match=r"input of shape \[T, B, 3\]"):
        rnn(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        rnn.step(torch.randn(2, 7), None, 0)
    with pytest.raises(ValueError, match="lengths"):
        rnn(torch.randn(5, 2, 3), lengths=[6, 2])
    with pytest.raises(ValueError, match="input_size"):
        build_cell("lstm", 3, 4).project_input(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"input_size=3"):
        rnn(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match=r"input_size=3"):
        rnn.step(torch.randn(2, 7), None, 0)
    # batch-norm options are checked even where the preset builds no batch norm
    for name in ("rhn", "bn_rhn", "bn_rhn_tf", "bn_lstm"):
        with pytest.raises(ValueError, match="stats"):
            build_cell(name, 3, 4, stats="ema")
        with pytest.raises(ValueError, match="max_steps"):
            build_cell(name, 3, 4, max_steps=0)
        with pytest.raises(ValueError, match="momentum"):
            build_cell(name, 3, 4, momentum=1.5)
    with pytest.raises(ValueError, match="depth"):
        build_cell("bn_rhn", 3, 4, depth=-1)
    with pytest.raises(ValueError, match="hidden_size"):
        build_cell("bn_lstm", 3, 2.5)


@pytest.mark.parametrize("name,opts", [("lstm", {"use_vendor_kernel": False}), ("gru", {"use_vendor_kernel": False}),
                                       ("rhn", {"depth": 2}),
                                       ("bn_rhn", {"depth": 2, "stats": "momentum"})])  # (renorm: its state changes per call)
def test_deferred_weight_gradients_equal_per_step_autograd(name, opts):
    """The runner computes recurrent weight gradients once per sequence (bnrhn.cells.deferred); they must
    equal plain autograd through the same steps, also for repeated and partial backward passes."""
    torch.manual_seed(0)
    rnn = Recurrent(name, 3, 5, **opts).double()
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    params = dict(rnn.named_parameters())

    def loss_sequence():  # deferred path (the runner's sequence() context)
        out, _ = rnn(x)
        return out.sin().sum()

    def loss_steps():  # plain autograd: recur() outside any sequence() context
        cell, s = rnn.cells[0], rnn.init_state(4)[0]
        outs = []
        for t in range(6):
            s = cell.recur(cell.project_input(x[t], t), s, t)
            outs.append(s[0])
        return torch.stack(outs).sin().sum()

    ref = torch.autograd.grad(loss_steps(), [x, *params.values()])
    loss = loss_sequence()
    only_x = torch.autograd.grad(loss, [x], retain_graph=True)  # partial pass first
    first = torch.autograd.grad(loss, [x, *params.values()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *params.values()])  # repeated pass over the retained graph
    assert torch.allclose(only_x[0], ref[0], atol=1e-12)
    for g_ref, g1, g2 in zip(ref, first, second):
        assert torch.allclose(g1, g_ref, atol=1e-12) and torch.allclose(g2, g_ref, atol=1e-12)
