"""MUT1-3 (Jozefowicz et al. 2015) against their equations: a step computed by hand from scalars, a step
from the equations written out with separate matrices, float64 gradcheck through the runner, step =
sequence, deferred weight gradients = plain autograd, and the size rule of MUT1/MUT2."""

from __future__ import annotations

import math

import pytest
import torch

from bnrhn.cells import build_cell
from bnrhn.nn import Recurrent

sig = torch.sigmoid


def weights(cell):
    """The paper's matrices, read out of the cell by name (the reference below uses only these)."""
    H = cell.hidden_size
    b_z, b_r, b_h = cell.bias.detach().chunk(3)
    w = {"b_z": b_z, "b_r": b_r, "b_h": b_h, "W_hh": cell.weight_hh.detach()}
    rows = cell.weight_ih.detach().split(H)
    names = {"MUT1": ("W_xz", "W_xr"), "MUT2": ("W_xz", "W_xh"), "MUT3": ("W_xz", "W_xr", "W_xh")}[cell.name]
    w.update(zip(names, rows))
    for gate in cell.recurrent_gates:
        w[f"W_h{gate}"] = getattr(cell, f"weight_h{gate}").detach()
    return w


def reference_step(name, w, x, h):
    """Jozefowicz et al. (2015), Section 3.4, with h = h_t and the result h_{t+1}."""
    mv = lambda W, v: v @ W.t()  # noqa: E731
    if name == "MUT1":
        z = sig(mv(w["W_xz"], x) + w["b_z"])
        r = sig(mv(w["W_xr"], x) + mv(w["W_hr"], h) + w["b_r"])
        cand = torch.tanh(mv(w["W_hh"], r * h) + torch.tanh(x) + w["b_h"])
    elif name == "MUT2":
        z = sig(mv(w["W_xz"], x) + mv(w["W_hz"], h) + w["b_z"])
        r = sig(x + w["b_r"])
        cand = torch.tanh(mv(w["W_hh"], r * h) + mv(w["W_xh"], x) + w["b_h"])
    else:
        z = sig(mv(w["W_xz"], x) + mv(w["W_hz"], torch.tanh(h)) + w["b_z"])
        r = sig(mv(w["W_xr"], x) + mv(w["W_hr"], h) + w["b_r"])
        cand = torch.tanh(mv(w["W_hh"], r * h) + mv(w["W_xh"], x) + w["b_h"])
    return cand * z + h * (1 - z)


@pytest.mark.parametrize("name", ["mut1", "mut2", "mut3"])
def test_two_steps_follow_the_papers_equations(name):
    torch.manual_seed(0)
    H = 5
    cell = build_cell(name, H, H).double()
    x = torch.randn(2, 3, H, dtype=torch.float64)
    w = weights(cell)
    h_ref = torch.randn(3, H, dtype=torch.float64)
    state = (h_ref.clone(),)
    for t in range(2):
        h_ref = reference_step(cell.name, w, x[t], h_ref)
        state = cell.recur(cell.project_input(x[t], t), state, t)
        assert torch.allclose(state[0], h_ref, atol=1e-13), t


def test_one_scalar_step_by_hand():
    """H = 1 with chosen numbers, worked out with math.tanh and the logistic function."""
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    x, h = 0.5, -0.3
    expect = {}
    # MUT1: W_xz=0.2 W_xr=-0.4 W_hr=0.7 W_hh=1.1, b=(0.1, -0.2, 0.05)
    z, r = s(0.2 * x + 0.1), s(-0.4 * x + 0.7 * h - 0.2)
    expect["mut1"] = math.tanh(1.1 * r * h + math.tanh(x) + 0.05) * z + h * (1 - z)
    # MUT2: W_xz=0.2 W_xh=-0.4 W_hz=0.7 W_hh=1.1
    z, r = s(0.2 * x + 0.7 * h + 0.1), s(x - 0.2)
    expect["mut2"] = math.tanh(1.1 * r * h - 0.4 * x + 0.05) * z + h * (1 - z)
    # MUT3: W_xz=0.2 W_xr=-0.4 W_xh=0.9 W_hz=0.7 W_hr=-0.6 W_hh=1.1
    z, r = s(0.2 * x + 0.7 * math.tanh(h) + 0.1), s(-0.4 * x - 0.6 * h - 0.2)
    expect["mut3"] = math.tanh(1.1 * r * h + 0.9 * x + 0.05) * z + h * (1 - z)
    for name, value in expect.items():
        cell = build_cell(name, 1, 1).double()
        with torch.no_grad():
            cell.weight_ih.copy_(torch.tensor([[0.2], [-0.4], [0.9]][: cell.weight_ih.shape[0]], dtype=torch.float64))
            cell.bias.copy_(torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64))
            cell.weight_hh.fill_(1.1)
            if "z" in cell.recurrent_gates:
                cell.weight_hz.fill_(0.7)
            if "r" in cell.recurrent_gates:
                cell.weight_hr.fill_(0.7 if name == "mut1" else -0.6)
        xt = torch.tensor([[x]], dtype=torch.float64)
        out = cell.recur(cell.project_input(xt), (torch.tensor([[h]], dtype=torch.float64),))[0]
        assert out.item() == pytest.approx(value, abs=1e-14), name


