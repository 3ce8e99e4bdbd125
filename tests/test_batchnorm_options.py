"""The statistics options that keep training's batch norm close to inference's: batch renormalization
(``stats="renorm"``, Ioffe 2017) and the population fallback of steps with few valid rows (``min_rows``)."""

from __future__ import annotations

import copy

import pytest
import torch

from bnrhn.cells import build_cell
from bnrhn.nn import Recurrent, SequenceBatchNorm


def trained_slots(bn: SequenceBatchNorm, T: int = 4, batches: int = 3, B: int = 16) -> SequenceBatchNorm:
    """Give every slot real population statistics (shifted and scaled so that they differ from a batch's)."""
    bn.train()
    for _ in range(batches):
        bn(torch.randn(T, B, bn.num_features, dtype=bn.running_mean.dtype) * 3 + 1)
    return bn


def by_hand_population(x, bn, steps):
    """γ (x − μ_t)/√(σ²_t + ε) + β with the population statistics of each step's slot."""
    mean = bn.running_mean[steps].unsqueeze(1)
    var = bn.running_var[steps].unsqueeze(1)
    y = (x - mean) / torch.sqrt(var + bn.eps)
    return y * bn.weight + (bn.bias if bn.bias is not None else 0)


# -- batch renormalization ---------------------------------------------------------------------------------------
def test_renorm_with_unit_limits_is_plain_batch_norm():
    torch.manual_seed(0)
    plain = SequenceBatchNorm(5, max_steps=4)
    renorm = SequenceBatchNorm(5, max_steps=4, stats="renorm", renorm_rmax=1.0, renorm_dmax=0.0, renorm_warmup=0)
    trained_slots(plain), trained_slots(renorm)  # (different population statistics: they must not matter)
    x = torch.randn(4, 9, 5, requires_grad=True)
    y1, y2 = plain(x), renorm(x)
    assert torch.allclose(y1, y2, atol=1e-5)
    g1, = torch.autograd.grad(y1.square().sum(), x)
    g2, = torch.autograd.grad(y2.square().sum(), x)
    assert torch.allclose(g1, g2, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_renorm_unclipped_training_output_equals_eval_output(masked):
    """With limits that never bind, y = γ((x − μ_B)/σ_B · r + d) + β is the eval-mode output exactly."""
    torch.manual_seed(1)
    bn = SequenceBatchNorm(6, max_steps=4, stats="renorm", renorm_rmax=1e6, renorm_dmax=1e6, renorm_warmup=0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    trained_slots(bn)
    x = torch.randn(4, 10, 6) * 2 - 1
    mask = torch.ones(4, 10, dtype=torch.bool)
    if masked:
        mask[2:, 6:] = False
    bn.eval()
    expect = bn(x)
    assert torch.allclose(expect, by_hand_population(x, bn, torch.arange(4)), atol=1e-5)
    bn.train()
    y = bn(x, mask=mask)
    assert torch.allclose(y, expect, atol=1e-4)
    one = copy.deepcopy(bn).train()  # the one-step form agrees too
    one_eval = copy.deepcopy(one).eval()
    assert torch.allclose(one(x[1], step=1, mask=mask[1]), one_eval(x[1], step=1), atol=1e-4)


def test_renorm_clipped_corrections_and_warmup():
    """r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), computed by hand; a slot
    that has seen no batch yet (warm-up) is plain batch norm."""
    torch.manual_seed(2)
    bn = SequenceBatchNorm(3, max_steps=2, stats="renorm", renorm_rmax=1.5, renorm_dmax=0.5, renorm_warmup=4,
                           affine=False)
    x = torch.randn(2, 20, 3) * 4 + 3
    y0 = bn(x)  # no statistics yet: limits (1, 0)
    mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    assert torch.allclose(y0, (x - mu) / torch.sqrt(var + bn.eps), atol=1e-5)
    for _ in range(5):
        bn(torch.randn(2, 20, 3))  # slots now past the warm-up, population ≈ N(0, 1) - the momentum average
    pm, ps = bn.running_mean.clone().unsqueeze(1), torch.sqrt(bn.running_var.clone().unsqueeze(1) + bn.eps)
    y = bn(x)
    sb = torch.sqrt(var + bn.eps)
    r = (sb / ps).clamp(1 / 1.5, 1.5)
    d = ((mu - pm) / ps).clamp(-0.5, 0.5)
    assert bool((r == 1.5).all()) and bool((d.abs() == 0.5).any())  # the limits do bind here
    assert torch.allclose(y, (x - mu) / sb * r + d, atol=1e-5)


def test_renorm_ignores_padded_rows():
    torch.manual_seed(3)
    bn = trained_slots(SequenceBatchNorm(4, max_steps=3, stats="renorm", renorm_warmup=0), T=3)
    x = torch.randn(3, 8, 4)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1:, 5:] = False
    a, b = copy.deepcopy(bn), copy.deepcopy(bn)
    x2 = x.clone()
    x2[~mask] = 1e4
    ya, yb = a(x, mask=mask), b(x2, mask=mask)
    assert torch.allclose(ya[mask], yb[mask], atol=1e-5)
    assert torch.allclose(a.running_mean, b.running_mean) and torch.allclose(a.running_var, b.running_var)


def test_renorm_gradcheck_float64_where_the_limits_bind():
    """Where r and d sit at their limits they are locally constant, so the backward that treats them as
    constants is the true derivative: gradcheck applies."""
    torch.manual_seed(4)
    bn = SequenceBatchNorm(3, max_steps=3, stats="renorm", renorm_rmax=1.2, renorm_dmax=0.1, renorm_warmup=0).double()
    trained_slots(bn, T=3)
    bn.momentum = 1e-300  # keep the population statistics (constants of the function) fixed between the evaluations
    x = (torch.randn(3, 6, 3, dtype=torch.float64) * 8 + 20).requires_grad_()  # far from the population: clipped
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _call(bn, x, w, b, mask), (x, w, b))


