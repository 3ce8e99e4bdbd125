"""``score()``: coco-caption's caption metrics in one call."""

from __future__ import annotations

import time
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnrhn.metrics.bleu import bleu
from bnrhn.metrics.cider import cider_d
from bnrhn.metrics.ngrams import build_ngram_table
from bnrhn.metrics.rouge import rouge_l
from bnrhn.metrics.tokenizer import JavaPTBTokenizer, tokenize_captions

__all__ = ["score", "Scores", "METRICS", "METRIC_KEYS", "parse_metrics"]

# metric name -> the keys it produces, in table order
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE-L",),
    "cider": ("CIDEr",),
}
METRICS = tuple(METRIC_KEYS)
_ALIASES = {"bleu": "bleu", "meteor": "meteor", "rouge": "rouge", "rouge-l": "rouge", "rouge_l": "rouge",
            "rougel": "rouge", "cider": "cider", "cider-d": "cider", "cider_d": "cider", "ciderd": "cider"}

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def parse_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise a metric selection ("bleu,cider" or ["BLEU", "CIDEr-D"]) to names of :data:`METRICS`,
    in the canonical order. Raises ValueError for an unknown name."""
    if isinstance(metrics, str):
        metrics = [m for m in metrics.replace(" ", ",").split(",") if m]
    chosen = set()
    for m in metrics:
        key = _ALIASES.get(str(m).strip().lower())
        if key is None:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
        chosen.add(key)
    if not chosen:
        raise ValueError(f"no metric selected; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in chosen)


@dataclass
class Scores(Mapping):
    """Result of :func:`score`.

    Behaves as a read-only mapping of the corpus scores (``scores["CIDEr"]``). Attributes:

    - ``corpus``: metric key -> corpus score (keys ``BLEU-1`` .. ``BLEU-4``, ``METEOR``, ``ROUGE-L``,
      ``CIDEr``, for the metrics computed);
    - ``per_image``: image id -> {metric key -> score of that image};
    - ``unavailable``: metric key -> why it was not computed (METEOR without Java, for example);
    - ``image_ids``: the scored images, in order; ``n_references``: references used;
    - ``timings``: seconds spent per stage (``tokenize``, ``ngrams``, ``bleu``, ...).
    """

    corpus: dict[str, float]
    per_image: dict[Hashable, dict[str, float]]
    unavailable: dict[str, str] = field(default_factory=dict)
    image_ids: list = field(default_factory=list)
    n_references: int = 0
    tokenizer: str = "ptb"
    timings: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.corpus[key]

    def __iter__(self):
        return iter(self.corpus)

    def __len__(self) -> int:
        return len(self.corpus)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: corpus scores, per-image scores (a list, in image order)..."""
        return {
            "corpus": dict(self.corpus),
            "per_image": [{"image_id": i, **self.per_image[i]} for i in self.image_ids],
            "unavailable": dict(self.unavailable),
            "n_images": len(self.image_ids),
            "n_references": self.n_references,
            "tokenizer": self.tokenizer,
        }

    def table(self, digits: int = 4) -> str:
        """The corpus scores as a two-column text table."""
        rows = [(k, f"{v:.{digits}f}") for k, v in self.corpus.items()]
        rows += [(k, "n/a") for k in self.unavailable]
        width = max([len("metric")] + [len(k) for k, _ in rows])
        lines = [f"{'metric':<{width}}  score", f"{'-' * width}  {'-' * max(5, digits + 2)}"]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines)


def _check_inputs(candidates: Mapping, references: Mapping) -> tuple[list, list[str], list[list[str]]]:
    if not isinstance(candidates, Mapping):
        raise ValueError(f"candidates must be a mapping image_id -> caption, got {type(candidates).__name__}")
    if not isinstance(references, Mapping):
        raise ValueError(f"references must be a mapping image_id -> list of captions, "
                         f"got {type(references).__name__}")
    if not candidates:
        raise ValueError("no candidate captions to score")
    ids, cands, refs = [], [], []
    missing = []
    for image_id, cand in candidates.items():
        if isinstance(cand, (list, tuple)) and len(cand) == 1:  # pycocoevalcap's {id: [caption]}
            cand = cand[0]
        if not isinstance(cand, str):
            raise ValueError(f"the candidate caption of image {image_id!r} is not a string: {cand!r}")
        if image_id not in references:
            missing.append(image_id)
            continue
        r = references[image_id]
        if isinstance(r, str) or not isinstance(r, Sequence):
            raise ValueError(f"the references of image {image_id!r} must be a list of strings, got {r!r}")
        if len(r) == 0:
            raise ValueError(f"image {image_id!r} has an empty list of references")
        if not all(isinstance(s, str) for s in r):
            k, s = next((k, s) for k, s in enumerate(r) if not isinstance(s, str))
            raise ValueError(f"reference #{k} of image {image_id!r} is not a string: {s!r}")
        ids.append(image_id)
        cands.append(cand)
        refs.append(list(r))
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"no references for image id {shown} ({len(missing)} of {len(candidates)} candidates)")
    return ids, cands, refs


