"""ROUGE-L as coco-caption computes it (``pycocoevalcap.rouge``), with a bit-parallel LCS.

Per image, with candidate c and references r_1..r_m (split on single spaces, as coco-caption does):
P = max_j LCS(c, r_j) / |c|, R = max_j LCS(c, r_j) / |r_j| (maxima taken separately), and
ROUGE-L = (1 + β²) P R / (R + β² P) with β = 1.2, or 0 when P or R is 0. The corpus score is the mean
over images.

coco-caption splits with ``str.split(" ")``, so an empty caption is one empty token ``[""]`` (length 1):
an empty candidate scores 0 against non-empty references, and 1 against an empty reference. This is kept.

LCS length by the bit-vector algorithm of Allison & Dix (1986) in Hyyrö's form (2004): with one bit
per candidate position, V = all ones, then for each reference word b: U = V & M[b]; V = (V + U) | (V - U),
where M[b] has bit i set iff candidate word i equals b. LCS = number of zero bits of V. Python ints make
that O(|r|) big-int operations per pair instead of coco-caption's O(|c|·|r|) Python loop.
"""

from __future__ import annotations

import numpy as np

BETA = 1.2


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    masks: dict[str, int] = {}
    for i, w in enumerate(a):
        masks[w] = masks.get(w, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for w in b:
        u = v & masks.get(w, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidates: list[str], references: list[list[str]], beta: float = BETA):
    """Corpus ROUGE-L and per-image scores ``[n_images]`` for tokenized (space-joined) captions."""
    beta2 = beta * beta
    scores = np.empty(len(candidates), dtype=np.float64)
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        c = cand.split(" ")
        len_c = len(c)
        masks: dict[str, int] = {}
        for p, w in enumerate(c):
            masks[w] = masks.get(w, 0) | (1 << p)
        get = masks.get
        full = (1 << len_c) - 1
        prec_max = 0.0
        rec_max = 0.0
        for ref in refs:
            r = ref.split(" ")
            v = full
            for w in r:
                u = v & get(w, 0)
                v = ((v + u) | (v - u)) & full
            lcs = len_c - v.bit_count()
            if lcs:
                p = lcs / len_c
                rc = lcs / len(r)
                if p > prec_max:
                    prec_max = p
                if rc > rec_max:
                    rec_max = rc
        if prec_max != 0 and rec_max != 0:
            scores[i] = ((1 + beta2) * prec_max * rec_max) / (rec_max + beta2 * prec_max)
        else:
            scores[i] = 0.0
    return float(np.mean(scores)) if len(scores) else 0.0, scores
