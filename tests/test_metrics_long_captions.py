"""Very long candidate captions (a decoder that never ends its sentence): the n-gram metrics are computed in
parts with memory bounded by the part size and the same numbers as coco-caption, a warning names the
longest one before the slow work starts, and METEOR reports progress."""

from __future__ import annotations

import importlib
import json
import random
import tracemalloc

import numpy as np
import pytest

from bnrhn.cli import main
from bnrhn.metrics import score
from metrics_support import need_pycocoevalcap

score_mod = importlib.import_module("bnrhn.metrics.score")   # (bnrhn.metrics.score is also the function)
tokenizer_mod = importlib.import_module("bnrhn.metrics.tokenizer")

WORDS = "a dog cat man woman runs plays sits on in the grass snow street beach ball red blue".split()


def corpus(n_images: int, long_words: int, seed: int = 0):
    """Candidates of ``long_words`` words on every third image, ordinary ones elsewhere; five references."""
    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    cands = {i: sent(long_words if i % 3 == 0 else rng.randint(1, 12)) for i in range(n_images)}
    refs = {i: [sent(rng.randint(6, 12)) for _ in range(5)] for i in range(n_images)}
    return cands, refs


def test_parts_give_coco_captions_numbers(monkeypatch):
    """Scored in parts of 40 words (so nearly every part is one image), BLEU-1..4 and CIDEr-D equal
    pycocoevalcap's at corpus and image level."""
    need_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = corpus(60, 300)
    monkeypatch.setattr(score_mod, "NGRAM_PART_WORDS", 40)
    seen = []
    real = score_mod.build_ngram_table
    monkeypatch.setattr(score_mod, "build_ngram_table", lambda s, n: seen.append(1) or real(s, n))
    ours = score(cands, refs, metrics="bleu,cider", tokenizer=None, on_note=lambda note: None)
    assert len(seen) > 30  # it did run in parts
    gts, res = refs, {i: [c] for i, c in cands.items()}
    b, b_img = Bleu(4).compute_score(gts, res, verbose=0)
    c, c_img = Cider().compute_score(gts, res)
    for k in range(4):
        assert ours.corpus[f"BLEU-{k + 1}"] == pytest.approx(b[k], abs=1e-9)
        assert np.allclose([ours.per_image[i][f"BLEU-{k + 1}"] for i in cands], b_img[k], atol=1e-9)
    assert ours.corpus["CIDEr"] == pytest.approx(c, abs=1e-9)
    assert np.allclose([ours.per_image[i]["CIDEr"] for i in cands], c_img, atol=1e-9)


def test_memory_is_bounded_by_the_part_size(monkeypatch):
    """Peak traced memory of the n-gram metrics on 240 captions of 2,000 words: in parts of 20,000 words it is
    under a third of the one-table peak (NumPy's arrays are traced)."""
    cands, refs = corpus(240, 2000)
    peaks = {}
    for part in (10 ** 9, 20_000):
        monkeypatch.setattr(score_mod, "NGRAM_PART_WORDS", part)
        tracemalloc.start()
        result = score(cands, refs, metrics="bleu,cider", tokenizer=None, on_note=lambda note: None)
        peaks[part] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[part, "scores"] = result.corpus
    assert peaks[20_000] < peaks[10 ** 9] / 3, peaks
    assert peaks[20_000, "scores"] == pytest.approx(peaks[10 ** 9, "scores"], abs=1e-12)


def test_long_candidates_are_reported_before_the_work(monkeypatch):
    cands, refs = corpus(30, 200)
    order = []
    real = score_mod.build_ngram_table
    monkeypatch.setattr(score_mod, "build_ngram_table", lambda s, n: order.append("ngrams") or real(s, n))
    result = score(cands, refs, metrics="bleu", tokenizer=None, on_note=lambda note: order.append(note))
    assert order[0] == result.notes[0] and order[1] == "ngrams"
    assert result.notes[0].startswith("10 of 30 candidate captions are over 4x as long")
    assert "image 0, 200 words" in result.notes[0]
    ordinary, refs = corpus(30, 8)
    with pytest.warns(RuntimeWarning, match="candidate captions are over"):
        score(cands, refs, metrics="bleu", tokenizer=None)
    assert score(ordinary, refs, metrics="bleu", tokenizer=None).notes == []


def test_cli_warns_and_records_the_note(tmp_path, capsys):
    cands, refs = corpus(12, 300)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in cands.items()]))
    ann = tmp_path / "refs.json"
    ann.write_text(json.dumps({"images": [{"id": i} for i in refs], "annotations": [
        {"id": 10 * i + k, "image_id": i, "caption": r} for i, rs in refs.items() for k, r in enumerate(rs)]}))
    out = tmp_path / "scores.json"
    assert main(["score", str(res), "-r", str(ann), "-m", "bleu,cider", "--json", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "bnrhn score: warning: 4 of 12 candidate captions are over 4x as long" in err
    assert json.loads(out.read_text())["notes"][0].startswith("4 of 12")


def test_long_captions_are_not_kept_in_the_tokenizer_cache():
    tokenizer_mod._tokenize_cached.cache_clear()
    score({0: "a dog . " * 400, 1: "a dog runs ."}, {0: ["a dog"], 1: ["a dog runs"]}, metrics="bleu", on_note=lambda note: None)
    assert tokenizer_mod._tokenize_cached.cache_info().currsize == 3  # the short candidate and the references


def test_meteor_reports_progress(tmp_path, monkeypatch):
    from test_metrics_meteor import FAKE
    import stat
    import sys

    from bnrhn.metrics.meteor import Meteor

    java = tmp_path / "java"
    java.write_text(FAKE.format(python=sys.executable))
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "meteor-1.5.jar").write_bytes(b"")
    monkeypatch.setenv("FAKE_METEOR_STATE", str(tmp_path / "starts"))
    monkeypatch.setenv("FAKE_METEOR_MODE", "ok")
    m = Meteor(jar=str(tmp_path / "meteor-1.5.jar"), java=str(java), timeout=20)
    seen = []
    cands, refs = corpus(1000, 20)
    m.score(list(cands.values()), list(refs.values()), progress=seen.append)
    m.close()
    assert seen == sorted(seen) and seen[-1] == 1000 and 100 <= len(seen) <= 201
