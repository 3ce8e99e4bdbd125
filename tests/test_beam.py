"""Decoding: beam 1 = greedy, batched beam = per-image reference, exhaustive search on a tiny vocabulary,
scores = the model's own log-probabilities, sampling."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch

from bnrhn.decoding import beam_search, beam_search_one, decode, greedy, sample
from bnrhn.models import CaptionerConfig, build_captioner

# 4 special tokens + 4 words
V = 8


@functools.lru_cache(maxsize=None)
def tiny_model(model="show_tell", cell="lstm", seed=0, vocab=V):
    """A tiny captioner fitted for a moment to a toy task whose caption length and words depend on the
    image, so that decoding sees hypotheses ending at different steps (and batch norm gets statistics)."""
    torch.manual_seed(seed)
    cfg = CaptionerConfig(model=model, vocab_size=vocab, feature_size=6, grid_size=4, embed_size=8, hidden_size=8,
                          cell=cell, attention_size=5, dropout=0.0)
    m = build_captioner(cfg)
    g = torch.Generator().manual_seed(seed + 7)
    f = torch.randn(48, 4, 6, generator=g) if model == "show_attend_tell" else torch.randn(48, 6, generator=g)
    flat = f.mean(1) if f.dim() == 3 else f
    lengths = 1 + (flat[:, 0] > 0).long() + (flat[:, 1] > 0).long() * 2  # 1..4 words
    tok = torch.zeros(48, 6, dtype=torch.long)
    for i in range(48):
        n = int(lengths[i])
        words = 4 + (torch.arange(n) + int(flat[i, 2] > 0)) % (vocab - 4)
        tok[i, : n + 2] = torch.cat([torch.tensor([1]), words, torch.tensor([2])])
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    m.train()
    for _ in range(60):
        loss, _, _ = m.loss(f, tok, lengths + 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def every_caption(words, max_words: int):
    """Every caption of at most ``max_words`` of ``words``: (word lists, ``<start> w.. <end>`` token rows padded
    with 0, their lengths)."""
    cands = [list(c) for n in range(max_words + 1) for c in itertools.product(words, repeat=n)]
    seqs = torch.zeros(len(cands), max_words + 2, dtype=torch.long)
    for k, c in enumerate(cands):
        seqs[k, : len(c) + 2] = torch.tensor([1] + c + [2])
    return cands, seqs, torch.tensor([len(c) + 2 for c in cands])


@torch.no_grad()
def sequence_logprob(model, features, tokens, lengths):
    """log p(w_1 .. w_n <end> | image) of each caption by teacher forcing, ``[B]`` (the reference the searches
    are checked against)."""
    logits, targets, mask = model.teacher_forced_logits(features, tokens, lengths)
    logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1)



def feats(model, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 6, generator=g) if model == "show_attend_tell" else torch.randn(n, 6, generator=g)


def rescore(m, f, tokens):
    """log p(tokens <end> | image) by teacher forcing."""
    seq = torch.tensor([[1] + tokens + [2]])
    return float(sequence_logprob(m, f.unsqueeze(0), seq, torch.tensor([len(tokens) + 2]))[0])


@pytest.mark.parametrize("model,cell", [("show_tell", "lstm"), ("show_tell", "bn_rhn"), ("show_tell", "gru"),
                                        ("show_attend_tell", "lstm"), ("show_attend_tell", "bn_lstm")])
def test_beam_one_equals_greedy(model, cell):
    m = tiny_model(model, cell)
    f = feats(model, 12)
    g = greedy(m, f, max_len=6)
    b = beam_search(m, f, beam_size=1, max_len=6)
    assert [h.tokens for h in g] == [h[0].tokens for h in b]
    assert all(math.isclose(x.logprob, y[0].logprob, abs_tol=1e-4) for x, y in zip(g, b))
    assert len({len(h.tokens) for h in g}) > 1  # captions of different lengths (see tiny_model)


@pytest.mark.parametrize("model,cell", [("show_tell", "lstm"), ("show_tell", "bn_rhn"), ("show_attend_tell", "gru")])
@pytest.mark.parametrize("length_norm", [0.0, 0.7])
def test_batched_beam_equals_per_image_reference(model, cell, length_norm):
    m = tiny_model(model, cell)
    f = feats(model, 10)
    batched = beam_search(m, f, beam_size=3, max_len=7, length_norm=length_norm, topk=3)
    for i in range(len(f)):
        ref = beam_search_one(m, f[i], beam_size=3, max_len=7, length_norm=length_norm, topk=3)
        assert [h.tokens for h in batched[i]] == [h.tokens for h in ref]
        assert all(math.isclose(a.score, b.score, abs_tol=1e-4) for a, b in zip(batched[i], ref))


@pytest.mark.parametrize("vocab,beam", [(5, 3), (6, 4), (5, 5)])
def test_batched_beam_when_a_beam_has_fewer_words_than_the_candidates_kept(vocab, beam):
    """2·beam extensions are kept per step, but one beam row has only vocab − 3 allowed words: the
    batched search pads with impossible candidates and must still equal the reference search."""
    m = tiny_model("show_tell", "lstm", vocab=vocab)
    f = feats("show_tell", 8)
    batched = beam_search(m, f, beam_size=beam, max_len=5, topk=2)
    for i in range(len(f)):
        ref = beam_search_one(m, f[i], beam_size=beam, max_len=5, topk=2)
        assert [h.tokens for h in batched[i]] == [h.tokens for h in ref]
        assert all(math.isclose(a.score, b.score, abs_tol=1e-4) for a, b in zip(batched[i], ref))


@pytest.mark.parametrize("model,cell", [("show_tell", "lstm"), ("show_tell", "bn_rhn"), ("show_attend_tell", "lstm")])
def test_beam_matches_exhaustive_search_on_tiny_vocabulary(model, cell):
    """4 words, at most 3 of them: all 1 + 4 + 16 + 64 = 85 captions scored by teacher forcing."""
    m = tiny_model(model, cell)
    f = feats(model, 4)
    cands, seqs, lengths = every_caption(words=range(4, V), max_words=3)
    for i in range(len(f)):
        lp = sequence_logprob(m, f[i].expand(len(cands), *f[i].shape), seqs, lengths).tolist()
        scored = sorted(zip(lp, cands), key=lambda s: -s[0])
        # a beam wide enough to hold every candidate is exhaustive
        wide = beam_search(m, f[i : i + 1], beam_size=100, max_len=3, topk=5)[0]
        assert [h.tokens for h in wide] == [c for _, c in scored[:5]]
        assert all(math.isclose(h.logprob, s, abs_tol=1e-4) for h, (s, _) in zip(wide, scored))
        # beam 3: every hypothesis carries the exhaustive score of its caption, the best comes first,
        # and on this tiny vocabulary the narrow beam finds the true optimum
        exact = {tuple(c): s for s, c in scored}
        best = beam_search(m, f[i : i + 1], beam_size=3, max_len=3, topk=3)[0]
        assert all(math.isclose(h.logprob, exact[tuple(h.tokens)], abs_tol=1e-4) for h in best)
        assert [h.score for h in best] == sorted((h.score for h in best), reverse=True)
        assert best[0].tokens == scored[0][1]


@pytest.mark.parametrize("model,cell", [("show_tell", "lstm"), ("show_tell", "bn_rhn"), ("show_attend_tell", "lstm")])
@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_length_normalised_beam_matches_exhaustive_search(model, cell, alpha):
    """Length normalisation α > 0 against every caption: all 85 captions of at most 3 of the 4 words, each
    scored by teacher forcing as log p(w_1 .. w_n <end>) / (n + 1)^α (the n words plus <end>). A beam of 100
    holds every prefix (at most 4³ = 64 alive at once), so the search is exhaustive and must return the top
    captions of that ranking in order, with those scores."""
    m = tiny_model(model, cell)
    f = feats(model, 8)
    cands, seqs, lengths = every_caption(words=range(4, V), max_words=3)
    changed = 0
    for i in range(len(f)):
        lp = sequence_logprob(m, f[i].expand(len(cands), *f[i].shape), seqs, lengths).tolist()
        normed = sorted(((s / (len(c) + 1) ** alpha, s, c) for s, c in zip(lp, cands)), key=lambda x: -x[0])
        raw = sorted(zip(lp, cands), key=lambda x: -x[0])
        changed += [c for _, _, c in normed[:5]] != [c for _, c in raw[:5]]
        wide = beam_search(m, f[i : i + 1], beam_size=100, max_len=3, length_norm=alpha, topk=5)[0]
        assert [h.tokens for h in wide] == [c for _, _, c in normed[:5]], i
        for h, (score, logprob, _) in zip(wide, normed):
            assert math.isclose(h.score, score, abs_tol=1e-4) and math.isclose(h.logprob, logprob, abs_tol=1e-4)
    assert changed > 0  # the normalisation reorders the captions of some image: the test can tell it apart


def test_beam_scores_are_model_log_probabilities_and_length_limit_holds():
    m = tiny_model("show_tell", "bn_rhn", vocab=12)
    f = feats("show_tell", 5)
    for i, hyps in enumerate(beam_search(m, f, beam_size=4, max_len=4, topk=4)):
        assert len(hyps) == 4
        for h in hyps:
            assert len(h.tokens) <= 4 and all(t >= 4 for t in h.tokens)  # no <pad>/<start>/<end>/<unk> inside
            assert math.isclose(h.logprob, rescore(m, f[i], h.tokens), abs_tol=1e-4)


def test_unk_only_when_allowed():
    m = copy.deepcopy(tiny_model())
    with torch.no_grad():
        m.out.bias[3] = 50.0  # <unk> dominates
    f = feats("show_tell", 3)
    assert all(3 not in h.tokens for h in greedy(m, f, max_len=5))
    assert all(3 in h.tokens for h in greedy(m, f, max_len=5, allow_unk=True))


def test_batch_composition_does_not_change_captions():
    """Eval-mode batch norm uses population statistics: a caption does not depend on its batch mates."""
    m = tiny_model("show_tell", "bn_rhn")
    f = feats("show_tell", 8)
    together = [h[0].tokens for h in beam_search(m, f, beam_size=3, max_len=6)]
    alone = [beam_search(m, f[i : i + 1], beam_size=3, max_len=6)[0][0].tokens for i in range(8)]
    assert together == alone


def test_sampling_is_reproducible_and_temperature_works():
    m = tiny_model()
    f = feats("show_tell", 20)
    a = sample(m, f, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = sample(m, f, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert [h.tokens for h in a] == [h.tokens for h in b]
    cold = sample(m, f, temperature=1e-4, generator=torch.Generator().manual_seed(1))
    assert [h.tokens for h in cold] == [h.tokens for h in greedy(m, f)]
    hot = sample(m, f, temperature=5.0, generator=torch.Generator().manual_seed(1), max_len=8)
    assert [h.tokens for h in hot] != [h.tokens for h in greedy(m, f, max_len=8)]
    for h, i in zip(a, range(20)):
        assert math.isclose(h.logprob, rescore(m, f[i], h.tokens), abs_tol=1e-4)


def test_decoding_argument_errors():
    m = tiny_model()
    f = feats("show_tell", 2)
    with pytest.raises(ValueError, match="beam size"):
        beam_search(m, f, beam_size=0)
    with pytest.raises(ValueError, match="topk"):
        beam_search(m, f, beam_size=2, topk=3)
    with pytest.raises(ValueError, match="temperature"):
        sample(m, f, temperature=0)
    with pytest.raises(ValueError, match="unknown decoding method"):
        decode(m, f, method="nucleus")
