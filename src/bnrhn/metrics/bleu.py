"""BLEU-1..4 with coco-caption's conventions (``pycocoevalcap.bleu``), vectorised over the corpus.

Per image i with candidate c_i and references R_i:

- clipped matches  m_{i,k} = sum over k-grams g of c_i of min(count_c(g), max_{r in R_i} count_r(g));
- guesses          g_{i,k} = max(0, |c_i| - k + 1);
- reference length r_i     = the length of the reference *closest* to |c_i|, ties to the shorter
  (coco-caption's ``option='closest'``: ``min((abs(l - c), l) for l in reflens)[1]``).

Corpus BLEU-N = BP · (prod_{k<=N} (sum_i m_{i,k} + tiny) / (sum_i g_{i,k} + small))^(1/N), with
BP = exp(1 - 1/ratio) if ratio = (sum_i |c_i| + tiny) / (sum_i r_i + small) < 1, else 1;
tiny = 1e-15 and small = 1e-9 are coco-caption's smoothing (they keep an empty candidate's precision
finite: (0 + 1e-15) / (0 + 1e-9) = 1e-6). Per-image BLEU-N is the same formula on one image's counts —
coco-caption reports those as the per-image scores. Both are computed here in the same order of
floating-point operations as coco-caption, so the numbers agree to the last bits.
"""

from __future__ import annotations

import numpy as np

from bnrhn.metrics.ngrams import NgramTable

TINY = 1e-15
SMALL = 1e-9


def closest_ref_length(cand_len: np.ndarray, ref_lens: list[np.ndarray] | np.ndarray,
                       ref_image: np.ndarray | None = None) -> np.ndarray:
    """Length of the reference closest to each candidate's length, ties going to the shorter.

    ``ref_lens`` is the flat array of reference lengths with ``ref_image`` the image of each.
    """
    ref_lens = np.asarray(ref_lens, dtype=np.int64)
    diff = np.abs(ref_lens - cand_len[ref_image])
    # lexicographic min of (|l - c|, l) per image: sort by image, then diff, then length
    order = np.lexsort((ref_lens, diff, ref_image))
    first = np.ones(len(order), dtype=bool)
    first[1:] = ref_image[order][1:] != ref_image[order][:-1]
    out = np.empty(len(cand_len), dtype=np.int64)
    out[ref_image[order][first]] = ref_lens[order][first]
    return out


def bleu_stats(table: NgramTable, n_images: int, ref_image: np.ndarray, n: int = 4):
    """Clipped matches, guesses, candidate lengths and closest reference lengths per image.

    Sentences ``0..n_images-1`` of ``table`` are the candidates (one per image), the rest are the
    references, ``ref_image[j]`` being the image of reference sentence ``n_images + j``; references
    must be grouped by image in increasing image order (``ref_image`` non-decreasing).
    """
    I = n_images
    is_ref = table.sent >= I
    # Table entries are sorted by (gram, sentence) and references are grouped by image in image order,
    # so the keys gram * I + image below come out sorted for references and for candidates alike.
    r_key = table.gram[is_ref] * I + ref_image[table.sent[is_ref] - I]
    r_cnt = table.count[is_ref]
    # max count of each gram over one image's references (runs of equal keys)
    if len(r_key):
        starts = np.flatnonzero(np.concatenate(([True], r_key[1:] != r_key[:-1])))
        uniq_key, max_ref = r_key[starts], np.maximum.reduceat(r_cnt, starts)
    else:
        uniq_key, max_ref = r_key, r_cnt
    # clip each candidate count by it
    c_img = table.sent[~is_ref]
    c_gram = table.gram[~is_ref]
    c_key = c_gram * I + c_img
    c_cnt = table.count[~is_ref]
    clipped = np.zeros(len(c_key), dtype=np.int64)
    if len(uniq_key):
        pos = np.minimum(np.searchsorted(uniq_key, c_key), len(uniq_key) - 1)
        found = uniq_key[pos] == c_key
        clipped[found] = np.minimum(c_cnt[found], max_ref[pos[found]])
    k_of = table.order[c_gram].astype(np.int64)
    correct = np.bincount(c_img * n + k_of, weights=clipped, minlength=n_images * n).reshape(n_images, n)
    correct = correct.astype(np.int64)
    cand_len = table.lengths[:n_images]
    guess = np.maximum(0, cand_len[:, None] - np.arange(n)[None, :])
    ref_len = closest_ref_length(cand_len, table.lengths[n_images:], ref_image)
    return correct, guess, cand_len, ref_len


def _bleu_from_counts(correct, guess, testlen, reflen, n):
    """coco-caption's BleuScorer.compute_score arithmetic, on arrays (per image) or scalars (corpus)."""
    correct = np.asarray(correct, dtype=np.float64)
    guess = np.asarray(guess, dtype=np.float64)
    out = []
    bleu = np.ones(correct.shape[:-1])
    for k in range(n):
        bleu = bleu * ((correct[..., k] + TINY) / (guess[..., k] + SMALL))
        out.append(bleu ** (1.0 / (k + 1)))
    out = np.stack(out, axis=-1)
    ratio = (np.asarray(testlen, dtype=np.float64) + TINY) / (np.asarray(reflen, dtype=np.float64) + SMALL)
    with np.errstate(over="ignore", divide="ignore"):
        bp = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return out * bp[..., None]


def bleu(table: NgramTable, n_images: int, ref_image: np.ndarray, n: int = 4):
    """Corpus BLEU-1..n (list of floats) and per-image BLEU ``[n_images, n]``."""
    return bleu_from_stats(*bleu_stats(table, n_images, ref_image, n), n=n)


def bleu_from_stats(correct, guess, cand_len, ref_len, n: int = 4):
    """Corpus BLEU-1..n and per-image BLEU from the per-image statistics of :func:`bleu_stats` (which may
    have been computed in several parts: every statistic is one image's own)."""
    per_image = _bleu_from_counts(correct, guess, cand_len, ref_len, n)
    # corpus: the sums are integers (exact); coco-caption adds tiny/small to the sums
    corpus = _bleu_from_counts(correct.sum(0), guess.sum(0), cand_len.sum(), ref_len.sum(), n)
    return [float(x) for x in corpus], per_image