def score(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
          metrics: str | Iterable[str] = METRICS, *, tokenizer: str | None = "ptb",
          meteor=None) -> Scores:
    """coco-caption's BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of candidate captions.

    Args:
        candidates: image id -> candidate caption (one per image; ``[caption]`` is accepted too).
        references: image id -> reference captions (at least one). References of images that have no
            candidate are ignored: the scores are over the candidates' images, as coco-caption scores a
            results file (this matters for CIDEr, whose document frequencies come from the evaluated
            images' references).
        metrics: any of ``"bleu"``, ``"meteor"``, ``"rouge"`` (ROUGE-L), ``"cider"`` (CIDEr-D), as a
            list or a comma-separated string. BLEU, ROUGE-L and CIDEr-D are computed in-process
            (NumPy); METEOR runs the reference METEOR 1.5 jar in a persistent JVM (Java needed).
        tokenizer: ``"ptb"`` (default: coco-caption's PTB tokenisation and punctuation removal, in
            Python), ``"ptb-java"`` (the same with the reference Java tokenizer), or ``None`` / ``"none"``
            for captions that are tokenized already (space-separated tokens, used as they are).
        meteor: a :class:`bnrhn.metrics.meteor.Meteor` to use instead of the shared one.

    Returns:
        :class:`Scores`: ``corpus`` scores keyed ``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``,
        ``CIDEr`` (those requested), ``per_image`` scores, and ``unavailable`` for metrics that could not
        be computed. When Java or the METEOR jar is missing, or the JVM fails twice, a warning says so
        (once per reason) and the other metrics are still returned.

    Corpus conventions (those of coco-caption): BLEU-n is corpus-level (clipped n-gram counts and
    lengths summed over images; brevity penalty against the closest reference length) while its
    per-image scores are sentence-level BLEU; METEOR's corpus score is computed by the jar from the
    summed statistics; ROUGE-L and CIDEr's corpus scores are the means of the per-image scores.

    Raises:
        ValueError: a candidate without references (the message names the image id), a caption that is
            not a string, an empty reference list, an unknown metric or tokenizer.
    """
    chosen = parse_metrics(metrics)
    ids, cands, refs = _check_inputs(candidates, references)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    tok_name = "none" if tokenizer is None else str(tokenizer).lower()
    flat_refs = [s for r in refs for s in r]
    if tok_name == "ptb":
        flat_refs = tokenize_captions(flat_refs)
        cands = tokenize_captions(cands)
    elif tok_name == "ptb-java":
        jt = JavaPTBTokenizer()
        flat_refs = jt.tokenize(flat_refs)
        cands = jt.tokenize(cands)
    elif tok_name != "none":
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose 'ptb', 'ptb-java' or None")
    counts = [len(r) for r in refs]
    starts = np.concatenate(([0], np.cumsum(counts)))
    refs = [flat_refs[starts[k]:starts[k + 1]] for k in range(len(ids))]
    timings["tokenize"] = time.perf_counter() - t0

    n = len(ids)
    ref_image = np.repeat(np.arange(n, dtype=np.int64), counts)
    corpus: dict[str, float] = {}
    per: dict[str, np.ndarray | list[float]] = {}
    unavailable: dict[str, str] = {}

    if "bleu" in chosen or "cider" in chosen:
        t = time.perf_counter()
        table = build_ngram_table(cands + flat_refs, n=4)
        timings["ngrams"] = time.perf_counter() - t
    if "bleu" in chosen:
        t = time.perf_counter()
        b_corpus, b_img = bleu(table, n, ref_image, 4)
        for k in range(4):
            corpus[f"BLEU-{k + 1}"] = b_corpus[k]
            per[f"BLEU-{k + 1}"] = b_img[:, k]
        timings["bleu"] = time.perf_counter() - t
    if "meteor" in chosen:
        t = time.perf_counter()
        from bnrhn.metrics.meteor import MeteorError, MeteorUnavailable, get_meteor

        try:
            scorer = meteor if meteor is not None else get_meteor()
            m_corpus, m_img = scorer.score(cands, refs)
            corpus["METEOR"] = m_corpus
            per["METEOR"] = m_img
        except MeteorUnavailable as exc:
            unavailable["METEOR"] = str(exc)
            _warn_once(f"METEOR not computed: {exc}. The other metrics are unaffected.")
        except MeteorError as exc:
            unavailable["METEOR"] = str(exc)
            _warn_once(f"METEOR failed: {exc}. The other metrics are unaffected.")
        timings["meteor"] = time.perf_counter() - t
    if "rouge" in chosen:
        t = time.perf_counter()
        corpus["ROUGE-L"], per["ROUGE-L"] = rouge_l(cands, refs)
        timings["rouge"] = time.perf_counter() - t
    if "cider" in chosen:
        t = time.perf_counter()
        corpus["CIDEr"], per["CIDEr"] = cider_d(table, n, ref_image)
        timings["cider"] = time.perf_counter() - t

    keys = [k for m in chosen for k in METRIC_KEYS[m] if k in corpus]
    corpus = {k: float(corpus[k]) for k in keys}
    columns = {k: [float(x) for x in per[k]] for k in keys}
    per_image = {image_id: {k: columns[k][j] for k in keys} for j, image_id in enumerate(ids)}
    return Scores(corpus=corpus, per_image=per_image, unavailable=unavailable, image_ids=ids,
                  n_references=len(flat_refs), tokenizer=tok_name, timings=timings)
