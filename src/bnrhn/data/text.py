"""Character corpora for language modelling: reading text safely, the character vocabulary, the
train/validation/test split, character-level Penn Treebank, and batching for truncated BPTT.

Reading (:func:`read_text`)
    A file is read as bytes and decoded as strict UTF-8 (a leading byte-order mark is dropped, ``\\r\\n``
    and ``\\r`` become ``\\n`` as with Python's text mode). An empty file, a file with NUL bytes (binary
    data) or bytes that are not UTF-8 raise ``ValueError`` naming the file, the byte offset and the line.

Vocabulary (:class:`CharVocab`)
    The sorted set of characters of the corpus (every split, so that a validation character is never
    out of vocabulary, as in char-rnn). It is saved inside every checkpoint, so that a model always
    encodes and decodes with its own characters.

Character-level Penn Treebank (:func:`ptb_words_to_chars`)
    Derived from Mikolov's word-level files ``ptb.{train,valid,test}.txt`` with the convention of
    Mikolov's ``ptb.char.*`` files used by Graves (2013) and Cooijmans et al. (2016): each line is one
    sentence; its words (split on whitespace, so the leading and trailing space of every line go) are
    joined with ``_`` as the word-boundary character; ``<unk>`` is kept as its five characters and
    ``N`` (Mikolov's number token) as one; every sentence ends with ``\\n``, which is a character the
    model predicts. The result has 50 symbols (the test split uses 48 of them).

Truncated BPTT (:class:`TBPTTBatches`)
    The N − 1 (input, target) pairs (x_i, x_{i+1}) of a text are cut into B contiguous streams, one
    per batch row; window k holds positions [kL, kL + L) of every stream, so consecutive windows
    continue each stream and the hidden state can be carried (detached) from one window to the next::

        text   a b c d e f g h i j k l m n o p q r s t u v w x y      (N = 25, B = 3, L = 4)
        stream 0: a b c d | e f g h      window 0 = columns 0..3, window 1 = columns 4..7
        stream 1: i j k l | m n o p
        stream 2: q r s t | u v w x      (targets: the next character of each)

    For training, every stream has ⌊(N − 1)/B⌋ pairs and a last window shorter than L is dropped. For
    evaluation (``full=True``) every pair is scored exactly once: the streams' lengths differ by at
    most one and the last window carries per-stream lengths.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "read_text",
    "CharVocab",
    "CharCorpus",
    "TBPTTBatches",
    "TextWindow",
    "ptb_words_to_chars",
    "apply_transform",
    "unigram_entropy_bits",
    "PTB_BOUNDARY",
    "check_seq_len",
]

PTB_BOUNDARY = "_"
PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}


# --------------------------------------------------------------------------------------------------
# reading
def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file, or a clear error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, holds NUL bytes (binary data) or is not valid UTF-8; the
            message names the file, the byte offset and the line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a UTF-8 text file")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: the text file is empty; a language model needs at least 2 characters")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(
            f"{path}: this is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; convert it, e.g. "
            f"iconv -f UTF-16 -t UTF-8 {path} > {path.with_suffix('.utf8' + path.suffix)}"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(
            f"{path}: NUL byte at byte offset {nul} (line {line}): this looks like a binary file, "
            "not UTF-8 text"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 4]
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} (line {line}, bytes {bad!r}: {exc.reason}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if text.startswith("\ufeff"):  # byte-order mark
        text = text[1:]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text:
        raise ValueError(f"{path}: the text file is empty (only a byte-order mark)")
    return text


def _describe_char(c: str) -> str:
    name = unicodedata.name(c, "")
    return f"{c!r} (U+{ord(c):04X}{' ' + name if name else ''})"


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


# --------------------------------------------------------------------------------------------------
# vocabulary
class CharVocab:
    """Bijection between characters and ids 0..V−1 (characters in sorted order)."""

    def __init__(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("a character vocabulary needs at least one character")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"vocabulary entries must be single characters, got {bad[:5]!r}")
        self.chars: list[str] = chars
        self.index: dict[str, int] = {c: i for i, c in enumerate(chars)}
        self._points = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_texts(cls, *texts: str) -> "CharVocab":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, c: str) -> bool:
        return c in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} characters)"

    def encode(self, text: str, source: str = "text", unknown: str = "error") -> Tensor:
        """Ids of ``text`` as a LongTensor.

        ``unknown="error"`` raises ``ValueError`` naming the first character that is not in the
        vocabulary, where it occurs in ``source`` and how many such characters there are;
        ``unknown="skip"`` drops them.
        """
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
        index = self.index
        missing = set(text) - set(index)
        if missing:
            if unknown == "error":
                first = min(text.find(c) for c in missing)
                line, col = _line_col(text, first)
                count = sum(1 for c in text if c in missing)
                others = sorted(missing - {text[first]})
                more = f"; also not in it: {', '.join(map(repr, others[:10]))}" if others else ""
                raise ValueError(
                    f"{source}: character {_describe_char(text[first])} at line {line}, column {col} is not in the "
                    f"model's vocabulary of {len(self)} characters ({count} such character(s) in all{more}); "
                    "use --skip-unknown to drop them"
                )
            text = "".join(c for c in text if c in index)
        # Vectorised lookup (a Python loop over millions of characters takes seconds): code points of
        # the text → positions in the sorted code points of the vocabulary (sorted chars = sorted code points).
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._points, points)
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.flatten().tolist()
        return "".join(self.chars[i] for i in ids)

    def check_text(self, text: str, what: str = "prime text") -> None:
        """``ValueError`` naming the first character of ``text`` that is not in the vocabulary."""
        for i, c in enumerate(text):
            if c not in self.index:
                raise ValueError(
                    f"{what}: character {_describe_char(c)} at position {i} is not in the model's vocabulary "
                    f"of {len(self)} characters: {''.join(self.chars)!r}"
                )

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharVocab":
        return cls(d["chars"])


# --------------------------------------------------------------------------------------------------
# Penn Treebank characters
def ptb_words_to_chars(text: str, boundary: str = PTB_BOUNDARY, unk: str | None = None) -> str:
    """Character-level PTB from Mikolov's word-level text (see the module docstring).

    Each non-blank line's whitespace-separated words are joined with ``boundary`` and the line ends
    with ``\\n``. ``unk`` (a single character), when given, replaces every ``<unk>`` token; by default
    ``<unk>`` stays as its five characters, as in Mikolov's ``ptb.char.*`` files.
    """
    if len(boundary) != 1:
        raise ValueError(f"the word-boundary symbol must be one character, got {boundary!r}")
    if unk is not None and len(unk) != 1:
        raise ValueError(f"the <unk> replacement must be one character, got {unk!r}")
    out = []
    for line in text.split("\n"):
        words = line.split()
        if not words:
            continue
        if any(boundary in w for w in words):
            raise ValueError(f"the word-boundary symbol {boundary!r} occurs inside a word of the text; choose another")
        if unk is not None:
            words = [unk if w == "<unk>" else w for w in words]
        out.append(boundary.join(words))
    return "\n".join(out) + "\n" if out else ""


def apply_transform(text: str, transform: dict | None) -> str:
    """Apply a text transform recorded with a corpus (``None`` or ``{"name": "ptb_chars", ...}``)."""
    if not transform or transform.get("name", "none") == "none":
        return text
    if transform["name"] == "ptb_chars":
        return ptb_words_to_chars(text, transform.get("boundary", PTB_BOUNDARY), transform.get("unk"))
    raise ValueError(f"unknown text transform {transform['name']!r}")


# --------------------------------------------------------------------------------------------------
# corpus
def unigram_entropy_bits(ids: Tensor, vocab_size: int | None = None) -> float:
    """Entropy of the character frequencies of ``ids`` in bits: −Σ p_c log2 p_c (the BPC of a unigram model)."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


