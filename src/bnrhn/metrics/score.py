"""``score()``: coco-caption's caption metrics in one call."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnrhn.metrics.bleu import bleu_from_stats, bleu_stats
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
    - ``timings``: seconds spent per stage (``tokenize``, ``ngrams``, ``bleu``, ...);
    - ``notes``: warnings about the input (candidates far longer than their references).
    """

    corpus: dict[str, float]
    per_image: dict[Hashable, dict[str, float]]
    unavailable: dict[str, str] = field(default_factory=dict)
    image_ids: list = field(default_factory=list)
    n_references: int = 0
    tokenizer: str = "ptb"
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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
            "notes": list(self.notes),
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
          meteor=None, progress: bool = False, on_note: Callable[[str], None] | None = None) -> Scores:
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
        progress: progress bars on stderr for METEOR and for n-gram metrics computed in several parts
            (very long candidates, see :data:`NGRAM_PART_WORDS`).
        on_note: called with each warning about the input as soon as it is known, before the slow work
            (default: ``warnings.warn``); the warnings are also in ``Scores.notes``.

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
    notes: list[str] = []

    long_note = long_candidates_note(ids, cands, refs)
    if long_note:
        notes.append(long_note)
        if on_note is None:
            warnings.warn(long_note, RuntimeWarning, stacklevel=2)
        else:
            on_note(long_note)

    if "bleu" in chosen or "cider" in chosen:
        stats, cider_img = _ngram_metrics(cands, flat_refs, ref_image, "bleu" in chosen, "cider" in chosen,
                                          timings, progress)
        if "bleu" in chosen:
            b_corpus, b_img = bleu_from_stats(*stats, n=4)
            for k in range(4):
                corpus[f"BLEU-{k + 1}"] = b_corpus[k]
                per[f"BLEU-{k + 1}"] = b_img[:, k]
        if "cider" in chosen:
            corpus["CIDEr"], per["CIDEr"] = float(np.mean(cider_img)), cider_img
    if "meteor" in chosen:
        t = time.perf_counter()
        from bnrhn.metrics.meteor import MeteorError, MeteorUnavailable, get_meteor

        try:
            scorer = meteor if meteor is not None else get_meteor()
            with _bar(progress, n, "METEOR", "img") as bar:
                m_corpus, m_img = scorer.score(cands, refs, progress=_count_to(bar) if bar else None)
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

    keys = [k for m in chosen for k in METRIC_KEYS[m] if k in corpus]
    corpus = {k: float(corpus[k]) for k in keys}
    columns = {k: [float(x) for x in per[k]] for k in keys}
    per_image = {image_id: {k: columns[k][j] for k in keys} for j, image_id in enumerate(ids)}
    return Scores(corpus=corpus, per_image=per_image, unavailable=unavailable, image_ids=ids,
                  n_references=len(flat_refs), tokenizer=tok_name, timings=timings, notes=notes)


# Candidate words per n-gram table. One table over 5,000 captions of 2,400 words made `bnrhn score` peak at
# 3.3 GB; in parts of this size it peaked at 0.52 GB (and ran faster), whatever the length of the captions.
# Ordinary result files (COCO's 5,000 test captions of ~10 words) are one part.
NGRAM_PART_WORDS = 1_000_000


def _ngram_parts(cands: list[str], part_words: int) -> list[tuple[int, int]]:
    """Consecutive image ranges [lo, hi) of at most ``part_words`` candidate words each (at least one image)."""
    parts, lo, words = [], 0, 0
    for k, c in enumerate(cands):
        w = c.count(" ") + 1
        if k > lo and words + w > part_words:
            parts.append((lo, k))
            lo, words = k, 0
        words += w
    parts.append((lo, len(cands)))
    return parts


def _ngram_metrics(cands, flat_refs, ref_image, want_bleu, want_cider, timings, progress,
                   part_words: int | None = None):
    """BLEU statistics and CIDEr-D per image, from n-gram tables over parts of the candidates.

    Each part's table holds that part's candidates, every reference, and an empty candidate for every other
    image: the references (so CIDEr's document frequencies, over all images' references) and every image's
    statistics are exactly those of one table over everything, while the memory is bounded by the part's
    size. Returns ``((correct, guess, cand_len, ref_len), cider_per_image)`` (None for a metric not wanted).
    """
    n = len(cands)
    parts = _ngram_parts(cands, part_words or NGRAM_PART_WORDS)
    stats = [np.zeros((n, 4), np.int64), np.zeros((n, 4), np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)]
    cider_img = np.zeros(n)
    for key, wanted in (("ngrams", True), ("bleu", want_bleu), ("cider", want_cider)):
        if wanted:
            timings.setdefault(key, 0.0)
    with _bar(progress if len(parts) > 1 else False, len(parts), "n-gram metrics", "part") as bar:
        for lo, hi in parts:
            t = time.perf_counter()
            sentences = cands if len(parts) == 1 else [""] * lo + cands[lo:hi] + [""] * (n - hi)
            table = build_ngram_table(sentences + flat_refs, n=4)
            timings["ngrams"] += time.perf_counter() - t
            if want_bleu:
                t = time.perf_counter()
                for whole, part in zip(stats, bleu_stats(table, n, ref_image, 4)):
                    whole[lo:hi] = part[lo:hi]
                timings["bleu"] += time.perf_counter() - t
            if want_cider:
                t = time.perf_counter()
                cider_img[lo:hi] = cider_d(table, n, ref_image)[1][lo:hi]
                timings["cider"] += time.perf_counter() - t
            del table
            if bar:
                bar.update(1)
    return (tuple(stats) if want_bleu else None), (cider_img if want_cider else None)


# A candidate this many times longer than the longest reference of its image (and over LONG_WORDS words) is
# reported: nothing a captioner should produce, usually a decoder that never emitted its end token.
LONG_FACTOR, LONG_WORDS = 4, 50


def long_candidates_note(ids: list, cands: list[str], refs: list[list[str]]) -> str | None:
    """A warning for candidates far longer than every reference of their image, or None."""
    cand_len = np.fromiter((c.count(" ") + 1 if c else 0 for c in cands), np.int64, len(cands))
    ref_max = np.fromiter((max(r.count(" ") + 1 if r else 0 for r in rs) for rs in refs), np.int64, len(refs))
    long = (cand_len > LONG_FACTOR * ref_max) & (cand_len > LONG_WORDS)
    if not long.any():
        return None
    worst = int(np.argmax(np.where(long, cand_len, -1)))
    return (f"{int(long.sum())} of {len(cands)} candidate captions are over {LONG_FACTOR}x as long as every "
            f"reference of their image (the longest: image {ids[worst]!r}, {cand_len[worst]} words, its "
            f"references at most {ref_max[worst]}); were they cut at the end-of-sentence token? They score "
            "near 0 and make METEOR slow")


def _count_to(bar):
    """A callback that sets ``bar`` to an absolute count (METEOR reports images done so far)."""
    def update(done: int) -> None:
        bar.n = done
        bar.refresh()
    return update


@contextlib.contextmanager
def _bar(progress: bool, total: int, desc: str, unit: str):
    """A tqdm bar on stderr when ``progress`` (None otherwise)."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr) as bar:
        yield bar
