"""Properties of the metrics (hypothesis): perfect candidates, invariance to the order of images and
references, and agreement of the fast kernels with their textbook definitions."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnrhn.metrics import score
from bnrhn.metrics.rouge import lcs_length

WORDS = ["a", "dog", "man", "on", "the", "grass", "red", "ball", "with", "two", "is", "running", "in",
         "water", "of", "caf\u00e9", "\u65e5\u672c"]
sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join)
refs_strategy = st.lists(sentence, min_size=1, max_size=5)
corpus = st.dictionaries(st.integers(0, 10_000), st.tuples(sentence, refs_strategy), min_size=1, max_size=12)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IN_PROCESS = "bleu,rouge,cider"


@FAST
@given(st.lists(st.tuples(sentence, st.integers(1, 5)), min_size=1, max_size=10))
def test_candidate_identical_to_all_references(items):
    cands = {k: s for k, (s, _) in enumerate(items)}
    refs = {k: [s] * n for k, (s, n) in enumerate(items)}
    result = score(cands, refs, metrics=IN_PROCESS, tokenizer=None)
    assert result["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)
    lengths = [len(s.split()) for s, _ in items]
    for n in range(1, 5):
        # BLEU-n is 1 when every candidate has n words or more (coco-caption's smoothing makes an order with
        # no n-gram at all count as precision 1e-6, so shorter candidates score below 1 on BLEU-n)
        if min(lengths) >= n:
            assert result[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
        for k, length in enumerate(lengths):
            if length >= n:
                assert result.per_image[k][f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
            assert result.per_image[k]["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)


@FAST
@given(st.lists(st.sampled_from(["A", "dog", "runs", "on", "the", "grass", "Caf\u00e9", "man's"]), min_size=4,
                max_size=12))
def test_identical_raw_caption_with_tokenizer(words):
    text = " ".join(words) + "."
    result = score({"x": text}, {"x": [text, text.upper()]}, metrics=IN_PROCESS)
    assert result["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert result["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)


@FAST
@given(corpus, st.randoms(use_true_random=False))
def test_invariant_to_order_of_images_and_references(data, rnd):
    cands = {k: c for k, (c, _) in data.items()}
    refs = {k: list(r) for k, (_, r) in data.items()}
    base = score(cands, refs, metrics=IN_PROCESS, tokenizer=None)
    keys = list(cands)
    rnd.shuffle(keys)
    shuffled_refs = {}
    for k in keys:
        r = list(refs[k])
        rnd.shuffle(r)
        shuffled_refs[k] = r
    other = score({k: cands[k] for k in keys}, shuffled_refs, metrics=IN_PROCESS, tokenizer=None)
    for key, value in base.corpus.items():
        assert other[key] == pytest.approx(value, rel=1e-12, abs=1e-12)
    for k in keys:
        for key, value in base.per_image[k].items():
            assert other.per_image[k][key] == pytest.approx(value, rel=1e-12, abs=1e-12)


def _lcs_dp(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            dp[i][j] = dp[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(dp[i - 1][j], dp[i][j - 1])
    return dp[-1][-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcde"), max_size=70), st.lists(st.sampled_from("abcde"), max_size=70))
def test_bit_parallel_lcs_equals_dynamic_programming(a, b):
    assert lcs_length(a, b) == _lcs_dp(a, b)


@FAST
@given(corpus)
def test_scores_are_bounded(data):
    cands = {k: c for k, (c, _) in data.items()}
    refs = {k: list(r) for k, (_, r) in data.items()}
    result = score(cands, refs, metrics=IN_PROCESS, tokenizer=None)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert 0.0 <= result[key] <= 1.0 + 1e-12
    # CIDEr-D is 10 x a mean of clipped cosines times a penalty <= 1
    assert 0.0 <= result["CIDEr"] <= 10.0 + 1e-9
    assert np.isfinite(list(result.corpus.values())).all()


def test_order_invariance_on_real_sized_random_corpus():
    rng = random.Random(7)
    cands = {i: " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) for i in range(400)}
    refs = {i: [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
            for i in range(400)}
    a = score(cands, refs, metrics=IN_PROCESS, tokenizer=None)
    keys = list(reversed(cands))
    b = score({k: cands[k] for k in keys}, {k: refs[k][::-1] for k in keys}, metrics=IN_PROCESS, tokenizer=None)
    for key in a.corpus:
        assert b[key] == pytest.approx(a[key], rel=1e-12)