@dataclass
class CharCorpus:
    """Train/validation/test ids of one character vocabulary.

    ``source`` records where the text came from and ``transform`` the text transform applied to it
    (``ptb_chars`` for Penn Treebank), so that ``bnrhn lm evaluate --text`` treats a new file the same way.
    """

    vocab: CharVocab
    train: Tensor
    valid: Tensor
    test: Tensor | None = None
    source: dict = field(default_factory=dict)
    transform: dict | None = None

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, valid_fraction: float = 0.05, test_fraction: float = 0.05,
                  source: dict | None = None, transform: dict | None = None, name: str = "text") -> "CharCorpus":
        """Split one text by fractions: the first part trains, then validation, then test (contiguous)."""
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1): training needs a validation split; got {valid_fraction!r}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1) (0 = no test split), got {test_fraction!r}")
        if valid_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"valid_fraction + test_fraction = {valid_fraction + test_fraction} leaves no training text"
            )
        n = len(text)
        n_test = int(round(n * test_fraction))
        n_valid = int(round(n * valid_fraction))
        n_train = n - n_valid - n_test
        parts = {"train": text[:n_train], "valid": text[n_train : n_train + n_valid],
                 "test": text[n_train + n_valid :] if test_fraction > 0 else None}
        for split, part in parts.items():
            if part is not None and len(part) < 2:
                raise ValueError(
                    f"{name}: the {split} split has {len(part)} character(s) ({n} in all with "
                    f"valid_fraction={valid_fraction}, test_fraction={test_fraction}); it needs at least 2"
                )
        vocab = CharVocab.from_texts(text)
        return cls(
            vocab,
            vocab.encode(parts["train"]),
            vocab.encode(parts["valid"]),
            vocab.encode(parts["test"]) if parts["test"] is not None else None,
            source=source or {},
            transform=transform,
        )

    @classmethod
    def from_file(cls, path: str | Path, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> "CharCorpus":
        text = read_text(path)
        src = {"kind": "file", "path": str(path), "valid_fraction": valid_fraction, "test_fraction": test_fraction}
        return cls.from_text(text, valid_fraction, test_fraction, source=src, name=str(path))

    @classmethod
    def from_files(cls, train: str | Path, valid: str | Path, test: str | Path | None = None,
                   transform: dict | None = None) -> "CharCorpus":
        """Separate files per split; the vocabulary is the union of their characters."""
        paths = {"train": train, "valid": valid, "test": test}
        texts = {}
        for split, p in paths.items():
            if p is None:
                continue
            t = apply_transform(read_text(p), transform)
            if len(t) < 2:
                raise ValueError(f"{p}: the {split} text has {len(t)} character(s) after reading; it needs at least 2")
            texts[split] = t
        vocab = CharVocab.from_texts(*texts.values())
        src = {"kind": "files", **{k: str(v) for k, v in paths.items() if v is not None}}
        return cls(
            vocab,
            vocab.encode(texts["train"]),
            vocab.encode(texts["valid"]),
            vocab.encode(texts["test"]) if "test" in texts else None,
            source=src,
            transform=transform,
        )

    @classmethod
    def ptb_chars(cls, directory: str | Path, unk: str | None = None) -> "CharCorpus":
        """Character-level Penn Treebank from the word-level files in ``directory`` (see module docstring)."""
        directory = Path(directory)
        missing = [n for n in PTB_FILES.values() if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory}: Penn Treebank files missing: {', '.join(missing)} (expected Mikolov's "
                "ptb.train.txt, ptb.valid.txt, ptb.test.txt)"
            )
        transform = {"name": "ptb_chars", "boundary": PTB_BOUNDARY, "unk": unk}
        corpus = cls.from_files(*(directory / PTB_FILES[s] for s in ("train", "valid", "test")), transform=transform)
        corpus.source = {**corpus.source, "kind": "ptb", "dir": str(directory)}
        return corpus

    # -- reporting -----------------------------------------------------------------------------------
    def splits(self) -> dict[str, Tensor]:
        d = {"train": self.train, "valid": self.valid}
        if self.test is not None:
            d["test"] = self.test
        return d

    def summary(self) -> dict:
        return {
            "vocab_size": len(self.vocab),
            **{f"{k}_chars": int(v.numel()) for k, v in self.splits().items()},
            "train_unigram_bits": unigram_entropy_bits(self.train, len(self.vocab)),
        }


# --------------------------------------------------------------------------------------------------
# batching for truncated BPTT
def check_seq_len(seq_len: object) -> int:
    """A TBPTT window length ≥ 2, or a ``ValueError`` that says why."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(
            f"sequence length (--seq-len) must be an integer ≥ 2, got {seq_len!r}: truncated backpropagation "
            "through time needs at least two steps per window for a gradient to flow through the recurrence"
        )
    return seq_len


@dataclass
class TextWindow:
    """One TBPTT window: inputs and targets ``[L, B]``; ``lengths`` ``[B]`` (valid steps per stream,
    possibly 0 in the last evaluation window) or None when all L steps are valid; ``index`` = k."""

    inputs: Tensor
    targets: Tensor
    lengths: Tensor | None
    index: int

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel() if self.lengths is None else self.lengths.sum())


class TBPTTBatches:
    """B contiguous streams of a text, cut into windows of ``seq_len`` steps (see the module docstring).

    Args:
        ids: 1-D LongTensor of the text.
        batch_size: B, the number of parallel streams (fewer when the text has fewer than B pairs and
            ``full=True``).
        seq_len: L ≥ 2, the steps per window (the truncation length of backpropagation through time).
        full: score every pair once (evaluation) instead of dropping the remainder (training).
    """

    def __init__(self, ids: Tensor, batch_size: int, seq_len: int, full: bool = False) -> None:
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D tensor of character ids, got shape {tuple(ids.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        check_seq_len(seq_len)
        pairs = ids.numel() - 1
        if pairs < 1:
            raise ValueError(f"a text of {ids.numel()} character(s) has nothing to predict; it needs at least 2")
        self.seq_len = seq_len
        self.full = full
        if full:
            B = min(batch_size, pairs)
            base, extra = divmod(pairs, B)
            lengths = torch.tensor([base + (b < extra) for b in range(B)])
            starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lengths[:-1]]), 0)
            M = base + (extra > 0)
        else:
            B = batch_size
            M = pairs // B
            if M < seq_len:
                raise ValueError(
                    f"the training text has {ids.numel()} characters: too short for {B} streams of at least "
                    f"one window of {seq_len} steps (needs ≥ {B * seq_len + 1}); lower --batch-size or --seq-len"
                )
            lengths = torch.full((B,), M)
            starts = torch.arange(B) * M
        # [M + 1, B] matrix of stream characters (padded with 0 past each stream's end).
        col = torch.arange(M + 1).unsqueeze(1)  # [M + 1, 1]
        pos = starts.unsqueeze(0) + col  # [M + 1, B]
        valid = col <= lengths.unsqueeze(0)
        self.streams = torch.where(valid, ids[pos.clamp(max=ids.numel() - 1)], torch.zeros((), dtype=ids.dtype))
        self.stream_lengths = lengths  # pairs per stream
        self.batch_size = B
        self.steps = M  # pairs in the longest stream
        self.num_windows = math.ceil(M / seq_len) if full else M // seq_len

    def __len__(self) -> int:
        return self.num_windows

    @property
    def num_targets(self) -> int:
        return int(self.stream_lengths.sum()) if self.full else self.num_windows * self.seq_len * self.batch_size

    def window(self, k: int) -> TextWindow:
        if not 0 <= k < self.num_windows:
            raise IndexError(f"window {k} out of range (0..{self.num_windows - 1})")
        a = k * self.seq_len
        b = min(a + self.seq_len, self.steps)
        x = self.streams[a:b]
        y = self.streams[a + 1 : b + 1]
        lengths = None
        if self.full and b == self.steps and bool((self.stream_lengths < b).any()):
            lengths = (self.stream_lengths - a).clamp(0, b - a)
        return TextWindow(x, y, lengths, k)

    def __iter__(self):
        for k in range(self.num_windows):
            yield self.window(k)
