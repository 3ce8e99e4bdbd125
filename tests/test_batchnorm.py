"""Recurrent batch norm: per-step statistics, masks, population estimates, eval semantics, step decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnrhn.nn import Recurrent, SequenceBatchNorm

BN_CELLS = [("bn_rhn", {"depth": 2}), ("bn_rhn", {"depth": 2, "normalize": "h,t,c"}), ("bn_lstm", {})]
ALL_CELLS = [("rnn", {}), ("lstm", {}), ("gru", {}), ("rhn", {"depth": 2}), ("bn_rhn_tf", {"depth": 2})] + BN_CELLS


def warm_up(rnn, steps=5, T=6, B=8, I=3):
    rnn.train()
    for _ in range(steps):
        rnn(torch.randn(T, B, I) * 2 + 1, lengths=torch.randint(2, T + 1, (B,)))
    rnn.eval()


def test_shared_momentum_statistics_match_torch_batchnorm():
    torch.manual_seed(0)
    ours = SequenceBatchNorm(5, per_step=False, momentum=0.1)
    ref = nn.BatchNorm1d(5, momentum=0.1)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(5))
        ref.bias.copy_(torch.randn(5))
        ours.weight.copy_(ref.weight)
        ours.bias.copy_(ref.bias)
    for t in range(4):
        x = torch.randn(7, 5) * 3 + 2
        assert torch.allclose(ours(x, step=t), ref(x), atol=1e-5)
    assert torch.allclose(ours.running_mean[0], ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var[0], ref.running_var, atol=1e-6)
    ours.eval(), ref.eval()
    x = torch.randn(3, 5)
    assert torch.allclose(ours(x, step=9), ref(x), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_cumulative_statistics_are_population_estimates(masked):
    """Ioffe & Szegedy Alg. 2: E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[sigma^2_B], per time step."""
    torch.manual_seed(0)
    bn = SequenceBatchNorm(3, max_steps=4, stats="cumulative")
    means, vars_ = [], []
    for _ in range(6):
        x = torch.randn(4, 10, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.arange(4.0).reshape(4, 1, 1)
        mask = torch.ones(4, 10, dtype=torch.bool)
        if masked:
            mask[:, 7:] = False
            x[:, 7:] = 1e6  # garbage in padding must not matter
        bn(x, mask=mask)
        v = x[:, :7] if masked else x
        means.append(v.mean(1))
        vars_.append(v.var(1, unbiased=True))
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-4)
    assert torch.allclose(bn.running_var, torch.stack(vars_).mean(0), atol=1e-3)
    assert bn.num_batches_tracked.tolist() == [6, 6, 6, 6]


def test_per_step_statistics_differ_by_step_and_t_max_fallback():
    torch.manual_seed(0)
    bn = SequenceBatchNorm(2, max_steps=3, stats="cumulative", affine=False)
    x = torch.randn(5, 64, 2) + torch.arange(5.0).reshape(5, 1, 1) * 10  # mean 10 t
    bn(x)
    # slots 0, 1 hold steps 0, 1; slot 2 (= T_max - 1) holds steps 2, 3, 4 averaged
    assert bn.running_mean[:, 0].tolist() == pytest.approx([x[t, :, 0].mean().item() for t in (0, 1)] + [x[2:, :, 0].mean().item()], abs=1e-4)
    assert (bn.running_mean[1] - bn.running_mean[0]).abs().min() > 5
    bn.eval()
    probe = torch.full((1, 2), 40.0)
    # steps past T_max use the last slot
    assert torch.equal(bn(probe, step=3), bn(probe, step=2))
    assert torch.equal(bn(probe, step=50), bn(probe, step=2))
    assert not torch.equal(bn(probe, step=0), bn(probe, step=1))


def test_eval_falls_back_to_last_trained_slot():
    bn = SequenceBatchNorm(2, max_steps=10)
    bn(torch.randn(3, 8, 2) + 5)  # trains slots 0..2 only
    bn.eval()
    probe = torch.ones(1, 2)
    assert torch.equal(bn(probe, step=7), bn(probe, step=2))


@pytest.mark.parametrize("name,opts", BN_CELLS)
def test_padding_does_not_change_statistics_or_valid_outputs(name, opts):
    torch.manual_seed(0)
    a = Recurrent(name, 3, 6, **opts)
    b = Recurrent(name, 3, 6, **opts)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 5, 3)
    lengths = torch.tensor([6, 2, 4, 3, 6])
    mask = torch.arange(6).unsqueeze(1) < lengths
    x_garbage = torch.where(mask.unsqueeze(2), x, torch.randn_like(x) * 100)
    out_a, _ = a(x, lengths=lengths)
    out_b, _ = b(x_garbage, lengths=lengths)
    assert torch.allclose(out_a, out_b, atol=1e-5)
    for (na, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.allclose(ba.float(), bb.float(), atol=1e-5), na


@pytest.mark.parametrize("name,opts", BN_CELLS)
def test_eval_output_does_not_depend_on_other_sequences(name, opts):
    torch.manual_seed(0)
    rnn = Recurrent(name, 3, 6, **opts)
    warm_up(rnn)
    x = torch.randn(5, 4, 3)
    alone, _ = rnn(x[:, :1])
    batch, _ = rnn(torch.cat([x[:, :1], x[:, 1:] * 50], dim=1))
    assert torch.allclose(alone[:, 0], batch[:, 0], atol=1e-6)
    # ...while in training mode it does (batch statistics), which is what makes the eval check meaningful
    rnn.train()
    alone, _ = rnn(x[:, :2])
    batch, _ = rnn(torch.cat([x[:, :2], x[:, 2:] * 50], dim=1))
    assert not torch.allclose(alone[:, 0], batch[:, 0], atol=1e-3)


@pytest.mark.parametrize("name,opts", ALL_CELLS)
def test_step_decoding_equals_sequence_forward_in_eval(name, opts):
    torch.manual_seed(0)
    rnn = Recurrent(name, 3, 6, num_layers=2, dropout=0.3, recurrent_dropout=0.3, **opts)
    warm_up(rnn)
    x = torch.randn(7, 4, 3)
    out, final = rnn(x)
    state = None
    for t in range(7):
        y, state = rnn.step(x[t], state, t)
        assert torch.allclose(y, out[t], atol=1e-6), t
    for k in range(2):
        for s_seq, s_step in zip(final[k], state[k]):
            assert torch.allclose(s_seq, s_step, atol=1e-6)


@pytest.mark.parametrize("name,opts", BN_CELLS)
def test_step_path_equals_sequence_path_in_training(name, opts):
    """Training-mode batch statistics and running averages are the same whichever path runs the sequence."""
    torch.manual_seed(0)
    a = Recurrent(name, 3, 6, **opts)
    b = Recurrent(name, 3, 6, **opts)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8, 3)
    out, _ = a(x)
    state = None
    for t in range(5):
        y, state = b.step(x[t], state, t)
        assert torch.allclose(y, out[t], atol=1e-5)
    for (n, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.allclose(ba.float(), bb.float(), atol=1e-5), n


def test_variational_dropout_uses_one_mask_per_sequence():
    torch.manual_seed(0)
    rnn = Recurrent("rnn", 4, 50, dropout=0.5)
    with torch.no_grad():
        rnn.cells[0].weight_hh.zero_()  # output at t depends on x_t only
    x = torch.ones(6, 3, 4)
    out, _ = rnn(x)
    dropped = out == 0
    assert dropped.any()
    assert (dropped == dropped[0]).all()  # the same units dropped at every step


@pytest.mark.parametrize("name", ["rnn", "lstm", "bn_rhn"])
def test_input_output_and_recurrent_dropout_masks_are_drawn_once_per_sequence(name):
    """The sequence forward equals a step loop that reuses one set of masks drawn before the loop."""
    rnn = Recurrent(name, 4, 6, num_layers=2, input_dropout=0.3, dropout=0.4, recurrent_dropout=0.5,
                    **({"depth": 2} if "rhn" in name else {}))
    rnn.train()
    x = torch.randn(5, 3, 4)
    stepper = copy.deepcopy(rnn)  # the same population statistics (batch renormalization reads them)
    torch.manual_seed(7)
    out, _ = rnn(x)
    rnn = stepper
    torch.manual_seed(7)
    masks = rnn.sample_dropout_masks(3)
    for group in (masks.inputs[:1], masks.outputs, masks.recurrent):
        for m in group:
            assert (m == 0).any() and ((m == 0) | (m > 1)).all()  # inverted dropout: 0 or 1/(1-p)
    state, steps = None, []
    for t in range(5):
        y, state = rnn.step(x[t], state, t, dropout_masks=masks)
        steps.append(y)
    assert torch.allclose(out, torch.stack(steps), atol=1e-6)


@pytest.mark.parametrize("name", ["lstm", "bn_lstm", "bn_rhn", "gru"])
@pytest.mark.parametrize("training", [False, True])
def test_step_with_distinct_rows_equals_step_with_repeated_rows(name, training):
    """Recurrent.step(x_distinct, rows=r) == Recurrent.step(x_distinct[r]) (the decoders' shortcut)."""
    torch.manual_seed(0)
    rnn = Recurrent(name, 3, 4, num_layers=2, **({"depth": 2} if "rhn" in name else {}))
    rnn(torch.randn(5, 8, 3))  # population statistics for eval
    rnn.train(training)
    words = torch.randn(3, 3)
    rows = torch.tensor([2, 0, 0, 1, 2, 2])
    state = rnn.init_state(6)
    state = [tuple(s + 0.1 * torch.randn_like(s) for s in layer) for layer in state]
    twin = copy.deepcopy(rnn)
    y1, s1 = rnn.step(words, state, step=3, rows=rows)
    y2, s2 = twin.step(words[rows], state, step=3)
    assert torch.allclose(y1, y2, atol=1e-6)
    for a, b in zip(s1, s2):
        for u, v in zip(a, b):
            assert torch.allclose(u, v, atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        rnn.step(words, state, step=3, rows=torch.tensor([0, 5, 1, 1, 1, 1]))


def test_bad_batchnorm_arguments():
    with pytest.raises(ValueError, match="max_steps"):
        SequenceBatchNorm(3, max_steps=0)
    with pytest.raises(ValueError, match="stats"):
        SequenceBatchNorm(3, stats="ema")
    with pytest.raises(ValueError, match="num_features"):
        SequenceBatchNorm(0)
    with pytest.raises(ValueError, match="features"):
        SequenceBatchNorm(3)(torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="num_features"):
        SequenceBatchNorm(2.5)
    with pytest.raises(ValueError, match="momentum"):
        SequenceBatchNorm(3, momentum=0.0)
    with pytest.raises(ValueError, match="step"):
        SequenceBatchNorm(3)(torch.randn(2, 3), step=-1)
