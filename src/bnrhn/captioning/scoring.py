"""Caption metrics for validation and evaluation, through the metrics package's ``score``.

``score_captions(candidates, references, metrics)`` returns ``{metric: corpus value}`` with the
coco-caption names (``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr``). It calls
:func:`bnrhn.metrics.score` (coco-caption's PTB tokenisation and metrics, CIDEr = CIDEr-D), asking only
for the metric families needed (validation computes BLEU and CIDEr-D in-process, no JVM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ALL_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
VALIDATION_METRICS = ("BLEU-4", "CIDEr")
_FAMILY = {"BLEU-1": "bleu", "BLEU-2": "bleu", "BLEU-3": "bleu", "BLEU-4": "bleu", "METEOR": "meteor",
           "ROUGE-L": "rouge", "CIDEr": "cider"}


def score_captions(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   metrics: Sequence[str] = VALIDATION_METRICS) -> dict[str, float]:
    """Corpus scores of ``candidates`` (image id → caption) against ``references`` (image id → captions)."""
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}")
    missing = [k for k in candidates if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} candidate image(s) have no references, e.g. {missing[0]!r}")
    if not candidates:
        raise ValueError("no captions to score")
    from bnrhn.metrics import score

    families = sorted({_FAMILY[m] for m in metrics})
    cands = {str(k): v for k, v in candidates.items()}
    refs = {str(k): list(references[k]) for k in candidates}
    result = score(cands, refs, metrics=families)
    # a metric that could not be computed (METEOR without Java) is NaN; score() has warned why
    return {m: float(result.corpus.get(m, float("nan"))) for m in metrics}
