"""Caption tokenisation and the word vocabulary.

Tokenisation: lower-case, then every run of characters that are neither letters nor digits separates
words, so punctuation disappears ("A dog's ball." → ``["a", "dog", "s", "ball"]``). The vocabulary is
built from the *training* split only: words seen at least ``min_count`` times, in order of decreasing
count (ties alphabetical, so the same captions always give the same ids), after four special tokens:

    0 <pad>   1 <start>   2 <end>   3 <unk>

Scope: this suits languages that separate words with spaces or punctuation. A language written without
spaces (Chinese, Japanese, Thai) gives one "word" per clause, nearly all rarer than ``min_count``, so
most of it becomes ``<unk>``: segment such captions into words first (space-separated), and the
training command warns when most training words are lost (:func:`unknown_fraction`).

The vocabulary is saved inside every checkpoint (:meth:`Vocabulary.to_dict`), so a model always
decodes with its own words; :attr:`Vocabulary.fingerprint` identifies it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-case words of ``text`` with punctuation stripped (``[^\\W_]+`` runs)."""
    return _WORD.findall(text.lower())


def unknown_fraction(captions: Iterable[str], vocab: "Vocabulary") -> float:
    """The fraction of the words of ``captions`` that ``vocab`` maps to ``<unk>`` (0 for no words)."""
    words = [w for c in captions for w in tokenize(c)]
    return sum(w not in vocab.index for w in words) / len(words) if words else 0.0


class Vocabulary:
    """Word ↔ id mapping with the special tokens ``<pad> <start> <end> <unk>`` at ids 0..3."""

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], min_count: int | None = None) -> None:
        words = list(words)
        if words[: len(SPECIALS)] != list(SPECIALS):
            words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        if len(set(words)) != len(words):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"vocabulary has duplicate words: {dup[:5]}")
        self.words: list[str] = words
        self.index: dict[str, int] = {w: i for i, w in enumerate(words)}
        self.min_count = min_count

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_size: int | None = None) -> Vocabulary:
        """The vocabulary of words seen at least ``min_count`` times in ``captions`` (training split)."""
        if min_count < 1:
            raise ValueError(f"min_count must be ≥ 1, got {min_count}")
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max(0, max_size - len(SPECIALS))]
        if not kept:
            raise ValueError(
                f"no word occurs at least {min_count} times in the {sum(counts.values())} training tokens; "
                "lower --min-count or check the captions"
            )
        return cls(list(SPECIALS) + kept, min_count=min_count)

    # -- mapping ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def encode(self, caption: str | Sequence[str], max_len: int | None = None) -> list[int]:
        """``<start> w_1 .. w_n <end>`` ids of a caption (text or tokens), truncated to ``max_len`` words."""
        tokens = tokenize(caption) if isinstance(caption, str) else list(caption)
        if max_len is not None:
            tokens = tokens[:max_len]
        return [self.start_id] + [self.index.get(w, self.unk_id) for w in tokens] + [self.end_id]

    def decode(self, ids: Iterable[int], keep_unk: bool = True) -> str:
        """Words of ``ids`` up to the first ``<end>``, without ``<start>``/``<pad>``, joined by spaces."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            if i == self.unk_id and not keep_unk:
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(out)

    # -- persistence ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Short sha256 of the word list: two vocabularies with the same fingerprint map ids identically."""
        return hashlib.sha256(json.dumps(self.words).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"words": list(self.words), "min_count": self.min_count, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        if not isinstance(d, dict) or "words" not in d:
            raise ValueError("not a saved vocabulary (expected a dict with 'words')")
        vocab = cls(d["words"], d.get("min_count"))
        if d.get("fingerprint") and d["fingerprint"] != vocab.fingerprint:
            raise ValueError("saved vocabulary is corrupt: its fingerprint does not match its words")
        return vocab

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words, min_count={self.min_count}, fingerprint={self.fingerprint})"
