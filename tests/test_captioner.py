"""Captioning models: masked step API = sequence API, decoding path = teacher-forced path, losses."""

from __future__ import annotations

import pytest
import torch

from bnrhn.cells import CELLS
from bnrhn.models import CaptionerConfig, build_captioner
from bnrhn.nn import Recurrent

ALL_CELLS = list(CELLS)


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_masked_steps_equal_forward_with_lengths(cell):
    """A loop of Recurrent.step(..., mask=) in training mode reproduces forward(x, lengths): outputs, final
    states and batch-norm running statistics (padded positions stay out of them)."""
    torch.manual_seed(0)
    T, B, I, H = 6, 5, 4, 7
    if cell in ("mut1", "mut2"):  # they add the raw input to a hidden-sized vector
        I = H
    a = Recurrent(cell, I, H, num_layers=2, dropout=0.2, recurrent_dropout=0.1, input_dropout=0.1)
    b = Recurrent(cell, I, H, num_layers=2, dropout=0.2, recurrent_dropout=0.1, input_dropout=0.1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(T, B, I)
    lengths = torch.tensor([6, 2, 4, 1, 6])
    a.train(), b.train()
    torch.manual_seed(1)
    out_a, final_a = a(x, lengths=lengths)
    torch.manual_seed(1)
    masks = b.sample_dropout_masks(B)
    valid = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)
    state, outs = None, []
    for t in range(T):
        h, state = b.step(x[t], state, step=t, dropout_masks=masks, mask=valid[t])
        outs.append(h)
    assert torch.allclose(torch.stack(outs), out_a, atol=1e-5)
    for sa, sb in zip(final_a, state):
        assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(sa, sb))
    for (name, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.allclose(ba.float(), bb.float(), atol=1e-5), name


def test_step_mask_is_optional_and_checked():
    r = Recurrent("lstm", 3, 4)
    x = torch.randn(2, 3)
    h1, _ = r.step(x, None, 0)
    h2, _ = r.step(x, None, 0, mask=torch.tensor([True, True]))
    assert torch.equal(h1, h2)
    with pytest.raises(ValueError, match="one entry per sequence"):
        r.step(x, None, 0, mask=torch.tensor([True]))


def _model(kind, cell, vocab=11, seed=0, dropout=0.25):
    torch.manual_seed(seed)
    return build_captioner(CaptionerConfig(model=kind, vocab_size=vocab, feature_size=6, grid_size=4, embed_size=8,
                                           hidden_size=9, cell=cell, attention_size=5, dropout=dropout))


def _batch(kind, B=6, L=7, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, 4, 6, generator=g) if kind == "show_attend_tell" else torch.randn(B, 6, generator=g)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    lengths[0] = L
    tok = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tok[i, :n] = torch.cat([torch.tensor([1]), torch.randint(4, vocab, (n - 2,), generator=g), torch.tensor([2])])
    return f, tok, lengths


@pytest.mark.parametrize("kind", ["show_tell", "show_attend_tell"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "mut3", "rhn", "bn_rhn", "bn_rhn_tf", "bn_lstm"])
def test_decoding_steps_equal_teacher_forcing_in_eval_mode(kind, cell):
    """start()+step() with the reference words give the log-probabilities of the training path: same
    time indices, same batch-norm statistics."""
    m = _model(kind, cell)
    f, tok, lengths = _batch(kind)
    m.train()
    for _ in range(3):  # populate batch-norm statistics
        m.loss(f, tok, lengths)
    m.eval()
    with torch.no_grad():
        logits, targets, mask = m.teacher_forced_logits(f, tok, lengths)
        ref = logits.log_softmax(-1)
        state = m.start(f)
        for t in range(tok.shape[1] - 1):
            logp, state = m.step(tok[:, t], state)
            rows = mask[:, t].bool()
            assert torch.allclose(logp[rows], ref[rows, t], atol=1e-5), f"step {t}"


@pytest.mark.parametrize("kind", ["show_tell", "show_attend_tell"])
def test_loss_masks_padding_and_learns(kind):
    m = _model(kind, "bn_rhn")
    f, tok, lengths = _batch(kind)
    m.eval()
    ce_ref = torch.nn.functional.cross_entropy
    logits, targets, mask = m.teacher_forced_logits(f, tok, lengths)
    expected = (ce_ref(logits.transpose(1, 2), targets, reduction="none") * mask).sum() / mask.sum()
    with torch.no_grad():
        loss, n, parts = m.loss(f, tok, lengths)
    assert n == int((lengths - 1).sum())
    assert torch.isclose(torch.tensor(parts["ce"]), expected, atol=1e-5)
    # padding content does not matter
    tok2 = tok.clone()
    tok2[torch.arange(tok.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)] = 5
    with torch.no_grad():
        assert torch.isclose(m.loss(f, tok2, lengths)[0], loss)
    if kind == "show_attend_tell":
        assert parts["attention_reg"] > 0
    m = _model(kind, "bn_rhn", dropout=0.0).train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    first = None
    for _ in range(40):  # memorise six captions
        loss, _, _ = m.loss(f, tok, lengths)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_doubly_stochastic_regulariser_is_the_coverage_penalty():
    """loss − CE = λ · mean_b Σ_i (1 − Σ_t α_{t,i})², with α taken from step-by-step decoding over each
    caption's own steps (Xu et al. 2015, eq. 14), and λ = alpha_c scales it."""
    f, tok, lengths = _batch("show_attend_tell")
    for alpha_c in (1.0, 0.25):
        torch.manual_seed(0)
        m = build_captioner(CaptionerConfig(model="show_attend_tell", vocab_size=11, feature_size=6, grid_size=4,
                                            embed_size=8, hidden_size=9, cell="lstm", attention_size=5,
                                            dropout=0.0, alpha_c=alpha_c)).eval()
        with torch.no_grad():
            loss, _, parts = m.loss(f, tok, lengths)
            coverage = torch.zeros(f.shape[0], f.shape[1])
            for b in range(f.shape[0]):  # one caption at a time: no padding involved
                state = m.start(f[b : b + 1])
                for t in range(int(lengths[b]) - 1):
                    _, state = m.step(tok[b : b + 1, t], state)
                    alpha = state.extra["alpha"][0]
                    assert torch.isclose(alpha.sum(), torch.tensor(1.0))
                    coverage[b] += alpha
        expected = alpha_c * (1 - coverage).square().sum(1).mean()
        assert parts["attention_reg"] == pytest.approx(float(expected), rel=1e-5)
        assert float(loss) == pytest.approx(parts["ce"] + float(expected), rel=1e-5)


def test_model_config_errors():
    with pytest.raises(ValueError, match="unknown captioning model"):
        build_captioner(CaptionerConfig(model="show_and_guess", vocab_size=10))
    with pytest.raises(ValueError, match="vocab_size"):
        build_captioner(CaptionerConfig(vocab_size=3))
    with pytest.raises(ValueError, match="unknown cell"):
        build_captioner(CaptionerConfig(vocab_size=10, cell="transformer"))
    m = _model("show_attend_tell", "lstm")
    with pytest.raises(ValueError, match="grid features"):
        m.start(torch.randn(2, 6))


def test_grad_clip_zero_means_off_as_for_language_models():
    from bnrhn.captioning import CaptionConfig

    assert CaptionConfig(grad_clip=0).grad_clip is None and CaptionConfig(grad_clip=2.5).grad_clip == 2.5


@pytest.mark.parametrize("kind", ["show_tell", "show_attend_tell"])
def test_real_token_logits_are_the_teacher_forced_logits_at_the_real_targets(kind):
    """No logits for padding: the N rows are those of the full [B, L−1, V] logits where the mask is set, in
    row-major order, with their targets; the number of rows is Σ (length − 1)."""
    m = _model(kind, "bn_rhn").eval()
    f, tok, lengths = _batch(kind)
    with torch.no_grad():
        full, targets, mask = m.teacher_forced_logits(f, tok, lengths)
        logits, real_targets, valid = m.real_token_logits(f, tok, lengths)
    assert torch.equal(valid, mask.bool()) and logits.shape[0] == int((lengths - 1).sum())
    rows, cols = valid.nonzero(as_tuple=True)
    assert torch.equal(real_targets, targets[rows, cols])
    assert torch.allclose(logits, full[rows, cols], atol=1e-5)


def _masked_teacher_forcing(m, grid, tokens, lengths):
    """Show, Attend and Tell's teacher-forced pass as one masked step over the whole batch at every t (the
    formulation the packed pass replaced; an independent path): finished captions keep their state and stay
    out of batch-norm statistics through the runner's ``mask``."""
    from bnrhn.models.captioner import _target_mask

    grid = m.normalize(grid)
    state, keys = m._init(m.drop(grid))
    B, L = tokens.shape
    masks = m.rnn.sample_dropout_masks(B)
    emb = m.embed(tokens[:, :-1])
    valid = _target_mask(tokens, lengths)
    h = state[-1][0]
    outs, alphas = [], []
    for t in range(L - 1):
        z, alpha = m._attend(grid, keys, h)
        _, state = m.rnn.step(torch.cat([emb[:, t], z], 1), state, step=t, dropout_masks=masks, mask=valid[:, t])
        h = torch.where(valid[:, t : t + 1], state[-1][0], h)
        outs.append(emb[:, t] + m.out_h(state[-1][0]) + m.out_z(z))
        alphas.append(alpha)
    return torch.stack(outs, 1), torch.stack(alphas, 1), valid


@pytest.mark.parametrize("cell,options", [("lstm", {}), ("rhn", {"depth": 2}), ("bn_rhn", {"depth": 2}),
                                          ("bn_rhn", {"depth": 2, "stats": "momentum"}), ("bn_lstm", {})])
def test_packed_attention_pass_equals_the_masked_one(cell, options):
    """The packed teacher-forced pass of Show, Attend and Tell (training mode: dropout, batch statistics)
    equals the masked one at every real position, with zeros past each caption's end; so do the gradients
    of every parameter and the batch norms' running statistics (float64). Lengths 7, 7, 6, 5, 5, 3 leave
    one caption at the last steps: batch norm's fallback for too few rows is met too."""
    f, tok, _ = _batch("show_attend_tell")
    lengths = torch.tensor([5, 7, 3, 6, 7, 5])
    for i, n in enumerate(lengths.tolist()):
        tok[i, n:] = 0
        tok[i, n - 1] = 2
    cfg = CaptionerConfig(model="show_attend_tell", vocab_size=11, feature_size=6, grid_size=4, embed_size=8,
                          hidden_size=9, cell=cell, cell_options=options, attention_size=5, dropout=0.2)
    torch.manual_seed(0)
    packed = build_captioner(cfg).double().train()
    masked = build_captioner(cfg).double().train()
    masked.load_state_dict(packed.state_dict())
    f = f.double()
    results = []
    for model, run in ((packed, lambda m: m._run(f, tok, lengths)), (masked, lambda m: _masked_teacher_forcing(m, f, tok, lengths))):
        for _ in range(2):  # twice: the second pass renormalises against the first one's running statistics
            torch.manual_seed(1)  # the same dropout masks
            pre, alphas, valid = run(model)
        w = torch.linspace(-1, 1, pre.numel(), dtype=pre.dtype).view_as(pre)
        loss = (pre * w * valid.unsqueeze(-1)).sum() + (alphas * valid.unsqueeze(-1)).square().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results.append((pre, alphas, valid, grads, dict(model.named_buffers())))
    (pre_p, al_p, valid, grads_p, buf_p), (pre_m, al_m, _, grads_m, buf_m) = results
    real = valid.unsqueeze(-1)
    assert torch.allclose(pre_p * real, pre_m * real, atol=1e-12, rtol=0)
    assert torch.allclose(al_p * real, al_m * real, atol=1e-12, rtol=0)
    assert not (pre_p * ~real).any() and not (al_p * ~real).any()  # nothing computed past the ends
    for (name, _), gp, gm in zip(packed.named_parameters(), grads_p, grads_m):
        assert (gp is None) == (gm is None), name
        if gp is not None:
            assert torch.allclose(gp, gm, atol=1e-11, rtol=0), name
    for name, b in buf_p.items():
        assert torch.allclose(b.double(), buf_m[name].double(), atol=1e-12), name


def test_packed_attention_pass_runs_every_step_when_batch_norm_is_synchronised(monkeypatch):
    """With statistics over several processes, a process whose captions all end early must still run the
    steps past them (with no rows), or the processes' reductions would no longer pair up. Here batch norm
    is made to report itself synchronised and each of its calls is recorded (computing with the local
    statistics): with tokens padded two steps past the longest caption, every step is still run."""
    from bnrhn.nn import SequenceBatchNorm

    f, tok, lengths = _batch("show_attend_tell", B=4, L=7)
    tok = torch.nn.functional.pad(tok, (0, 2))  # two steps that no caption reaches
    m = build_captioner(CaptionerConfig(model="show_attend_tell", vocab_size=11, feature_size=6, grid_size=4,
                                        embed_size=8, hidden_size=9, cell="bn_rhn", cell_options={"depth": 2},
                                        attention_size=5, dropout=0.0)).train()
    steps = []
    monkeypatch.setattr(SequenceBatchNorm, "synchronized", property(lambda self: True))
    monkeypatch.setattr(SequenceBatchNorm, "_forward_synchronized",
                        lambda self, x, step0, mask: steps.append((step0, x.shape[1])) or self._forward_step(x[0], step0, None)[None])
    pre, alphas, valid = m._run(f, tok, lengths)
    assert sorted({t for t, _ in steps}) == list(range(tok.shape[1] - 1))
    assert {rows for t, rows in steps if t >= 6} == {0}  # past the longest caption: no rows, still there
    assert not pre[:, 6:].any() and not alphas[:, 6:].any()
