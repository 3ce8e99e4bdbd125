"""Character corpora: reading (bad input), vocabulary, splits, PTB characters, TBPTT batching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bnrhn.data.text import (
    CharCorpus, CharVocab, TBPTTBatches, check_seq_len, ptb_words_to_chars, read_text, unigram_entropy_bits,
)

DATA = Path(__import__("os").environ.get("BNRHN_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
PTB = DATA / "text" / "ptb"


# ---------------------------------------------------------------------------------------------- reading
def test_read_text_normalises_newlines_and_bom(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffone\r\ntwo\rthree\n".encode("utf-8"))
    assert read_text(p) == "one\ntwo\nthree\n"


def test_empty_file_is_a_clear_error(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt: the text file is empty"):
        read_text(p)


def test_binary_file_names_file_and_byte_offset(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(b"abc\ndef\x00\x01\x02")
    with pytest.raises(ValueError, match=r"blob\.bin: NUL byte at byte offset 7 \(line 2\).*binary"):
        read_text(p)


def test_invalid_utf8_names_byte_offset_and_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("line one\ncaf".encode() + b"\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte offset 12 \(line 2"):
        read_text(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------- vocabulary
def test_vocab_roundtrip_and_unknown_character_is_named():
    v = CharVocab.from_texts("hello world\n")
    assert v.chars == sorted(set("hello world\n"))
    ids = v.encode("hello")
    assert v.decode(ids) == "hello"
    assert CharVocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match=r"character 'z' \(U\+007A LATIN SMALL LETTER Z\) at line 2, column 3"):
        v.encode("he\nllz", source="x.txt")
    assert v.decode(v.encode("hez", unknown="skip")) == "he"
    with pytest.raises(ValueError, match=r"--prime: character 'Q'.* position 1"):
        v.check_text("hQ", "--prime")


def test_unigram_entropy():
    ids = torch.tensor([0, 1, 2, 3] * 10)
    assert unigram_entropy_bits(ids) == pytest.approx(2.0)
    assert unigram_entropy_bits(torch.zeros(5, dtype=torch.long)) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- splits
def test_fraction_split_is_contiguous_and_complete():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    c = CharCorpus.from_text(text, valid_fraction=0.1, test_fraction=0.2)
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (700, 100, 200)
    assert c.vocab.decode(torch.cat([c.train, c.valid, c.test])) == text


def test_bad_split_fractions():
    with pytest.raises(ValueError, match="leaves no training text"):
        CharCorpus.from_text("abcdef" * 10, valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="valid split has 0 character"):
        CharCorpus.from_text("abc", valid_fraction=0.01, test_fraction=0.0)


def test_separate_files_share_one_vocabulary(tmp_path):
    (tmp_path / "tr.txt").write_text("abcabc\n")
    (tmp_path / "va.txt").write_text("xyz\n")
    c = CharCorpus.from_files(tmp_path / "tr.txt", tmp_path / "va.txt")
    assert set(c.vocab.chars) == set("abcxyz\n") and c.test is None
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        CharCorpus.from_files(tmp_path / "tr.txt", tmp_path / "empty.txt")


# ---------------------------------------------------------------------------------------------- PTB
def test_ptb_convention():
    words = " the <unk> fell N %\n\n a b \n"
    assert ptb_words_to_chars(words) == "the_<unk>_fell_N_%\na_b\n"
    assert ptb_words_to_chars(words, unk="~") == "the_~_fell_N_%\na_b\n"
    with pytest.raises(ValueError, match="occurs inside a word"):
        ptb_words_to_chars("snake_case word\n")


@pytest.mark.data
def test_ptb_chars_from_the_real_files():
    if not PTB.is_dir():
        pytest.skip(f"Penn Treebank not found at {PTB} (set BNRHN_DATA)")
    c = CharCorpus.ptb_chars(PTB)
    assert len(c.vocab) == 50
    assert " " not in c.vocab and "_" in c.vocab and "\n" in c.vocab
    assert c.vocab.decode(c.train[:25]) == "aer_banknote_berlitz_call"
    # One '\n' per sentence: Mikolov's train file has 42,068 sentences.
    assert int((c.train == c.vocab.index["\n"]).sum()) == 42068
    assert c.summary()["train_chars"] == 5017482


# ---------------------------------------------------------------------------------------------- TBPTT
def test_windows_continue_each_stream():
    ids = torch.arange(25)
    b = TBPTTBatches(ids, batch_size=3, seq_len=4)
    assert len(b) == 2 and b.batch_size == 3
    w0, w1 = b.window(0), b.window(1)
    assert w0.inputs.shape == (4, 3)
    # Stream j is contiguous text; targets are the next characters; window 1 continues window 0.
    assert w0.inputs[:, 1].tolist() == [8, 9, 10, 11] and w1.inputs[:, 1].tolist() == [12, 13, 14, 15]
    assert torch.equal(w0.targets, w0.inputs + 1) and torch.equal(w1.targets, w1.inputs + 1)
    assert w0.lengths is None and w0.num_targets == 12


@pytest.mark.parametrize("n,batch,seq", [(25, 3, 4), (100, 7, 5), (10, 20, 3), (2, 4, 2), (1001, 16, 10)])
def test_full_mode_scores_every_pair_exactly_once(n, batch, seq):
    ids = torch.arange(n)
    b = TBPTTBatches(ids, batch, seq, full=True)
    seen = []
    for w in b:
        for j in range(w.inputs.shape[1]):
            L = w.inputs.shape[0] if w.lengths is None else int(w.lengths[j])
            seen += list(zip(w.inputs[:L, j].tolist(), w.targets[:L, j].tolist()))
    assert sorted(seen) == [(i, i + 1) for i in range(n - 1)]
    assert b.num_targets == n - 1


def test_sequence_length_below_two_is_an_error():
    with pytest.raises(ValueError, match=r"sequence length \(--seq-len\) must be an integer ≥ 2, got 1"):
        check_seq_len(1)
    with pytest.raises(ValueError, match="≥ 2"):
        TBPTTBatches(torch.arange(100), 4, 1)
    with pytest.raises(ValueError, match="too short"):
        TBPTTBatches(torch.arange(50), 8, 10)
    with pytest.raises(ValueError, match="nothing to predict"):
        TBPTTBatches(torch.arange(1), 1, 2, full=True)


def test_utf16_text_is_named_with_the_fix(tmp_path):
    from bnrhn.data.text import read_text

    p = tmp_path / "notes.txt"
    p.write_bytes("hello world\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"notes.txt: this is UTF-16 text .*iconv -f UTF-16 -t UTF-8"):
        read_text(p)


def test_valid_fraction_message_matches_what_is_accepted():
    from bnrhn.data.text import CharCorpus

    with pytest.raises(ValueError, match=r"valid_fraction must be in \(0, 1\)"):
        CharCorpus.from_text("abcdefghij" * 20, valid_fraction=0.0)
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\) \(0 = no test split\)"):
        CharCorpus.from_text("abcdefghij" * 20, test_fraction=1.5)
    assert CharCorpus.from_text("abcdefghij" * 20, valid_fraction=0.1, test_fraction=0.0) is not None