def test_renorm_backward_treats_r_and_d_as_constants():
    """Unclipped, the gradient is that of γ((x − μ_B)/σ_B · r + d) + β with r, d frozen (Ioffe 2017, §3),
    written out here by hand over the valid rows."""
    torch.manual_seed(10)
    bn = SequenceBatchNorm(4, max_steps=2, stats="renorm", renorm_rmax=1e6, renorm_dmax=1e6, renorm_warmup=0).double()
    trained_slots(bn, T=2)
    bn.momentum = 1e-300
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    upstream = torch.randn(2, 7, 4, dtype=torch.float64)
    got, = torch.autograd.grad((bn(x, mask=mask) * upstream).sum(), x)
    xr = x.detach().clone().requires_grad_()
    outs = []
    for t in range(2):
        v = xr[t][mask[t]]
        mu, sb = v.mean(0), torch.sqrt(v.var(0, unbiased=False) + bn.eps)
        sp = torch.sqrt(bn.running_var[t] + bn.eps)
        r, d = (sb / sp).detach(), ((mu - bn.running_mean[t]) / sp).detach()
        outs.append(((xr[t] - mu) / sb * r + d) * bn.weight.detach() + bn.bias.detach())
    expect, = torch.autograd.grad((torch.stack(outs) * upstream).sum(), xr)
    assert torch.allclose(got, expect, atol=1e-10)


def twin_norms(features: int, **options) -> tuple[SequenceBatchNorm, SequenceBatchNorm]:
    """Two equal float64 norms with γ in [0.5, 1.5] and β drawn (where they have them), for comparing two paths."""
    first, second = SequenceBatchNorm(features, **options).double(), SequenceBatchNorm(features, **options).double()
    with torch.no_grad():
        if first.weight is not None:
            first.weight.uniform_(0.5, 1.5)
        if first.bias is not None:
            first.bias.normal_()
    second.load_state_dict(first.state_dict())
    return first, second


@pytest.mark.parametrize("opts", [{}, {"max_steps": 2}, {"affine": False}, {"center": False},  # BN-LSTM's input norm
                                  {"per_step": False, "renorm_rmax": 1.2, "renorm_dmax": 0.1}])
def test_renorm_of_full_batches_in_one_kernel_equals_the_composition(opts, monkeypatch):
    """A full batch ([T, B, F], no mask) is renormalised by PyTorch's batch-norm kernel with the (step, feature)
    pairs as channels; an all-True mask takes the composition of autograd operations. Same outputs, gradients
    and population statistics (float64), over successive batches (later ones read what earlier ones wrote)."""
    from bnrhn.layers import seq_batchnorm

    calls = []
    original = seq_batchnorm._RenormalisedRows.apply
    monkeypatch.setattr(seq_batchnorm._RenormalisedRows, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(11)
    kw = {"stats": "renorm", "renorm_warmup": 2, "max_steps": 4, **opts}
    fast, composed = twin_norms(5, **kw)
    T, B = 4, 6
    for i in range(3):
        z = (torch.randn(B, T, 5, dtype=torch.float64) * 3 + i).requires_grad_()  # batch-major, as BN-LSTM's
        upstream = torch.randn(T, B, 5, dtype=torch.float64)
        results = []
        for bn, mask in ((fast, None), (composed, torch.ones(T, B, dtype=torch.bool))):
            y = bn(z.transpose(0, 1), mask=mask)
            params = [q for q in (bn.weight, bn.bias) if q is not None]
            results.append((y, torch.autograd.grad((y * upstream).sum(), [z, *params])))
        (yf, gf), (yc, gc) = results
        assert torch.allclose(yf, yc, atol=1e-12, rtol=0)
        for a, b in zip(gf, gc):
            assert torch.allclose(a, b, atol=1e-11, rtol=0)
        for a, b in zip(fast.buffers(), composed.buffers()):
            assert torch.allclose(a.double(), b.double(), atol=1e-12, rtol=0)
    assert len(calls) == 3  # the fast path ran


def _call(bn, x, w, b, mask):
    """bn(x) as a function of γ and β too (functional_call keeps the module's buffers)."""
    return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,), {"mask": mask})


