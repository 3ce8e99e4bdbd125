"""Decoding options (issue 14): trigram blocking, no bad endings, GNMT length penalty.

Each option is checked against an independent reference: an exhaustive search over every caption of a tiny
vocabulary (scored by teacher forcing, the captions that break the constraint filtered out, the rest ranked
under the penalty), which a beam as wide as the search space must reproduce; the batched beam search must
equal the plain per-image reference search (:func:`bnrhn.decoding.beam_search_one`) with each option; and
property tests (hypothesis) check that no caption of any search repeats a trigram or ends in a bad word.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnrhn.decoding import (BAD_ENDINGS, bad_ending_ids, beam_search, beam_search_one, decode, greedy, length_penalty,
                            sample)
from test_beam import every_caption, feats, sequence_logprob, tiny_model

WORDS = range(4, 8)  # the tiny models' four words
BAD = [5, 7]  # two of them act as function words in these tests


def repeats_a_trigram(words) -> bool:
    tri = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(tri)) < len(tri)


def ends_badly(words, bad=BAD) -> bool:
    return bool(words) and words[-1] in bad


@functools.lru_cache(maxsize=None)
def repetitive_model(model="show_tell", cell="lstm"):
    """A tiny captioner that reads its state less (output weights halved) and is pushed towards word 4 and
    away from ``<end>``: some of its best captions repeat a trigram ("5 6 7 4 4 ... 4"), so that trigram
    blocking changes them."""
    m = copy.deepcopy(tiny_model(model, cell))
    with torch.no_grad():
        m.out.weight *= 0.5
        m.out.bias[4] += 2.0
        m.out.bias[2] -= 1.0
    return m.eval()


@functools.lru_cache(maxsize=None)
def exhaustive(model, cell, repetitive: bool, max_words: int, n_images: int):
    """Per image: every caption of at most ``max_words`` of the four words, with its log-probability."""
    m = repetitive_model(model, cell) if repetitive else tiny_model(model, cell)
    f = feats(model, n_images)
    cands, seqs, lengths = every_caption(words=WORDS, max_words=max_words)
    out = []
    for i in range(n_images):
        lp = sequence_logprob(m, f[i].expand(len(cands), *f[i].shape), seqs, lengths).tolist()
        out.append(list(zip(lp, cands)))
    return m, f, out


def best_by_hand(scored, keep, alpha=0.0, form="power", k=5):
    """The ``k`` best (score, logprob, words) of the captions ``keep`` accepts, ranked by log p / lp(|Y|)."""
    def lp(n_tokens):
        if form == "gnmt":
            return ((5 + n_tokens) / 6) ** alpha
        return n_tokens ** alpha

    rows = [(s / lp(len(c) + 1), s, c) for s, c in scored if keep(c)]
    return sorted(rows, key=lambda r: -r[0])[:k]


OPTIONS = {  # name: (decoding keywords, the captions they allow)
    "trigrams": (dict(block_trigrams=True), lambda c: not repeats_a_trigram(c)),
    "bad_endings": (dict(bad_ending_ids=BAD), lambda c: not ends_badly(c)),
    "both": (dict(block_trigrams=True, bad_ending_ids=BAD), lambda c: not repeats_a_trigram(c) and not ends_badly(c)),
}


# the Show-Attend-Tell and batch-norm cases train their own tiny model first (about 10-20 s each): CI runs them
# in the slow set (make test-slow); the LSTM/GRU cases cover every option in the default run
SLOW = pytest.mark.slow


@pytest.mark.parametrize("model,cell", [("show_tell", "lstm"), ("show_tell", "gru"),
                                        pytest.param("show_attend_tell", "lstm", marks=SLOW)])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_wide_beam_with_constraints_is_the_exhaustive_optimum(model, cell, option):
    """All 1,365 captions of at most 5 of the 4 words; a beam of 1,300 holds every prefix (at most 4⁴ = 256
    alive, 1,280 extensions at a step), so the search is exhaustive over the captions the option allows
    and returns their 10 best in order."""
    kwargs, keep = OPTIONS[option]
    m, f, per_image = exhaustive(model, cell, True, 5, 4)
    changed = 0
    for i, scored in enumerate(per_image):
        want = best_by_hand(scored, keep, k=10)
        unconstrained = best_by_hand(scored, lambda c: True, k=10)
        changed += [c for _, _, c in want] != [c for _, _, c in unconstrained]
        got = beam_search(m, f[i : i + 1], beam_size=1300, max_len=5, topk=10, **kwargs)[0]
        assert [h.tokens for h in got] == [c for _, _, c in want], i
        for h, (score, logprob, _) in zip(got, want):
            assert math.isclose(h.score, score, abs_tol=1e-4) and math.isclose(h.logprob, logprob, abs_tol=1e-4)
    if model == "show_tell" or option != "trigrams":  # (the attention model's 10 best repeat no trigram)
        assert changed > 0  # the constraint removes some image's best captions: the test can tell it apart


@pytest.mark.parametrize("form,alpha", [("gnmt", 0.7), ("gnmt", 3.0), ("power", 1.0)])
def test_wide_beam_with_length_penalty_is_the_exhaustive_optimum(form, alpha):
    m, f, per_image = exhaustive("show_tell", "lstm", False, 4, 6)
    changed = 0
    for i, scored in enumerate(per_image):
        want = best_by_hand(scored, lambda c: True, alpha, form)
        changed += [c for _, _, c in want] != [c for _, _, c in best_by_hand(scored, lambda c: True)]
        got = beam_search(m, f[i : i + 1], beam_size=400, max_len=4, topk=5, length_norm=alpha,
                          length_penalty=form)[0]
        assert [h.tokens for h in got] == [c for _, _, c in want], i
        assert all(math.isclose(h.score, s, abs_tol=1e-4) for h, (s, _, _) in zip(got, want))
    assert changed > 0


def test_wide_beam_with_every_option_at_once():
    kwargs, keep = OPTIONS["both"]
    m, f, per_image = exhaustive("show_tell", "lstm", True, 5, 4)
    for i, scored in enumerate(per_image):
        want = best_by_hand(scored, keep, 0.8, "gnmt")
        got = beam_search(m, f[i : i + 1], beam_size=1300, max_len=5, topk=5, length_norm=0.8,
                          length_penalty="gnmt", **kwargs)[0]
        assert [h.tokens for h in got] == [c for _, _, c in want], i


@pytest.mark.parametrize("model,cell,repetitive", [("show_tell", "lstm", True),
                                                   pytest.param("show_tell", "bn_rhn", False, marks=SLOW),
                                                   pytest.param("show_attend_tell", "gru", False, marks=SLOW)])
@pytest.mark.parametrize("kwargs", [dict(block_trigrams=True), dict(bad_ending_ids=BAD),
                                    dict(length_norm=0.9, length_penalty="gnmt"),
                                    dict(block_trigrams=True, bad_ending_ids=BAD, length_norm=0.6,
                                         length_penalty="gnmt")], ids=["trigrams", "bad", "gnmt", "all"])
def test_batched_beam_equals_per_image_reference_with_each_option(model, cell, repetitive, kwargs):
    m = repetitive_model(model, cell) if repetitive else tiny_model(model, cell)
    f = feats(model, 8)
    batched = beam_search(m, f, beam_size=3, max_len=8, topk=3, **kwargs)
    for i in range(len(f)):
        ref = beam_search_one(m, f[i], beam_size=3, max_len=8, topk=3, **kwargs)
        assert [h.tokens for h in batched[i]] == [h.tokens for h in ref], i
        assert all(math.isclose(a.score, b.score, abs_tol=1e-4) for a, b in zip(batched[i], ref))


def test_greedy_with_constraints_equals_beam_one():
    """Beam 1 keeps the one best allowed extension per step: greedy decoding with the same masks."""
    for m in (repetitive_model(), tiny_model("show_tell", "bn_rhn")):
        f = feats("show_tell", 10)
        for kwargs in OPTIONS["both"][0], OPTIONS["trigrams"][0], OPTIONS["bad_endings"][0]:
            g = greedy(m, f, max_len=9, **kwargs)
            b = beam_search(m, f, beam_size=1, max_len=9, **kwargs)
            assert [h.tokens for h in g] == [h[0].tokens for h in b]
            assert all(math.isclose(x.logprob, y[0].logprob, abs_tol=1e-4) for x, y in zip(g, b))


def test_the_options_change_the_repetitive_models_captions():
    m = copy.deepcopy(repetitive_model())
    with torch.no_grad():
        m.out.bias[2] -= 3.0  # long captions: "4 4 4 4 4 4 7 4 4"
    f = feats("show_tell", 10)
    plain = [h.tokens for h in greedy(m, f, max_len=9)]
    assert sum(map(repeats_a_trigram, plain)) >= 5 and sum(map(ends_badly, plain)) >= 2
    for method in ("greedy", "beam"):
        blocked = [h[0].tokens for h in decode(m, f, method, max_len=9, block_trigrams=True, bad_ending_ids=BAD)]
        assert not any(repeats_a_trigram(c) or ends_badly(c) for c in blocked)
        assert all(len(c) == 9 for c in blocked)  # still no <end> worth taking: other words, not shorter captions


# -- properties ------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boost=st.floats(0.0, 4.0), seed=st.integers(0, 10_000), beam=st.integers(1, 4), max_len=st.integers(3, 10),
       method=st.sampled_from(["beam", "greedy", "sample"]), bad=st.lists(st.integers(4, 7), max_size=2))
def test_no_caption_repeats_a_trigram_or_ends_badly(boost, seed, beam, max_len, method, bad):
    m = copy.deepcopy(tiny_model())
    with torch.no_grad():
        m.out.bias[4 + seed % 4] += boost  # one word favoured: repeats become likely
        m.out.bias[2] -= boost / 2
    f = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
    hyps = decode(m, f, method, beam_size=beam, max_len=max_len, topk=beam if method != "greedy" else 1,
                  generator=torch.Generator().manual_seed(seed), block_trigrams=True, bad_ending_ids=bad)
    for per_image in hyps:
        assert per_image
        for h in per_image:
            assert len(h.tokens) <= max_len and all(t in WORDS for t in h.tokens)
            assert not repeats_a_trigram(h.tokens), h.tokens
            assert not ends_badly(h.tokens, bad), h.tokens
            assert math.isfinite(h.logprob)


@settings(max_examples=25, deadline=None)
@given(words=st.lists(st.integers(4, 6), min_size=0, max_size=9))
def test_trigram_mask_bans_exactly_the_words_completing_a_seen_trigram(words):
    """The vectorised mask, row by row, against the definition."""
    from bnrhn.decoding.constraints import block_repeated_trigrams_

    logp = torch.zeros(2, 8)
    seq = torch.tensor([words, words[::-1]], dtype=torch.long).view(2, len(words))
    block_repeated_trigrams_(logp, seq)
    for row, ws in zip(logp, (words, words[::-1])):
        seen = {tuple(ws[i : i + 3]) for i in range(len(ws) - 2)}
        for w in range(8):
            assert bool(torch.isneginf(row[w])) == (len(ws) >= 2 and (ws[-2], ws[-1], w) in seen)
            assert bool(row[w] == 0) == (not torch.isneginf(row[w]))  # nothing else changes


# -- the length penalty by hand, the word list -----------------------------------------------------------
def test_gnmt_length_penalty_by_hand():
    # Wu et al. 2016, eq. 14: lp(Y) = (5 + |Y|)^α / (5 + 1)^α; |Y| = 3 words + <end> = 4, α = 0.6
    assert math.isclose(length_penalty(4, 0.6, "gnmt"), 1.5 ** 0.6, rel_tol=1e-12)
    assert math.isclose(length_penalty(4, 0.6, "gnmt"), 1.2754245006, rel_tol=1e-9)
    assert length_penalty(1, 1.0, "gnmt") == 1.0  # a caption of just <end> is not penalised
    assert length_penalty(4, 0.6, "power") == 4 ** 0.6 and length_penalty(4, 0.0, "gnmt") == 1.0
    m = tiny_model()
    f = feats("show_tell", 4)
    for hyps in beam_search(m, f, beam_size=3, max_len=6, topk=3, length_norm=0.6, length_penalty="gnmt"):
        for h in hyps:
            assert math.isclose(h.score, h.logprob / ((5 + len(h.tokens) + 1) / 6) ** 0.6, rel_tol=1e-6)


def test_defaults_are_off_and_unchanged():
    m = tiny_model("show_tell", "bn_rhn")
    f = feats("show_tell", 6)
    plain = beam_search(m, f, beam_size=3, max_len=7, topk=3, length_norm=0.7)
    same = beam_search(m, f, beam_size=3, max_len=7, topk=3, length_norm=0.7, length_penalty="power",
                       block_trigrams=False, bad_ending_ids=None)
    assert [[(h.tokens, h.score) for h in x] for x in plain] == [[(h.tokens, h.score) for h in x] for x in same]
    assert [h.tokens for h in greedy(m, f)] == [h.tokens for h in greedy(m, f, bad_ending_ids=[])]


def test_bad_ending_words_map_through_the_vocabulary():
    index = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4, "a": 5, "the": 6, "runs": 7, "with": 8}
    assert bad_ending_ids(index) == [5, 6, 8]  # words the vocabulary lacks ("an", "of", ...) are ignored
    assert bad_ending_ids(index, ["dog", "cat"]) == [4]
    assert {"a", "an", "the", "with", "of", "on", "in", "and", "to"} <= set(BAD_ENDINGS)


def test_option_errors():
    m = tiny_model()
    f = feats("show_tell", 2)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(m, f, length_penalty="wu")
    with pytest.raises(ValueError, match="length_norm"):
        decode(m, f, length_norm=-1.0)
    with pytest.raises(ValueError, match="bad-ending ids"):
        greedy(m, f, bad_ending_ids=[99])
    assert sample(m, f, bad_ending_ids=BAD, block_trigrams=True, generator=torch.Generator().manual_seed(0))


# -- threading: config, command line, API ----------------------------------------------------------------
def test_config_fields_default_off_and_old_configs_load():
    from bnrhn.captioning import CaptionConfig

    cfg = CaptionConfig()
    assert (cfg.length_norm, cfg.length_penalty, cfg.block_trigrams, cfg.remove_bad_endings) == (0.0, "power", False,
                                                                                                  False)
    old = cfg.to_dict()
    for name in ("length_penalty", "block_trigrams", "remove_bad_endings"):
        del old[name]  # a config.json written before these options
    assert CaptionConfig.from_dict(old) == cfg
    new = CaptionConfig(length_norm=0.7, length_penalty="gnmt", block_trigrams=True, remove_bad_endings=True)
    assert CaptionConfig.from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="length_penalty"):
        CaptionConfig(length_penalty="wu")
    with pytest.raises(ValueError, match="length_norm"):
        CaptionConfig(length_norm=-0.5)
    with pytest.raises(ValueError, match="block_trigrams"):
        CaptionConfig(block_trigrams="yes")


def test_command_line_flags_reach_the_config_and_the_api(monkeypatch):
    from bnrhn import cli
    from bnrhn.commands._caption_args import config_from_args

    parser = cli.build_parser()
    args = parser.parse_args(["train", "--length-norm", "0.6", "--length-penalty", "gnmt", "--block-trigrams",
                              "--remove-bad-endings"])
    cfg = config_from_args(args)
    assert (cfg.length_norm, cfg.length_penalty, cfg.block_trigrams, cfg.remove_bad_endings) == (0.6, "gnmt", True,
                                                                                                  True)
    assert not config_from_args(parser.parse_args(["train"])).block_trigrams  # left out: off

    seen = {}
    monkeypatch.setattr("bnrhn.captioning.evaluate", lambda *a, **k: seen.setdefault("evaluate", k) and ([], {}))
    monkeypatch.setattr("bnrhn.captioning.caption_images", lambda *a, **k: seen.setdefault("caption", k) and [])
    args = parser.parse_args(["evaluate", "ckpt.pt", "--no-block-trigrams", "--remove-bad-endings"])
    args.func(args)
    assert (seen["evaluate"]["block_trigrams"], seen["evaluate"]["remove_bad_endings"],
            seen["evaluate"]["length_penalty"]) == (False, True, None)  # None: the checkpoint's
    args = parser.parse_args(["caption", "ckpt.pt", "x.jpg", "--length-penalty", "gnmt", "--block-trigrams"])
    args.func(args)
    assert (seen["caption"]["block_trigrams"], seen["caption"]["remove_bad_endings"],
            seen["caption"]["length_penalty"]) == (True, None, "gnmt")


def test_the_api_maps_bad_endings_through_the_vocabulary_and_defaults_to_the_checkpoints_options():
    """caption_tensors (behind ``bnrhn caption`` and ``bnrhn serve``) with a model whose words 5 and 7 are "the"
    and "with": the checkpoint's options apply unless overridden, and the bad endings are those words."""
    from pathlib import Path

    from bnrhn.captioning import CaptionConfig
    from bnrhn.captioning.api import LoadedCaptioner, caption_tensors
    from bnrhn.data.vocab import Vocabulary

    m = copy.deepcopy(repetitive_model())
    with torch.no_grad():
        m.out.bias[2] -= 3.0
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "dog", "the", "runs", "with"])
    f = feats("show_tell", 10)

    class Encoder:  # the features are the "images"
        def encode(self, images):
            return images, None

    def captions(config, **options):
        loaded = LoadedCaptioner(m, vocab, config, {}, Path("ckpt.pt"))
        return [c[0][0] for c in caption_tensors(loaded, Encoder(), f, "greedy", 1, 1, 9, **options)]

    def check(caps, trigrams: bool, endings: bool):
        words = [c.split() for c in caps]
        assert any(repeats_a_trigram(w) for w in words) != trigrams
        assert any(w[-1] in ("the", "with") for w in words if w) != endings

    check(captions(CaptionConfig()), False, False)
    on = CaptionConfig(block_trigrams=True, remove_bad_endings=True)
    check(captions(on), True, True)
    check(captions(on, block_trigrams=False), False, True)
    check(captions(CaptionConfig(), remove_bad_endings=True), False, True)


@pytest.mark.slow  # trains its own tiny model (about 9 s); CI runs it
def test_when_the_constraints_leave_no_word():
    """One word, which is a bad ending: after "w w w" trigram blocking bans w and the bad ending bans <end>.
    Greedy decoding then ends the caption after all (documented); beam search drops the stuck hypotheses and
    returns the captions that finished (here only the empty one), as the reference search does."""
    m = copy.deepcopy(tiny_model(vocab=5))
    with torch.no_grad():
        m.out.bias[4] += 5.0
        m.out.bias[2] -= 3.0
    f = feats("show_tell", 3)
    opts = dict(block_trigrams=True, bad_ending_ids=[4])
    assert all(h.tokens == [4, 4, 4] and math.isfinite(h.logprob) for h in greedy(m, f, max_len=8, **opts))
    batched = beam_search(m, f, beam_size=2, max_len=8, topk=2, **opts)
    assert [[h.tokens for h in hs] for hs in batched] == [[[]]] * 3
    for i in range(3):
        assert [h.tokens for h in beam_search_one(m, f[i], beam_size=2, max_len=8, topk=2, **opts)] == [[]]
