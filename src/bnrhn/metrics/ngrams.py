"""Corpus n-gram tables shared by BLEU and CIDEr-D.

Both metrics need, for every sentence (candidates and references), the count of each of its 1..4-grams.
coco-caption builds one Python dict of tuple n-grams per sentence and walks them in Python for every
comparison. Here every n-gram of the corpus gets an integer id once, and the counts become flat NumPy
arrays ``(sentence, gram, count)``; the metrics then work on whole arrays (sort, ``searchsorted``,
``bincount``) instead of per-n-gram Python.

Id construction (no hashing, no collisions): words get ids from a dict; the k-gram starting at position p
gets the id of the pair ((k-1)-gram id at p, word id at p+k-1), made dense by sorting — so an id is never
larger than the number of distinct k-grams, whatever the vocabulary size.

Sentences are whitespace-split, as coco-caption's ``precook`` does (``str.split()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np


@dataclass
class NgramTable:
    """Counts of every 1..n-gram of every sentence.

    Attributes:
        n: the largest n-gram order.
        lengths: ``[S]`` number of words of each sentence.
        sent, gram, count: ``[E]`` one entry per (sentence, distinct n-gram of that sentence), sorted by
            gram id then sentence; ``gram`` ids are global over all orders (orders in increasing ranges).
        order: ``[G]`` the order (1..n) of each gram id, minus 1 (0 = unigram).
        n_grams: G, the number of distinct n-grams in the corpus.
        keys: ``[G]`` (only when the table was built with a fixed ``words`` numbering) each gram's words
            packed in one integer, sum_i (id(w_i) + 1) * KEY_BASE^(k-1-i): the same n-gram gets the same key
            in every table built with the same numbering, which lets document frequencies counted once on a
            corpus be looked up for the grams of another table (SCST's CIDEr-D reward).
    """

    n: int
    lengths: np.ndarray
    sent: np.ndarray
    gram: np.ndarray
    count: np.ndarray
    order: np.ndarray
    n_grams: int
    keys: np.ndarray | None = None

    @property
    def n_sentences(self) -> int:
        return len(self.lengths)


KEY_BASE = 1 << 16  # packed keys (NgramTable.keys) hold up to four word ids below 2^16 - 1 in a uint64


def build_ngram_table(sentences: list[str], n: int = 4, words: dict[str, int] | None = None) -> NgramTable:
    """Count the 1..n-grams of whitespace-split ``sentences`` (see the module docstring).

    ``words``: a fixed numbering of words (ids 0..W-1); with it the table also holds each gram's packed
    ``keys`` (words not in it are numbered W, W+1, ... in this table only: their grams match no key of a
    table built from the words the numbering came from)."""
    # C-level loops only: split every sentence, number the distinct words, map words to numbers
    splits = list(map(str.split, sentences))
    lengths = np.fromiter(map(len, splits), dtype=np.int64, count=len(splits))
    all_words = list(chain.from_iterable(splits))
    if words is None:
        vocab = {w: i for i, w in enumerate(dict.fromkeys(all_words))}
    else:
        unseen = [w for w in dict.fromkeys(all_words) if w not in words]
        vocab = {**words, **{w: len(words) + i for i, w in enumerate(unseen)}}
        if n > 4 or len(vocab) >= KEY_BASE - 1:
            raise ValueError(f"packed n-gram keys hold up to 4-grams of fewer than {KEY_BASE - 1} distinct words; "
                             f"got n={n} and {len(vocab)} words (a CIDEr-D reward over references this varied "
                             "needs wider keys: please report it)")
    tokens = np.fromiter(map(vocab.__getitem__, all_words), dtype=np.int64, count=len(all_words))
    n_sent, n_tok, n_vocab = len(sentences), len(tokens), len(vocab)
    empty = np.zeros(0, dtype=np.int64)
    if n_tok == 0:
        return NgramTable(n, lengths, empty, empty, empty, np.zeros(0, dtype=np.int8), 0,
                          None if words is None else np.zeros(0, dtype=np.uint64))

    sent_of_tok = np.repeat(np.arange(n_sent, dtype=np.int64), lengths)
    # number of words from each position to the end of its sentence (itself included)
    remaining = np.repeat(np.cumsum(lengths), lengths) - np.arange(n_tok, dtype=np.int64)

    # For each order k, one sort of key = (id of the k-gram's pair key) * n_sent + sentence gives at once
    # the dense k-gram ids (runs of equal key // n_sent) and the distinct (gram, sentence) pairs with
    # their counts (runs of equal key).
    ent_sent, ent_gram, ent_count, gram_order, gram_keys = [], [], [], [], []
    offset = 0
    prev = tokens  # dense id of the (k-1)-gram starting at each position
    packed = tokens.astype(np.uint64) + np.uint64(1)  # packed words of the (k-1)-gram at each position
    for k in range(1, n + 1):
        m = n_tok - k + 1
        if m <= 0:
            break
        if k == 1:
            pos = np.arange(n_tok, dtype=np.int64)
            key = tokens
        else:
            pos = np.flatnonzero(remaining[:m] >= k)
            key = prev[pos] * n_vocab + tokens[pos + (k - 1)]
        if len(pos) == 0:
            break
        if int(key.max()) >= (2 ** 62) // max(n_sent, 1):  # pragma: no cover - astronomically large corpora
            raise OverflowError("corpus too large for 64-bit n-gram keys")
        full = key * n_sent + sent_of_tok[pos]
        order = np.argsort(full)
        full = full[order]
        gkey = full // n_sent
        new_gram = np.empty(len(full), dtype=bool)
        new_gram[0] = True
        np.not_equal(gkey[1:], gkey[:-1], out=new_gram[1:])
        dense_sorted = np.cumsum(new_gram) - 1
        n_k = int(dense_sorted[-1]) + 1
        # dense id of the k-gram at each position, for the next order
        dense = np.zeros(n_tok, dtype=np.int64)
        dense[pos[order]] = dense_sorted
        prev = dense
        if words is not None:
            if k > 1:
                packed = np.zeros(n_tok, dtype=np.uint64)
                packed[pos] = packed_prev[pos] * np.uint64(KEY_BASE) + tokens[pos + (k - 1)].astype(np.uint64) + np.uint64(1)
            first_pos = pos[order][new_gram]  # one position of each new gram, in dense-id order
            gram_keys.append(packed[first_pos])
            packed_prev = packed
        # distinct (gram, sentence) pairs and their counts
        new_pair = np.empty(len(full), dtype=bool)
        new_pair[0] = True
        np.not_equal(full[1:], full[:-1], out=new_pair[1:])
        starts = np.flatnonzero(new_pair)
        ent_count.append(np.diff(np.append(starts, len(full))))
        ent_sent.append(full[starts] % n_sent)
        ent_gram.append(dense_sorted[starts] + offset)
        gram_order.append(np.full(n_k, k - 1, dtype=np.int8))
        offset += n_k

    return NgramTable(
        n=n,
        lengths=lengths,
        sent=np.concatenate(ent_sent),
        gram=np.concatenate(ent_gram),
        count=np.concatenate(ent_count),
        order=np.concatenate(gram_order),
        n_grams=offset,
        keys=np.concatenate(gram_keys) if words is not None else None,
    )