# -- the population fallback of steps with few valid rows ----------------------------------------------------
def test_min_rows_steps_below_use_population_statistics_and_update_nothing():
    torch.manual_seed(5)
    bn = trained_slots(SequenceBatchNorm(4, max_steps=4, min_rows=4))
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x = torch.randn(4, 8, 4) * 2
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :6] = True  # steps 0-1: 6 valid rows (batch statistics)
    mask[2:, 3:] = False  # steps 2-3: 3 valid rows (< min_rows: population statistics)
    y = bn(x, mask=mask)
    pop = by_hand_population(x, bn, torch.arange(4))
    assert torch.allclose(y[2:], pop[2:], atol=1e-5)
    v = x[:2, :6]
    batch = (x[:2] - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True) + bn.eps)
    assert torch.allclose(y[:2], batch * bn.weight + bn.bias, atol=1e-5)
    assert torch.equal(bn.num_batches_tracked, before[2] + torch.tensor([1, 1, 0, 0]))
    assert torch.equal(bn.running_mean[2:], before[0][2:]) and torch.equal(bn.running_var[2:], before[1][2:])
    # the one-step form: 3 valid rows of 8 at step 3 → population; the padded rows never matter
    bn.train()
    y3 = bn(x[3], step=3, mask=mask[3])
    assert torch.allclose(y3[mask[3]], pop[3][mask[3]], atol=1e-5)
    # a full batch smaller than min_rows too
    assert torch.allclose(bn(x[1, :3], step=1), pop[1, :3], atol=1e-5)


def test_min_rows_before_any_statistics_keeps_batch_statistics():
    bn = SequenceBatchNorm(2, max_steps=2, min_rows=8)
    x = torch.randn(2, 5, 2)
    y = bn(x)
    mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    assert torch.allclose(y, (x - mu) / torch.sqrt(var + bn.eps), atol=1e-5)


def test_min_rows_gradcheck_float64():
    torch.manual_seed(6)
    bn = trained_slots(SequenceBatchNorm(3, max_steps=3, min_rows=4).double(), T=3)
    bn.momentum = 1e-300
    x = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 2:] = False  # step 2: two rows, population statistics; steps 0-1: masked batch statistics
    mask[1, 5] = False
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _call(bn, x, w, b, mask), (x, w, b))


# -- the options inside the cells ------------------------------------------------------------------------------
@pytest.mark.parametrize("stats", ["momentum", "renorm"])
@pytest.mark.parametrize("name,opts", [("bn_rhn", {"depth": 2}), ("bn_lstm", {})])
def test_cells_with_min_rows_above_the_batch_train_like_eval(name, opts, stats):
    """Every training step with fewer rows than min_rows normalises like inference: training output = eval
    output (dropout off), through the cells' fused-kernel checks as well."""
    torch.manual_seed(7)
    rnn = Recurrent(name, 3, 5, **opts, min_rows=6, stats=stats)
    rnn.train()
    for _ in range(3):
        rnn(torch.randn(4, 12, 3))  # 12 rows ≥ 6: batch statistics, population statistics learnt
    x = torch.randn(4, 5, 3)
    lengths = torch.tensor([4, 4, 3, 2, 1])
    ev = copy.deepcopy(rnn).eval()
    expect, _ = ev(x, lengths=lengths)
    got, _ = rnn(x, lengths=lengths)  # 5 rows < 6
    assert torch.allclose(got, expect, atol=1e-5)


@pytest.mark.parametrize("name,opts", [("bn_rhn", {"depth": 2}), ("bn_lstm", {})])
def test_cells_with_unclipped_renorm_train_like_eval(name, opts):
    torch.manual_seed(8)
    rnn = Recurrent(name, 3, 5, **opts, stats="renorm", renorm_rmax=1e6, renorm_dmax=1e6, renorm_warmup=0)
    rnn.train()
    for _ in range(3):
        rnn(torch.randn(4, 12, 3))
    x = torch.randn(4, 7, 3)
    lengths = torch.tensor([4, 4, 3, 2, 2, 1, 4])
    expect, _ = copy.deepcopy(rnn).eval()(x, lengths=lengths)
    got, _ = rnn(x, lengths=lengths)
    assert torch.allclose(got, expect, atol=1e-4)


