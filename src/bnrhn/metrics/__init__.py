"""Caption metrics with coco-caption's numbers: BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D.

>>> from bnrhn.metrics import score
>>> s = score({1: "a dog runs on the grass"},
...           {1: ["A dog is running on grass.", "The dog runs across a lawn."]},
...           metrics=("bleu", "rouge", "cider"))
>>> sorted(s.corpus)
['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'CIDEr', 'ROUGE-L']

The numbers are those of ``pycocoevalcap`` (the coco-caption scorer that papers report): the same
tokenisation (PTB tokenizer, lower-case, punctuation removed; :mod:`bnrhn.metrics.tokenizer`), BLEU with
the closest reference length and coco-caption's smoothing (:mod:`~bnrhn.metrics.bleu`), ROUGE-L with
β = 1.2 (:mod:`~bnrhn.metrics.rouge`), CIDEr-D with σ = 6, clipping and document frequencies from the
evaluated references, reported as "CIDEr" like coco-caption (:mod:`~bnrhn.metrics.cider`), and METEOR 1.5
from the reference jar in a persistent, supervised JVM (:mod:`~bnrhn.metrics.meteor`). BLEU, ROUGE-L and
CIDEr-D are computed in-process with NumPy, fast enough to score a validation set every epoch.
"""

from bnrhn.metrics.score import METRIC_KEYS, METRICS, Scores, parse_metrics, score
from bnrhn.metrics.tokenizer import JavaPTBTokenizer, PTBTokenizer, tokenize_captions

__all__ = ["score", "Scores", "METRICS", "METRIC_KEYS", "parse_metrics", "PTBTokenizer", "JavaPTBTokenizer",
           "tokenize_captions"]
