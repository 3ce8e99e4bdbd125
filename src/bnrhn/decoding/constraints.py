"""Decoding constraints and length penalties shared by greedy decoding, sampling and beam search.

All are off by default; each is a mask on one step's log-probabilities (the banned continuation gets
−inf), computed for every row of a batch at once:

* **Trigram blocking** (``block_trigrams``): a hypothesis may not contain the same word trigram twice;
  the word that would complete a trigram the hypothesis already holds is banned. Paulus, Xiong and Socher
  (2018), "A Deep Reinforced Model for Abstractive Summarization" (ICLR), §2.5, and the ``block_trigrams``
  option of the captioning codebases (e.g. ruotianluo/self-critical.pytorch). ``<end>`` never completes
  a trigram (only words do).
* **No bad endings** (``bad_ending_ids``): a caption may not end in a function word: ``<end>`` is banned
  right after one of :data:`BAD_ENDINGS` (mapped through the model's vocabulary; absent words are
  ignored), as self-critical.pytorch's ``remove_bad_endings``. Because a caption of ``max_len`` words
  must end there, such a word is also banned as the ``max_len``-th word (it could never be followed by
  ``<end>``): a lookahead that removes no valid caption.
* **Length penalty** (``length_norm`` = α, ``length_penalty`` = its form): a finished caption of n words
  plus ``<end>`` (|Y| = n + 1 tokens) is ranked by log p(Y) / lp(|Y|) with
  ``"power"``: lp = |Y|^α (im2txt's length normalisation; α = 1 is the mean log-probability per token), or
  ``"gnmt"``: lp = ((5 + |Y|) / 6)^α (Wu et al. 2016, "Google's Neural Machine Translation System", eq. 14).
  α = 0 is off for both. Both grow with |Y| for α > 0, so log p / lp(max_len + 1) bounds the score of every
  completion of an alive hypothesis (beam search's early stop stays exact).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

LENGTH_PENALTIES = ("power", "gnmt")

# self-critical.pytorch's 17 bad endings (articles, prepositions, forms of "be") and 8 more conjunctions,
# prepositions and possessives that end no English caption well.
BAD_ENDINGS = ("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near", "to",
               "is", "are", "am",
               "and", "or", "by", "from", "into", "onto", "its", "their")


def check_length_penalty(alpha: float, form: str) -> None:
    if form not in LENGTH_PENALTIES:
        raise ValueError(f"length_penalty must be one of {', '.join(LENGTH_PENALTIES)}, got {form!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"length_norm must be a number ≥ 0, got {alpha!r}")


def length_penalty(tokens: int, alpha: float, form: str = "power") -> float:
    """lp(|Y|) for a caption of ``tokens`` = words + 1 (its ``<end>``) tokens; 1.0 when α = 0."""
    if not alpha:
        return 1.0
    if form == "gnmt":
        return ((5.0 + tokens) / 6.0) ** alpha
    return float(tokens) ** alpha


def bad_ending_ids(index: Mapping[str, int], words: Iterable[str] = BAD_ENDINGS) -> list[int]:
    """The ids of ``words`` in a vocabulary's word → id mapping (e.g. ``Vocabulary.index``), sorted; words
    the vocabulary does not have are left out."""
    return sorted({int(index[w]) for w in words if w in index})


def bad_mask(ids, vocab_size: int, device, special_ids: Iterable[int] = ()) -> Tensor | None:
    """A ``[V]`` boolean mask of the bad-ending word ids (special tokens never count), or None when empty."""
    if ids is None:
        return None
    ids = sorted({int(i) for i in ids} - {int(s) for s in special_ids})
    if not ids:
        return None
    if ids[0] < 0 or ids[-1] >= vocab_size:
        raise ValueError(f"bad-ending ids must be word ids below the vocabulary size {vocab_size}, got {ids}")
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.tensor(ids, device=device)] = True
    return mask


def block_repeated_trigrams_(logp: Tensor, seq: Tensor) -> Tensor:
    """Bans, in place, every word that would complete a trigram already in its row's words.

    ``logp``: ``[R, V]`` this step's log-probabilities; ``seq``: ``[R, n]`` each row's words so far. The
    trigrams are (seq[i], seq[i+1], seq[i+2]), i < n − 2; the new word w completes (seq[n−2], seq[n−1], w),
    banned when some i has seq[i] = seq[n−2], seq[i+1] = seq[n−1] and then w = seq[i+2]. One comparison over
    ``[R, n − 2]`` and one scatter (min with −inf where a trigram matches, +inf, i.e. no change, elsewhere).
    """
    n = seq.shape[1]
    if n < 3:
        return logp
    hit = (seq[:, : n - 2] == seq[:, n - 2 : n - 1]) & (seq[:, 1 : n - 1] == seq[:, n - 1 :])
    inf = torch.tensor(float("inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter_reduce_(1, seq[:, 2:], torch.where(hit, -inf, inf), reduce="amin")
