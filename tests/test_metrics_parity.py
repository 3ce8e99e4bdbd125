"""Parity with coco-caption (``pycocoevalcap``) on real captions from Flickr8k and COCO val2017.

Candidate sets (see ``metrics_support.candidate_sets``): held-out human captions, shuffled captions,
truncated and word-dropped candidates, empty candidates, candidates with capitals and punctuation.
BLEU-n, ROUGE-L and CIDEr-D must agree to 1e-6 at corpus and image level, METEOR to 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnrhn.metrics import score, tokenize_captions
from metrics_support import candidate_sets, coco_val, flickr8k, need_java, need_pycocoevalcap, subset

pytestmark = pytest.mark.data

N_IMAGES = 300
TOL = 1e-6
METEOR_TOL = 1e-4

DATASETS = {
    "flickr8k": lambda: subset(flickr8k("test"), N_IMAGES),
    "coco": lambda: subset(coco_val(), N_IMAGES),
}


@pytest.fixture(scope="module", params=list(DATASETS))
def sets(request):
    return candidate_sets(DATASETS[request.param](), seed=list(DATASETS).index(request.param))


def coco_caption_scores(gts: dict, res: dict, meteor: bool = False) -> dict[str, tuple[float, np.ndarray]]:
    """pycocoevalcap's scorers on tokenized {id: [refs]} / {id: [candidate]}: key -> (corpus, per image)."""
    need_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = {}
    b, b_img = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        out[f"BLEU-{k + 1}"] = (b[k], np.asarray(b_img[k]))
    r, r_img = Rouge().compute_score(gts, res)
    out["ROUGE-L"] = (r, np.asarray(r_img))
    c, c_img = Cider().compute_score(gts, res)
    out["CIDEr"] = (c, np.asarray(c_img))
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        mc, m_img = m.compute_score(gts, res)
        out["METEOR"] = (mc, np.asarray(m_img))
        del m
    return out


def assert_same(ours, theirs: dict, ids: list, keys, tol: float, label: str) -> None:
    for key in keys:
        corpus, per_image = theirs[key]
        assert ours.corpus[key] == pytest.approx(corpus, abs=tol), f"{label}: corpus {key}"
        mine = np.array([ours.per_image[i][key] for i in ids])
        worst = np.max(np.abs(mine - per_image))
        assert worst <= tol, f"{label}: per-image {key} differs by {worst:g}"


SET_NAMES = ["held_out", "shuffled", "truncated", "word_dropped", "empty", "punct_caps"]


@pytest.mark.parametrize("name", SET_NAMES)
def test_scorers_match_on_the_same_tokens(sets, name):
    """BLEU, ROUGE-L, CIDEr-D on identical tokenized input (no Java needed)."""
    cands, refs = sets[name]
    ids = list(cands)
    flat = tokenize_captions([s for i in ids for s in refs[i]])
    tok_refs, pos = {}, 0
    for i in ids:
        tok_refs[i] = flat[pos: pos + len(refs[i])]
        pos += len(refs[i])
    tok_cands = dict(zip(ids, tokenize_captions([cands[i] for i in ids])))
    ours = score(tok_cands, tok_refs, metrics="bleu,rouge,cider", tokenizer=None)
    theirs = coco_caption_scores(tok_refs, {i: [tok_cands[i]] for i in ids})
    assert_same(ours, theirs, ids, ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"], TOL, name)


def _coco_tokenize(cands: dict, refs: dict):
    """coco-caption's own pipeline: its Java PTBTokenizer on the references, then on the candidates."""
    need_java()
    need_pycocoevalcap()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tk = PTBTokenizer()
    gts = tk.tokenize({i: [{"caption": c} for c in refs[i]] for i in cands})
    res = tk.tokenize({i: [{"caption": cands[i]}] for i in cands})
    return gts, res


@pytest.mark.parametrize("name", SET_NAMES)
def test_end_to_end_matches_coco_caption(sets, name):
    """Raw captions in, numbers out: our Python tokenizer + scorers vs coco-caption's Java tokenizer +
    scorers."""
    cands, refs = sets[name]
    ids = list(cands)
    gts, res = _coco_tokenize(cands, refs)
    theirs = coco_caption_scores(gts, res)
    ours = score(cands, refs, metrics="bleu,rouge,cider")
    assert_same(ours, theirs, ids, ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"], TOL, name)
    if name == "punct_caps":
        java = score(cands, refs, metrics="bleu,rouge,cider", tokenizer="ptb-java")
        assert java.corpus == ours.corpus


@pytest.mark.slow
def test_meteor_matches_coco_caption():
    """METEOR of every candidate set of both data sets at once (ids made unique per set), corpus and per
    image, from raw captions: coco-caption's tokenizer + Meteor wrapper vs ours. One JVM start each side
    (the JVM and its paraphrase table take most of this test's ~1 minute)."""
    need_java()
    cands, refs = {}, {}
    for ds, load in DATASETS.items():
        sets = candidate_sets(load(), seed=list(DATASETS).index(ds))
        for name in SET_NAMES:
            c, r = sets[name]
            for i in list(c)[:100]:
                cands[(ds, name, i)] = c[i]
                refs[(ds, name, i)] = r[i]
    ids = list(cands)
    gts, res = _coco_tokenize(cands, refs)
    need_pycocoevalcap()
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    corpus, per_image = m.compute_score(gts, res)
    del m
    ours = score(cands, refs, metrics="meteor")
    assert "METEOR" in ours.corpus, ours.unavailable
    assert ours.corpus["METEOR"] == pytest.approx(corpus, abs=METEOR_TOL)
    mine = np.array([ours.per_image[i]["METEOR"] for i in ids])
    assert np.max(np.abs(mine - np.asarray(per_image))) <= METEOR_TOL