# renorm with limits (1, 0): its code path in the cell, where r = 1 and d = 0 are exact (the backward treats
# r, d as constants, which is the true derivative only where they are constant; see the module-level tests)
@pytest.mark.parametrize("stats,extra", [("renorm", {"renorm_warmup": 0, "renorm_rmax": 1.0, "renorm_dmax": 0.0}),
                                         ("momentum", {"min_rows": 5})])
def test_bn_rhn_cell_gradcheck_float64_with_statistics_options(stats, extra):
    torch.manual_seed(9)
    rnn = Recurrent("bn_rhn", 2, 3, depth=2, stats=stats, **extra).double()  # (renorm: the cell's default)
    rnn.train()
    rnn(torch.randn(3, 8, 2, dtype=torch.float64))
    for bn in rnn.modules():
        if isinstance(bn, SequenceBatchNorm):
            bn.momentum = 1e-300
    x = torch.randn(3, 6, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 3, 3, 2, 2, 1])  # step 2 has 3 rows (< 5 with min_rows)
    assert torch.autograd.gradcheck(lambda x: rnn(x, lengths=lengths)[0], (x,))


def test_bad_statistics_options_are_named():
    for kwargs, word in [({"min_rows": -1}, "min_rows"), ({"min_rows": 2.5}, "min_rows"),
                         ({"renorm_rmax": 0.5}, "renorm_rmax"), ({"renorm_dmax": -1.0}, "renorm_dmax"),
                         ({"renorm_warmup": -3}, "renorm_warmup"), ({"stats": "precise"}, "stats")]:
        with pytest.raises(ValueError, match=word):
            SequenceBatchNorm(4, **kwargs)
        with pytest.raises(ValueError, match=word):
            build_cell("bn_rhn", 3, 4, **kwargs)
        with pytest.raises(ValueError, match=word):
            build_cell("bn_lstm", 3, 4, **kwargs)


@pytest.mark.parametrize("stats", ["renorm", "momentum"])
@pytest.mark.parametrize("case", ["full batch", "center", "no affine", "padded", "one step", "eval"])
def test_a_shift_folded_into_the_norm_equals_adding_it_after(stats, case):
    """BN-LSTM passes its bias as the input norm's ``shift``; on full batches (the first three cases) it becomes
    the kernel's own shift, elsewhere (padded, one step, eval) it is added after. Outputs, gradients (input, γ,
    β, shift) and population statistics equal BN(x) + shift, float64."""
    torch.manual_seed(5)
    kw = {"stats": stats, "renorm_warmup": 1, "max_steps": 4, "center": case == "center",
          "affine": case != "no affine"}
    folded, added = twin_norms(3, **kw)
    T, B = 4, 5
    mask = torch.ones(T, B, dtype=torch.bool)
    mask[2:, 3:] = False
    for i in range(2):  # in training, the second batch reads the population statistics the first one wrote
        z = (torch.randn(B, T, 3, dtype=torch.float64) * 2 + i).requires_grad_()
        x = z[:, 0] if case == "one step" else z.transpose(0, 1)
        shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
        m = mask if case == "padded" else None
        if case == "eval":
            folded.eval(), added.eval()
        results = []
        for bn, y_of in ((folded, lambda bn: bn(x, 0, m, shift=shift)), (added, lambda bn: bn(x, 0, m) + shift)):
            y = y_of(bn)
            params = [q for q in (bn.weight, bn.bias) if q is not None]
            results.append((y, torch.autograd.grad((y * torch.cos(y)).sum(), [z, shift, *params])))
        (yf, gf), (ya, ga) = results
        assert torch.allclose(yf, ya, atol=1e-12, rtol=0)
        for a, b in zip(gf, ga, strict=True):
            assert torch.allclose(a, b, atol=1e-11, rtol=0)
    assert torch.equal(folded.running_mean, added.running_mean) and torch.equal(folded.running_var, added.running_var)


def test_a_shift_of_another_shape_is_refused():
    bn = SequenceBatchNorm(3, center=False).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    for shift in (torch.tensor(0.5), torch.zeros(1), torch.zeros(1, 3), torch.zeros(4)):
        with pytest.raises(ValueError, match=r"shift must have shape \(3,\)"):
            bn(x, shift=shift.double())
