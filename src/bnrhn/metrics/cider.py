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
            sigma: float = SIGMA, document_frequency: np.ndarray | None = None,
            n_documents: int | None = None):
    """Corpus CIDEr-D and per-image scores ``[n_images]``.

    Same layout as :func:`bnrhn.metrics.bleu.bleu_stats`: sentences ``0..n_images-1`` of ``table`` are the
    candidates, the rest the references, grouped by image in image order (``ref_image`` non-decreasing).
    ``document_frequency`` (``[G]``, per gram of ``table``) and ``n_documents``: document frequencies
    counted on another corpus of ``n_documents`` images (:class:`CiderDReward`), instead of on these
    images' references.
    """
    if (document_frequency is None) != (n_documents is None):
        raise ValueError("document_frequency and n_documents go together (frequencies counted on n_documents images)")
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
    if document_frequency is not None:
        df = np.asarray(document_frequency, dtype=np.float64)
    elif len(r_key):
        first = np.concatenate(([True], r_key[1:] != r_key[:-1]))
        df = np.bincount(r_gram[first], minlength=G).astype(np.float64)
    else:
        df = np.zeros(G)
    n_docs = I if document_frequency is None else int(n_documents)
    idf = np.log(float(n_docs)) - np.log(np.maximum(1.0, df))

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


class CiderDReward:
    """CIDEr-D of captions of a fixed set of images, with document frequencies counted once on all of
    their references: the reward of self-critical sequence training (Rennie et al. 2017, §4 — "CIDEr-D
    ... with the document frequencies of the training set"; Luo 2020 does the same).

    A caption's reward depends on its image's references and the corpus statistics only, never on the
    other captions scored with it; scoring one caption for every image of the corpus gives
    :func:`bnrhn.metrics.score`'s per-image CIDEr exactly (there the document frequencies come from the
    evaluated images, here the same images).

    Captions and references are used as they are (space-separated tokens): tokenize them first
    (:func:`bnrhn.metrics.tokenizer.tokenize_captions`) to match ``score``'s PTB tokenisation.
    """

    def __init__(self, references: "list[list[str]]", n: int = 4, sigma: float = SIGMA) -> None:
        from itertools import chain

        from bnrhn.metrics.ngrams import build_ngram_table

        if not references or any(len(r) == 0 for r in references):
            raise ValueError("every image needs at least one reference caption")
        self.references = [list(r) for r in references]
        self.n, self.sigma = n, sigma
        flat = list(chain.from_iterable(self.references))
        self.words = {w: i for i, w in enumerate(dict.fromkeys(chain.from_iterable(map(str.split, flat))))}
        table = build_ngram_table(flat, n, words=self.words)
        ref_image = np.repeat(np.arange(len(self.references)), [len(r) for r in self.references])
        # distinct (gram, image) pairs: entries are sorted by gram, then sentence (so by image)
        key = table.gram * len(self.references) + ref_image[table.sent]
        first = np.concatenate(([True], key[1:] != key[:-1])) if len(key) else np.zeros(0, dtype=bool)
        df = np.bincount(table.gram[first], minlength=table.n_grams)
        order = np.argsort(table.keys)
        self._keys = table.keys[order]
        self._df = df[order].astype(np.float64)
        self.n_images = len(self.references)

    def __call__(self, captions: "list[str]", images) -> np.ndarray:
        """CIDEr-D ``[len(captions)]`` of ``captions[j]`` as a caption of image ``images[j]`` (an index
        into the references given at construction; an image may appear several times)."""
        from bnrhn.metrics.ngrams import build_ngram_table

        images = np.asarray(images, dtype=np.int64).reshape(-1)
        if len(images) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(images)} image indices")
        if len(captions) == 0:
            return np.zeros(0)
        if images.min() < 0 or images.max() >= self.n_images:
            raise IndexError(f"image index out of range 0..{self.n_images - 1}")
        refs = [self.references[i] for i in images.tolist()]
        table = build_ngram_table(list(captions) + [s for r in refs for s in r], self.n, words=self.words)
        ref_of = np.repeat(np.arange(len(captions)), [len(r) for r in refs])
        df = np.zeros(table.n_grams)
        if table.n_grams and len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, table.keys), len(self._keys) - 1)
            found = self._keys[pos] == table.keys
            df[found] = self._df[pos[found]]
        _, per_caption = cider_d(table, len(captions), ref_of, self.n, self.sigma,
                                 document_frequency=df, n_documents=self.n_images)
        return per_caption
