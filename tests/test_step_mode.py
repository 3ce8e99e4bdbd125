"""The step's paths are chosen by what the caller passes (StepMode), not by global state; gates are read through
hooks; population statistics are estimated through one function of the batch-norm layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from bnrhn.cells import CELLS, REFERENCE, StepMode, build_cell
from bnrhn.layers.seq_batchnorm import SequenceBatchNorm, estimating_population_statistics
from bnrhn.nn import Recurrent

CELLS_DIR = Path(__file__).resolve().parents[1] / "src" / "bnrhn" / "cells"


def _cell(name: str, **opts):
    torch.manual_seed(0)
    size = 5  # MUT1/MUT2 need input size = hidden size
    cell = build_cell(name, size, size, **({"depth": 2} if "rhn" in name else {}), **opts)
    for m in cell.modules():  # batch-norm cells: population statistics that are not the identity
        if isinstance(m, SequenceBatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(3)
    return cell.eval()


@pytest.mark.parametrize("name", list(CELLS))
def test_a_direct_call_under_no_grad_leaves_xp_alone_and_inference_mode_equals_it(name):
    """Before the modes were explicit, every cell overwrote its xp whenever grad mode was off. Now only a caller
    who says xp is scratch (``StepMode(inference=True)``) lets it, and the numbers are the same."""
    cell = _cell(name)
    x, h = torch.randn(4, 5), torch.randn(4, 5)
    state = (h,) if len(cell.state_names) == 1 else (h, torch.randn(4, 5))
    xp = cell.project_input(x)
    kept = xp.clone()
    with torch.no_grad():
        reference = cell.recur(xp, state, 2)
        assert torch.equal(xp, kept), "the reference step wrote into xp"
        fast = cell.recur(xp.clone(), state, 2, mode=StepMode(fused=True, inference=True))
        written = xp.clone()
        plain_inference = cell.recur(written, state, 2, mode=StepMode(inference=True))
    for a, b, c in zip(reference, fast, plain_inference):
        assert torch.allclose(a, b, atol=1e-6, rtol=0) and torch.allclose(a, c, atol=1e-6, rtol=0)
    if name in ("lstm", "rnn", "rhn", "bn_rhn", "bn_rhn_tf", "mut1", "mut2", "mut3"):  # xp is the product's base
        assert not torch.equal(written, kept), "inference mode is expected to use xp as the output buffer"


def test_the_cells_read_no_global_mode():
    """No module of bnrhn.cells asks the global grad mode or whether a torch.func transform runs: the runner
    decides (Recurrent.step_mode) and passes it."""
    asked = []
    for path in sorted(CELLS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in ("is_grad_enabled", "plain_autograd", "_are_functorch_transforms_active"):
                asked.append(f"{path.name}:{node.lineno} {name}")
    assert asked == []


def test_the_runner_passes_fused_modes_and_the_reference_mode_stays_composed(monkeypatch):
    """Recurrent.step_mode: fused with fresh taps for a sequence under autograd, inference without taps under
    no_grad, no taps for one step, and fused=False or a running torch.func transform give the reference."""
    rnn = Recurrent("bn_rhn", 3, 4, depth=2)
    mode = rnn.step_mode(sequence=True)
    assert mode.fused and mode.taps == {} and not mode.inference
    assert rnn.step_mode(sequence=True).taps is not mode.taps  # one set of taps per time loop
    with torch.no_grad():
        assert rnn.step_mode(sequence=True) == StepMode(fused=True, taps=None, inference=True)
    assert rnn.step_mode(sequence=False) == StepMode(fused=True, taps=None, inference=False)
    assert Recurrent("bn_rhn", 3, 4, fused=False).step_mode(sequence=True) == REFERENCE
    seen = []
    monkeypatch.setattr(type(rnn.cells[0]), "recur", lambda self, *a, mode, **k: seen.append(mode) or a[1],
                        raising=True)
    torch.func.vmap(lambda inp: rnn.step(inp, None, 0)[0])(torch.randn(2, 5, 3))
    assert seen and all(m == StepMode(fused=False, taps=None, inference=False) for m in seen)


def test_gate_hooks_see_the_gates_of_every_highway_layer_and_stop_when_removed():
    """t_1 of the first highway layer computed by hand from the weights (depth 2, free carry, no normaliser);
    the hook is called once per layer and step, also in training (it keeps the step on the composition),
    and not after handle.remove()."""
    torch.manual_seed(0)
    rnn = Recurrent("rhn", 3, 4, depth=2, carry="free")
    cell = rnn.cells[0]
    seen = []
    handle = cell.register_gate_hook(lambda layer, t, c: seen.append((layer, t.detach().clone(), c.detach().clone())))
    x = torch.randn(5, 2, 3)
    out, _ = rnn(x)
    out.sum().backward()
    assert [layer for layer, _, _ in seen] == [0, 1] * 5
    H = 4
    pre = x[0] @ cell.weight_ih.t() + cell.bias[0]  # s_0 = 0: the first layer of step 0 reads the input only
    assert torch.allclose(seen[0][1], torch.sigmoid(pre[:, H : 2 * H]), atol=1e-6)
    assert torch.allclose(seen[0][2], torch.sigmoid(pre[:, 2 * H :]), atol=1e-6)
    handle.remove()
    seen.clear()
    rnn(x)
    assert seen == []


def test_estimating_population_statistics_averages_the_batches_and_restores_the_estimator():
    """Inside the block the population statistics become the plain mean of the batches' means and (unbiased)
    variances, computed here by hand; the estimator and min_rows come back afterwards."""
    torch.manual_seed(0)
    bn = SequenceBatchNorm(3, max_steps=2, stats="renorm", min_rows=8)
    bn.running_mean.fill_(7.0)
    bn.num_batches_tracked.fill_(5)  # statistics from earlier batches, which the estimate must not include
    batches = [torch.randn(2, 4, 3) * (k + 1) + k for k in range(3)]
    bn.train()
    with torch.no_grad(), estimating_population_statistics(bn) as norms:
        assert norms == [bn] and bn.stats == "cumulative" and bn.min_rows == 0
        for b in batches:
            bn(b, 0)
    assert bn.stats == "renorm" and bn.min_rows == 8
    for t in range(2):
        mean = torch.stack([b[t].mean(0) for b in batches]).mean(0)
        var = torch.stack([b[t].var(0, unbiased=True) for b in batches]).mean(0)
        assert torch.allclose(bn.running_mean[t], mean, atol=1e-6)
        assert torch.allclose(bn.running_var[t], var, atol=1e-5)
