"""PyTorch's own kernels for the cells whose equations are PyTorch's (bnrhn.nn.vendor): the runner's
vendor path against its step loop (our equations, checked against nn.LSTM/GRU/RNN in test_cells.py),
with dropout masks, padding, initial states and stacked layers; and when each path runs."""

from __future__ import annotations

import pytest
import torch

from bnrhn.cells import CELLS
from bnrhn.models.char_lm import CharLM
from bnrhn.nn import Recurrent
from bnrhn.nn.vendor import has_vendor_kernel


def _pair(name, seed=0, **kwargs):
    """PyTorch's kernel (fused=False: GRU and RNN training would otherwise take our C++ loops) and our paths."""
    torch.manual_seed(seed)
    vendor = Recurrent(name, 6, 5, fused=False, **kwargs).double()
    loop = Recurrent(name, 6, 5, use_vendor_kernel=False, **kwargs).double()
    loop.load_state_dict(vendor.state_dict())
    return vendor, loop


def _outputs_and_grads(rnn, x, lengths, state, seed):
    torch.manual_seed(seed)  # the same variational masks on both paths
    x = x.clone().requires_grad_()
    state = [tuple(t.clone().requires_grad_() for t in s) for s in state]
    out, final = rnn(x, lengths=lengths, state=state)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss = loss + sum(t.sin().sum() for s in final for t in s)  # every final state, c included
    leaves = [x, *(t for s in state for t in s), *rnn.parameters()]
    return out, final, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_vendor_path_equals_the_step_loop(name, padded, training):
    vendor, loop = _pair(name, num_layers=2, input_dropout=0.2, dropout=0.3, bias=name != "rnn")
    vendor.train(training), loop.train(training)
    T, B = 7, 4
    x = torch.randn(T, B, 6, dtype=torch.float64)
    lengths = torch.tensor([3, 7, 1, 5]) if padded else None
    state = [tuple(torch.randn(B, 5, dtype=torch.float64) for _ in c.state_names) for c in vendor.cells]
    out_v, final_v, grads_v = _outputs_and_grads(vendor, x, lengths, state, seed=3)
    out_l, final_l, grads_l = _outputs_and_grads(loop, x, lengths, state, seed=3)
    assert torch.allclose(out_v, out_l, atol=1e-12)
    if padded:
        assert (out_v[3:, 0] == 0).all() and (out_v[1:, 2] == 0).all()  # padding outputs zeros
    for s_v, s_l in zip(final_v, final_l):
        for a, b in zip(s_v, s_l):
            assert torch.allclose(a, b, atol=1e-12)
    for g_v, g_l in zip(grads_v, grads_l):
        assert torch.allclose(g_v, g_l, atol=1e-12)


def _count_steps(rnn, monkeypatch):
    calls = []
    for cell in rnn.cells:
        original = cell.recur
        monkeypatch.setattr(cell, "recur", lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    return calls


def test_the_vendor_kernel_runs_only_where_it_computes_the_same(monkeypatch):
    x = torch.randn(5, 3, 6)
    rnn = Recurrent("lstm", 6, 5, recurrent_dropout=0.25)
    calls = _count_steps(rnn, monkeypatch)
    rnn.eval()
    rnn(x)  # eval: no recurrent mask, so PyTorch's kernel
    assert calls == []
    rnn.train()
    rnn(x)  # a mask on h_{t−1}: PyTorch's kernels have none, so the step loop
    assert len(calls) == 5

    off = Recurrent("gru", 6, 5, use_vendor_kernel=False)
    calls = _count_steps(off, monkeypatch)
    with torch.no_grad():  # (training with gradients would take GRU's own C++ loop where the kernels serve)
        off(x)
    assert len(calls) == 5

    lm = CharLM(20, "lstm", hidden_size=8, num_layers=2, dropout=0.1)  # the LM gets it as it is
    calls = _count_steps(lm.rnn, monkeypatch)
    lm(torch.randint(0, 20, (9, 2)))
    assert calls == []


def test_only_the_cells_with_pytorch_equations_declare_a_kernel():
    declared = {name for name, spec in CELLS.items() if spec.cls.torch_equivalent is not None}
    assert declared == {"lstm", "gru", "rnn"}
    assert has_vendor_kernel(Recurrent("rnn", 2, 3).cells[0])
    assert not has_vendor_kernel(Recurrent("bn_lstm", 2, 3).cells[0])


def test_torch_func_transforms_take_the_step_loop():
    """vmap and jacrev over the runner must work (PyTorch has no batching rule for its LSTM kernel) and
    agree with plain evaluation and autograd."""
    torch.manual_seed(0)
    rnn = Recurrent("lstm", 3, 4).double()
    x = torch.randn(5, 4, 2, 3, dtype=torch.float64)
    rnn(x[0])  # the plain call first: the vendor path has run once in this process
    batched = torch.func.vmap(lambda inp: rnn(inp)[0])(x)
    assert torch.allclose(batched, torch.stack([rnn(inp)[0] for inp in x]), atol=1e-12)
    jac = torch.func.jacrev(lambda inp: rnn(inp)[0])(x[0])
    ref = torch.autograd.functional.jacobian(lambda inp: rnn(inp)[0], x[0])
    assert torch.allclose(jac, ref, atol=1e-12)


def test_each_cell_has_its_own_template_and_no_submodule():
    """Two models of one shape must not share the module their weights are swapped into (threads), and the
    template adds nothing to the parameters or the state dict."""
    a, b = Recurrent("lstm", 4, 4), Recurrent("lstm", 4, 4)
    x = torch.randn(3, 2, 4)
    a(x), b(x)
    assert a.cells[0]._vendor_template is not b.cells[0]._vendor_template
    assert set(a.state_dict()) == set(Recurrent("lstm", 4, 4).state_dict())
    assert len(list(a.parameters())) == 4