@pytest.mark.parametrize("name", ["mut1", "mut2", "mut3"])
def test_gradcheck_float64_through_the_runner(name):
    torch.manual_seed(0)
    I, H = (4, 4) if name != "mut3" else (3, 4)
    rnn = Recurrent(name, I, H, num_layers=2).double()
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    names = [n for n, _ in rnn.named_parameters()]

    def f(x, *ps):
        out, final = torch.func.functional_call(rnn, dict(zip(names, ps)), (x,), {"lengths": lengths})
        return out, *(t for state in final for t in state)

    params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["mut1", "mut2", "mut3"])
def test_deferred_weight_gradients_and_step_decoding(name):
    torch.manual_seed(0)
    rnn = Recurrent(name, 5, 5, num_layers=2, dropout=0.3, recurrent_dropout=0.3).double()
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    rnn.eval()
    out, final = rnn(x)
    state = None
    for t in range(6):  # the step path (decoding) equals the sequence path
        y, state = rnn.step(x[t], state, t)
        assert torch.allclose(y, out[t], atol=1e-12), t
    params = list(rnn.parameters())
    grads = torch.autograd.grad(out.sin().sum(), [x, *params])  # deferred weight gradients (runner)
    cells, s, outs = rnn.cells, [c.init_state(4, dtype=torch.float64) for c in rnn.cells], []
    for t in range(6):  # plain autograd, one recur() per step outside the runner
        inp = x[t]
        for k, cell in enumerate(cells):
            s[k] = cell.recur(cell.project_input(inp, t), s[k], t)
            inp = s[k][0]
        outs.append(inp)
    ref = torch.autograd.grad(torch.stack(outs).sin().sum(), [x, *params])
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, atol=1e-12)


def test_size_rule_and_bad_options():
    with pytest.raises(ValueError, match=r"MUT1 needs input_size == hidden_size \(got 3 and 4\)"):
        build_cell("mut1", 3, 4)
    with pytest.raises(ValueError, match="MUT2 needs input_size == hidden_size"):
        Recurrent("mut2", 2, 8)
    Recurrent("mut2", 8, 8, num_layers=3)  # upper layers read h: always the right size
    build_cell("mut3", 3, 4)
    with pytest.raises(ValueError, match="unknown option.*'depth'"):
        build_cell("mut3", 3, 4, depth=2)
    with pytest.raises(ValueError, match="hidden_size"):
        build_cell("mut1", 3, 0)


def test_flops_count_every_product():
    for name, products in (("mut1", 2 * 5 * 5 + 2 * 5 * 5), ("mut2", 2 * 5 * 5 + 2 * 5 * 5), ("mut3", 3 * 5 * 5 + 3 * 5 * 5)):
        assert build_cell(name, 5, 5).matmul_flops(1, 1) == 2 * products, name


def test_captioning_refuses_a_mut1_decoder_of_the_wrong_input_size_before_any_work(tmp_path, capsys):
    from bnrhn.captioning.config import CaptionConfig
    from bnrhn.cli import main

    CaptionConfig(cell="mut1", embed_size=64, hidden_size=64)  # fits
    with pytest.raises(ValueError, match="give --embed-size 128"):
        CaptionConfig(cell="mut1", embed_size=64, hidden_size=128)
    with pytest.raises(ValueError, match="use --model show_tell"):
        CaptionConfig(cell="mut2", model="show_attend_tell", embed_size=64, hidden_size=64)
    CaptionConfig(cell="mut3", embed_size=64, hidden_size=128)  # MUT3 takes any input size
    # the data set does not exist: the size error comes first, so nothing was loaded
    assert main(["train", "--cell", "mut1", "--embed-size", "64", "--hidden-size", "128",
                 "--dataset", f"flickr8k:{tmp_path / 'none'}", "--run-dir", str(tmp_path / "run")]) == 2
    assert "give --embed-size 128" in capsys.readouterr().err
