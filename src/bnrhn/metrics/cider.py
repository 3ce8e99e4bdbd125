"""CIDEr-D as coco-caption computes it (``pycocoevalcap.cider``, reported as "CIDEr"), vectorised.

coco-caption's ``Cider`` scorer (pycocoevalcap >= 1.0) *is* CIDEr-D (Vedantam et al. 2015, §4): the
consensus score with the two "-D" changes — clipping and a Gaussian length penalty. For image i with
candidate c and references r_1..r_m, and n = 1..4:

- TF-IDF vectors: g_n(s)[w] = count_s(w) · (log |I| - log max(1, df(w))), where |I| is the number of
  evaluated images and df(w) the number of images whose *references* contain the n-gram w (document
  frequencies come from the evaluated set itself, as in coco-caption);
- sim_n(c, r) = sum_w min(g_n(c)[w], g_n(r)[w]) · g_n(r)[w] / (||g_n(c)|| ||g_n(r)||)   (clipping; the
  division is skipped when a norm is 0) · exp(-(l(c) - l(r))² / (2σ²)), σ = 6;
- CIDEr-D_i = 10 · (1/4) sum_n (1/m) sum_j sim_n(c, r_j); the corpus score is the mean over images.

One quirk reproduced on purpose: coco-caption's "length" l(s) is the number of *bigrams* of s
(``if n == 1: length += term_freq`` with n the 0-based order), i.e. max(len(s) - 1, 0) words, not len(s).
The length difference is the same except when a sentence has 0 or 1 words.

The implementation gives every n-gram an integer id (:mod:`bnrhn.metrics.ngrams`), so the vectors are
flat arrays; candidate weights are looked up for each reference entry with one ``searchsorted`` and every
sum is a ``bincount``.
"""

from __future__ import annotations

import numpy as np

from bnrhn.metrics.ngrams import NgramTable

SIGMA = 6.0


def cider_d(table: NgramTable, n_images: int, ref_image: np.ndarray, n: int = 4,
            sigma: float = SIGMA):
    """Corpus CIDEr-D and per-image scores ``[n_images]``.

    Same layout as :func:`bnrhn.metrics.bleu.bleu_stats`: sentences ``0..n_images-1`` of ``table`` are the
    candidates, the rest the references, grouped by image in image order (``ref_image`` non-decreasing).
    """
    G = max(table.n_grams, 1)
    I = n_images
    n_refs = len(ref_image)
    is_ref = table.sent >= I
    # Table entries are sorted by (gram, sentence) and references are grouped by image in image order,
    # so the keys gram * I + image below come out sorted for references and for candidates alike.
    r_sent = table.sent[is_ref] - I
    r_gram = table.gram[is_ref]
    r_key = r_gram * I + ref_image[r_sent]

    # document frequency: number of images whose references contain the gram (distinct (gram, image))
    if len(r_key):
        first = np.concatenate(([True], r_key[1:] != r_key[:-1]))
        df = np.bincount(r_gram[first], minlength=G).astype(np.float64)
    else:
        df = np.zeros(G)
    idf = np.log(float(I)) - np.log(np.maximum(1.0, df))

    weight = table.count * idf[table.gram]                   # tf · idf of every (sentence, gram) entry
    order_of = table.order[table.gram].astype(np.int64)       # 0..n-1

    # norms per (sentence, order); candidates are sentences 0..I-1
    n_sent = table.n_sentences
    norm = np.sqrt(np.bincount(table.sent * n + order_of, weights=weight * weight,
                               minlength=n_sent * n)).reshape(n_sent, n)

    # clipped dot products: for each reference entry, the candidate's weight of the same gram
    c_key = table.gram[~is_ref] * I + table.sent[~is_ref]
    c_w = weight[~is_ref]
    w_r = weight[is_ref]
    contrib = np.zeros(len(r_key))
    if len(c_key):
        pos = np.minimum(np.searchsorted(c_key, r_key), len(c_key) - 1)
        found = c_key[pos] == r_key
        w_rf = w_r[found]
        contrib[found] = np.minimum(c_w[pos[found]], w_rf) * w_rf
    dot = np.bincount(r_sent * n + order_of[is_ref], weights=contrib,
                      minlength=n_refs * n).reshape(n_refs, n)

    cand_norm = norm[:n_images][ref_image]
    ref_norm = norm[n_images:]
    denom = cand_norm * ref_norm
    val = np.where(denom != 0, dot / np.where(denom != 0, denom, 1.0), dot)

    # Gaussian length penalty on coco-caption's "length" (number of bigrams, see module docstring)
    blen = np.maximum(table.lengths - 1, 0).astype(np.float64)
    delta = blen[:n_images][ref_image] - blen[n_images:]
    val = val * np.exp(-(delta ** 2) / (2 * sigma ** 2))[:, None]

    # sum over references (in order), mean over n, / number of references, x 10
    summed = np.stack([np.bincount(ref_image, weights=val[:, k], minlength=n_images) for k in range(n)], 1)
    m = np.bincount(ref_image, minlength=n_images).astype(np.float64)
    per_image = summed.mean(axis=1) / m * 10.0
    return float(np.mean(per_image)), per_image
