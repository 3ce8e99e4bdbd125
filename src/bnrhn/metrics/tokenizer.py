"""coco-caption's caption tokenisation, in pure Python.

coco-caption (``pycocoevalcap.tokenizer.PTBTokenizer``) writes all captions of one side (all references,
or all candidates), one per line, to a file, runs the ``PTBTokenizer`` of the Stanford CoreNLP 3.4.1 jar
it ships with ``-preserveLines -lowerCase``, splits each output line on single spaces and drops the
tokens in its punctuation list. This module does the same in Python:

- :class:`PTBTokenizer` is a regular-expression scanner written for this project from two sources:

  1. the published Penn Treebank tokenisation conventions: punctuation is split from words, clitics
     and contractions are split ("don't" → "do n't", "man's" → "man 's", "they're" → "they 're",
     "I'd" → "I 'd", "cannot" → "can not", "gonna" → "gon na"), double quotes become `` and '',
     brackets become -LRB- / -RRB- (-LSB- -RSB- -LCB- -RCB- for [ ] { }), a sentence-final period is a
     token, numbers ("3.5", "1,000", "10:30", "1/2") and hyphenated words stay whole;
  2. black-box observation of the reference jar (:class:`JavaPTBTokenizer`) on inputs generated for
     the purpose, for what the conventions leave open (which Unicode quotes and dashes are normalised
     to what, "2 1/2" as one token, when an apostrophe opens a quote, ...). CoreNLP's source and
     grammar were not used. Which words keep their period ("mr.", "inc.", "u.s.", "no." before a
     number, single letters such as "b." unless a sentence follows) was measured by running the jar
     on every word followed by a period in the Flickr8k and COCO captions and on a list of English
     abbreviations written for this, in lower case, capitalised and in capitals, in several contexts
     (mid-sentence, before a number, before a comma, at the end of a line followed by a sentence,
     at the end of the text); ``benchmarks/ptb_probe.py`` repeats that measurement and checks this
     tokenizer against the jar on all of it.

  The result gives the jar's tokens on every caption of Flickr8k and COCO val2017
  (``tests/test_metrics_tokenizer.py`` checks them all). On arbitrary text (URLs, e-mail addresses,
  smileys, markup, unusual Unicode) it does what the conventions above suggest and can differ from the
  jar; ``docs/metrics.md`` lists the known differences and the measured agreement on random strings.
  ``tokenizer="ptb-java"`` runs the jar itself where byte-exact reference tokens are needed.
- :func:`tokenize_captions` applies coco-caption's post-processing: lower-case, drop the tokens
  ``'' ' `` ` . ? ! , : - -- ... ;`` (coco-caption's list also names -LRB- -RRB- -LCB- -RCB-, but it
  compares them with the *lower-cased* tokens, so bracket tokens "-lrb-" etc. are kept, as there).
- Context: the Java tokenizer reads all captions as one text, so whether a single letter keeps its
  period can depend on the next caption ("letter b." before "The dog ..." gives "b" + ".", before
  "two dogs" it gives "b."). :func:`tokenize_captions` reproduces this when given the captions in
  coco-caption's order (all references image by image, then all candidates separately), which is what
  :func:`bnrhn.metrics.score` does.

Line separators other than ``\\n`` (``\\r``, U+2028, ...) are treated as spaces here; coco-caption
replaces only ``\\n`` and its Java tokenizer then splits the caption into two lines, shifting every later
caption onto the wrong image. :class:`JavaPTBTokenizer` runs the reference jar itself
(``tokenizer="ptb-java"`` in :func:`bnrhn.metrics.score`), with that bug fixed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence

__all__ = ["PTBTokenizer", "JavaPTBTokenizer", "tokenize_captions", "PUNCTUATION", "find_corenlp_jar"]

# Tokens coco-caption removes after lower-casing (its list also holds -LRB- -RRB- -LCB- -RCB- in upper
# case, which never match a lower-cased token, so those are not removed).
PUNCTUATION = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Characters that end a line for the Java tokenizer; coco-caption only replaces "\n". Here all are spaces.
_LINE_BREAKS = re.compile("\r\n|[\r\n\u2028\u2029\u000b\u000c]")

# ---------------------------------------------------------------------------------------------------
# Words that keep their final period. Measured on the reference jar (benchmarks/ptb_probe.py): each
# candidate was run in lower case, capitalised and in capitals, in several contexts.

# Always "mr." (titles, address words, ...).
_TITLES = frozenset(
    "adm assoc asst atty ave brig capt cf cie cmdr col comdr cpl dept det dr drs ens ft gen gov govs hon insp "
    "lt maj messrs mfg mlle mme mr mrs ms msgr mt natl pres prof profs pvt rep reps rev sen sens sgt spc st "
    "ste supt treas vs".split())
# "inc." too, but at the end of a sentence the jar adds a sentence-final "." token after it ("inc. .").
_ABBREVIATIONS = frozenset(
    "al ala apr ariz assn aug bldg blvd bros calif co colo conn corp ct dak dec esq est etc feb fla fri ga "
    "inc ind intl jan jr jul jun kan kans ky ltd mar md mich minn mo mon mont neb nev nov oct okla penn "
    "ph.d plc pte rd sep sept seq sq sr tenn thu thurs tue tues univ va vt wed wis wisc wyo".split())
# These are abbreviations only when capitalised ("Mass." but "mass .": they are also English words).
_CAPITALISED_ABBREVIATIONS = frozenset("ark del ill la mass miss ore pa tex wash".split())
# These are not abbreviations in capitals ("MFG." is "MFG" + ".").
_NOT_IN_CAPITALS = frozenset(["mfg", "pte"])
# "no." only before a number ("no. 5" but "no ."), with at most one whitespace character between.
_BEFORE_NUMBER = frozenset("art ca fig figs no nos op pp".split())
# After a single letter ("b."), the period is split off when the next word is one of these sentence
# openers, capitalised or in capitals (or a markup tag such as <unk>), followed by whitespace
# ("b. The dog" → "b" "." ...).
_SENTENCE_OPENERS = ("a about after an as at but he her here if in it last many more now once one other our "
                     "she since so some such that the their then there these they this we what when while yet "
                     "you").split()
_OPENER_FORMS = sorted({w.capitalize() for w in _SENTENCE_OPENERS} | {w.upper() for w in _SENTENCE_OPENERS},
                       key=len, reverse=True) + [r"M[Rr]\.", r"M[Ss]\.", r"</?[A-Za-z][^\s<>]*>"]  # Mr. MS. <unk>
_OPENER_FOLLOWS = re.compile(r"\s+(?:" + "|".join(_OPENER_FORMS) + r")\s")
_NUMBER_FOLLOWS = re.compile(r"\s?\d")

# Words split in two (PTB convention), matched case-insensitively as whole words.
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}
_SPLIT_WORD_RE = re.compile(r"(?i)\b(?:" + "|".join(_SPLIT_WORDS) + r")\b")


def _has_split_word(text: str) -> bool:
    low = text.lower()  # each of the split words has a double letter: a cheap test first
    return ("nn" in low or "tt" in low or "mm" in low) and _SPLIT_WORD_RE.search(text) is not None


# Character normalisations the jar applies (observed): quotes, dashes, ellipsis, currency, fractions.
_CHAR_TOKENS = {
    "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u2019": "'", "\u203a": "'",
    # C1 controls at the positions of Windows-1252's euro sign, quotes, dashes and ellipsis (text decoded
    # with the wrong code page) are read as those characters
    "\u0080": "$", "\u0085": "...", "\u0091": "`", "\u0092": "'", "\u0093": "``", "\u0094": "''",
    "\u0096": "--", "\u0097": "--",
    "\u201c": "``", "\u00ab": "``", "\u201d": "''", "\u00bb": "''",
    "\u2013": "--", "\u2014": "--", "\u2015": "--", "\u2026": "...",
    "\u2010": "-", "\u2011": "-", "\u2012": "-",  # Unicode hyphens (the jar deletes them between spaces)
    "\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u20ac": "$",
    "(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


# Named character references the jar reads as the character (observed; it leaves "&copy;" alone and
# numeric ones such as "&#39;" whole). Each is a token of its own, except "&amp;" in "AT&amp;T".
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'", "nbsp": " ", "ndash": "\u2013",
             "mdash": "\u2014"}
_AMP_IN_WORD = re.compile(r"(?<=[A-Z])&(?i:amp);(?=[A-Z])")


# Apostrophes: ASCII, right single quotation mark, and its Windows-1252 position read as a C1 control.
_APOS = "'\u2019\u0092"
_APOSTROPHES = frozenset(_APOS)
# Control and format characters that are not dropped: soft hyphen (see PTBTokenizer.tokens) and the
# Windows-1252 positions of _CHAR_TOKENS.
_KEEP_CONTROLS = frozenset("\u00ad\u0080\u0085\u0091\u0092\u0093\u0094\u0096\u0097")


class _Patterns:
    """The compiled patterns (built once, on first use; the Unicode classes take ~0.05 s)."""

    def __init__(self) -> None:
        letter, digit, skip = [], [], []
        for cp in range(0x10000):  # one pass over the Basic Multilingual Plane
            cat = unicodedata.category(chr(cp))
            if cat[0] in "LM":      # letters and combining marks make words
                letter.append(cp)
            elif cat == "Nd":
                digit.append(cp)
            elif cat in ("Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn", "Cs") and chr(cp) not in _KEEP_CONTROLS:
                skip.append(cp)     # whitespace and invisible or unassigned characters: dropped
        let, dig = _class_body(letter), _class_body(digit)
        # everything above U+FFFF (emoji, ...) is dropped too, as by the jar, which reads UTF-16 code units
        skip_body = _class_body(skip) + r"\U00010000-\U0010ffff"
        aln = f"[{let}{dig}]"
        join = (rf"(?:[-\u2010\u2011/_@](?={aln})"         # a-b, and/or, a_b, foo@bar
                rf"|(?<=[{let}])\.(?=[{let}])"              # google.com, u.s
                rf"|(?<=[A-Z])&(?=[A-Z]))")                 # AT&T
        # a part of a word is a number with separators (3.5, 1,000, 10:30: letters right after it start a
        # new word, "3.5mm" → "3.5" "mm") or a run of letters and digits ("5pm", "x2", "café")
        part = rf"(?:[{dig}]+(?:[.,:][{dig}]+)+|{aln}+)"
        word = rf"(?:[-+.,:](?=[{dig}]))?{part}(?:{join}{part})*"
        no_aln = rf"(?!{aln})"
        patterns = [
            ("skip", rf"[{skip_body}]+"),
            ("url", r"(?:https?|ftp)://[^\s\"<>()\[\]{}]*[^\s\"<>()\[\]{}.,;:!?']"),
            ("tag", r"</?[A-Za-z][^\s<>]*>"),                           # <unk>, </s>, <br/>
            ("smiley", r"[:;=]['\-]?[()\[\]DPp]" + no_aln),              # :) ;-) :D
            ("code", rf"(?<!{aln})(?:[Cc]\+\+|[CcFf]#){no_aln}"),       # c++ c#
            ("mixed", rf"[{dig}]{{1,4}}[ \u00a0][{dig}]+/[{dig}]+"),     # 2 1/2 is one token (as the jar)
            ("phone_number", r"\([0-9]{3}\)[ \u00a0]?[0-9]{3}-[0-9]{4}"),  # (555) 123-4567 too
            ("lead", rf"[{_APOS}](?:[Tt](?=(?:is|IS|was|WAS)" + no_aln + ")"  # 'tis → 't is
                     r"|(?:em|EM|Em|cause|Cause|CAUSE|til|Til|TIL|[1-9]0[sS])" + no_aln +
                     rf"|[nN][{_APOS}]"                                       # rock 'n' roll
                     r"|(?:[sSdDmM]|ll|LL|Ll|re|RE|Re|ve|VE|Ve)" + no_aln + ")"),  # 's on its own
            ("entity", "&(?:(?i:" + "|".join(_ENTITIES) + ")|#[0-9]+);"),  # &amp; &quot; &#39;
            ("hashtag", rf"[#@][{let}]{aln}*"),
            ("currency", rf"(?<!{aln})[A-Z]+\$"),                          # US$ HK$
            ("word", word),
            ("dots", r"\.\.\.+|\.(?: \.){2,}"),
            ("dashes", r"-{5,}|--+"),
            ("bangs", r"[!?]+"),
            ("runs", r"\*+|#+|@+|_+|<+|>+|``|''"),
            ("other", r"(?s:.)"),
        ]
        self.scan = re.compile("|".join(f"(?P<{name}>{pat})" for name, pat in patterns)).match
        self.alnum = re.compile(aln).match
        self.letters2 = re.compile(f"[{let}]{{2}}").match
        self.nt = re.compile(rf"[{_APOS}][tT][{let}]*").match
        # 'll 're 've need a character after them: at the very end of the text the jar reads "` ll"
        self.clitic = re.compile(rf"[{_APOS}](?:[sSdDmM]{no_aln}|(?:ll|LL|Ll|re|RE|Re|ve|VE|Ve){no_aln}(?=.))",
                                 re.DOTALL).match
        self.n_clitic = re.compile(rf"[{_APOS}][nN](?![{let}{dig}{_APOS}])").match
        self.acronym = re.compile(rf"[{let}](?:\.[{let}])+").fullmatch
        self.soft_hyphen = re.compile(rf"(?<={aln})\u00ad+|\u00ad+(?={aln})")


def _class_body(cps: list[int]) -> str:
    """A regex character-class body for a sorted list of code points, as ranges."""
    parts, start, prev = [], -2, -2
    for cp in cps + [-2]:
        if cp == prev + 1:
            prev = cp
            continue
        if start >= 0:
            parts.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
        start = prev = cp
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _patterns() -> _Patterns:
    return _Patterns()


_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VOWELS = frozenset("aeiouAEIOU")
# Captions made of ASCII words, commas and spaces, with at most a final period, need no scanner.
_FAST = re.compile(r"[A-Za-z ,]*[A-Za-z] *\.? *")
_PLAIN_RUN = re.compile(r" *(?:[A-Za-z]+(?:,? +|(?=,)|\Z))+").match
_SPACES = re.compile(r"\s+")
_NUMBER_SEP = re.compile(r"\d[.,:]\d").search


def _keeps_period(word: str) -> int:
    """0: not an abbreviation; 1: keeps the period; 2: keeps it, and a sentence-final "." token follows
    at the end of a sentence (see :func:`_ends_sentence`)."""
    low = word.lower()
    if low in _TITLES:
        return 0 if (low in _NOT_IN_CAPITALS and word.isupper()) else 1
    if low in _ABBREVIATIONS:
        return 0 if (low in _NOT_IN_CAPITALS and word.isupper()) else 2
    if low in _CAPITALISED_ABBREVIATIONS and word[0].isupper():
        return 2
    return 0


def _ends_sentence(buf: str, i: int) -> bool:
    """Whether an abbreviation's period (at ``buf[i - 1]``) also ends the sentence, as the jar decides it
    (observed): the text ends, or two whitespace characters follow, or whitespace and a capital letter."""
    m = _SPACES.match(buf, i)
    if m is None:
        return i >= len(buf)
    j = m.end()
    return j >= len(buf) or j - i >= 2 or buf[j].isupper()


class PTBTokenizer:
    """Penn Treebank tokenizer giving coco-caption's tokens (those of the CoreNLP 3.4.1 jar) on captions.

    >>> PTBTokenizer().tokens("A man's dog doesn't (really) like it.")
    ['A', 'man', "'s", 'dog', 'does', "n't", '-LRB-', 'really', '-RRB-', 'like', 'it', '.']
    """

    def __init__(self) -> None:
        self._p = _patterns()

    def tokens(self, text: str, following: str = "") -> list[str]:
        """The raw PTB tokens of ``text`` (original case). ``following`` is the text after it (the next
        captions), which decides a few sentence-final periods but is never tokenized; ``""`` means
        that ``text`` ends the input."""
        if not text.isprintable():  # (a cheap test first: line breaks are not printable)
            text = _LINE_BREAKS.sub(" ", text)
        if _FAST.fullmatch(text) and not _has_split_word(text):
            # plain words: split on spaces, commas are tokens, a final period is one unless the last
            # word is a single letter or an abbreviation, which the general path decides
            words = text.replace(",", " , ").split()
            last = words[-1]
            if not last.endswith(".") or last == ".":
                return words
            last = last[:-1]
            if len(last) > 1 and not _keeps_period(last) and last.lower() not in _BEFORE_NUMBER:
                words[-1] = last
                words.append(".")
                return words
        p = self._p
        if "&" in text:
            text = _AMP_IN_WORD.sub("&", text)
        if "\u00ad" in text:  # soft hyphen: invisible inside a word, a hyphen on its own
            text = p.soft_hyphen.sub("", text).replace("\u00ad", "-")
        buf = text + "\n" + _LINE_BREAKS.sub(" ", following) if following else text
        out: list[str] = []
        scan = p.scan
        end = len(text)
        pos = 0
        plain = _PLAIN_RUN
        while pos < end:
            m = plain(text, pos)  # ASCII words before spaces, ", " or the end: nothing to decide there
            if m is not None:
                run = m.group()
                if not _has_split_word(run):
                    out.extend(run.replace(",", " , ").split())
                    pos = m.end()
                    continue
            m = scan(text, pos)
            kind = m.lastgroup
            tok = m.group()
            pos = m.end()
            if kind == "word":
                pos = self._word(tok, text, buf, pos, out)
            elif kind == "skip":
                continue
            elif kind == "other":
                out.append(self._char(tok, text, pos))
            elif kind == "lead":
                if pos == end and not following and len(tok) == 3 and tok[1] in "lrvLRV":
                    out.append("`")  # 'll 're 've at the very end of the input: the jar reads "` ll"
                    out.append(tok[1:])
                else:
                    out.append("'" + tok[1:])
            elif kind == "dots":
                out.append("...")
            elif kind == "dashes":
                out.append("--" if len(tok) < 5 else tok)
            elif kind == "smiley":
                if pos == end and not following:  # the jar needs a character after a smiley
                    pos -= len(tok) - 1
                    out.append(self._char(tok[0], text, pos))
                else:
                    out.append(tok[:-1] + _CHAR_TOKENS.get(tok[-1], tok[-1]) if tok[-1] in "()" else tok)
            elif kind == "entity":
                ch = _ENTITIES.get(tok[1:-1].lower(), tok)  # numeric references stay as they are
                if ch != " ":
                    out.append(self._char(ch, text, pos) if len(ch) == 1 else ch)
            elif kind == "mixed":
                out.append(tok.replace(" ", "\u00a0"))
            elif kind == "phone_number":
                out.append("-LRB-" + tok[1:4] + "-RRB-" + tok[5:].replace(" ", "\u00a0"))
            else:
                out.append(tok)
        return out

    def _char(self, ch: str, text: str, pos: int) -> str:
        """The token of one character that starts no longer token (``pos`` is the position after it)."""
        if ch == '"':  # opening before a word or an opening bracket, closing otherwise
            nxt = text[pos: pos + 1]
            return "``" if nxt and (self._p.alnum(nxt) or nxt in "([{`'$#") else "''"
        if ch == "'":  # opening quote before a word of two letters or more, or before a quoted letter
            if self._p.letters2(text, pos) or (self._p.alnum(text[pos: pos + 1] or " ")
                                               and text[pos + 1: pos + 2] in _APOSTROPHES):
                return "`"
            return "'"
        tok = _CHAR_TOKENS.get(ch)
        if tok is not None:
            return tok
        return _FRACTIONS.get(ch, ch)

    def _word(self, w: str, text: str, buf: str, pos: int, out: list[str]) -> int:
        """Append the tokens of word ``w`` (which ended at ``pos``) and return the position after them:
        split words and clitics, elisions ("o'clock"), and whether a following period is kept."""
        nxt = text[pos: pos + 1]
        low = w.lower()
        if low in _SPLIT_WORDS and nxt not in _APOSTROPHES:
            k = _SPLIT_WORDS[low]
            out.append(w[:k])
            out.append(w[k:])
            return pos
        if nxt in _APOSTROPHES:
            return self._apostrophe(w, low, text, buf, pos, out)
        if w.count("/") > 2:  # at most three slash-separated parts make one token (1/2/3, and/or/but)
            cut = [i for i, ch in enumerate(w) if ch == "/"][2]
            out.append(w[:cut])
            return pos - (len(w) - cut)
        if nxt != ".":
            out.append(w)
            return pos
        # a period right after the word: kept on the word ("mr.") or a token of its own
        after = pos + 1
        final = 0
        if len(w) == 1 and w in _ASCII_LETTERS:
            keep = not _OPENER_FOLLOWS.match(buf, after)
        elif "." in w and self._p.acronym(w):
            keep, final = True, 3
        else:
            final = _keeps_period(w)
            if final:
                keep = True
            elif low in _BEFORE_NUMBER:
                keep = _NUMBER_FOLLOWS.match(buf, after) is not None or text[after: after + 1] in (",", ";", ":")
            else:  # other words keep it before , ; : ("dog.," → "dog." ","), except after "/" or "3.5"
                keep = text[after: after + 1] in (",", ";", ":") and "/" not in w and not _NUMBER_SEP(w)
        if not keep:
            out.append(w)
            return pos
        out.append(w + ".")
        # an abbreviation that ends a sentence is followed by a sentence-final period (PTB convention)
        if (final == 2 and _ends_sentence(buf, after)) or (final == 3 and _OPENER_FOLLOWS.match(buf, after)):
            out.append(".")
        return after

    def _apostrophe(self, w: str, low: str, text: str, buf: str, pos: int, out: list[str]) -> int:
        """Word ``w`` followed by an apostrophe at ``pos``: contractions, clitics, elisions."""
        p = self._p
        m = p.nt(text, pos)
        if m is not None and low[-1] == "n" and low[-2:-1] != "n":  # do|n't, ca|n't, do|n'ts (not "inn't")
            if len(w) > 1:
                out.append(w[:-1])
            out.append("n'" + m.group()[1:])
            return m.end()
        m = p.clitic(buf, pos)                          # man|'s, they|'re, I|'d
        if m is not None and m.end() <= len(text):
            out.append(w)
            out.append("'" + m.group()[1:])
            return m.end()
        nxt = text[pos]
        if ((low in ("d", "l", "n", "o") and p.letters2(text, pos + 1))
                or (low == "c" and text[pos + 1: pos + 4] == "mon")
                or (len(w) > 1 and low[-1] in "aeiouy" and text[pos + 1: pos + 2] in _VOWELS)):
            # one word: elisions and names (d'oeuvres, l'amour, O'Neil, o'clock, c'mon) and a vowel, an
            # apostrophe and a vowel (Hawai'i, ma'am, ne'er)
            m = p.scan(text, pos + 1)
            if m.lastgroup == "word":
                return self._word(w + nxt + m.group(), text, buf, m.end(), out)
        if low in ("d", "l", "j", "y"):                 # y'|all, j'|ai
            out.append(w + nxt)
            return pos + 1
        out.append(w)
        if text[pos + 1: pos + 2] in ("n", "N") and text[pos + 2: pos + 3] in _APOSTROPHES:
            out.append("'n'")                           # rock|'n'|roll
            return pos + 3
        if p.n_clitic(text, pos):                       # more|'n
            out.append("'n")
            return pos + 2
        return pos


def _following(captions: Sequence[str], k: int, lookahead: int = 6, limit: int = 100) -> str:
    """The text after caption k as the Java tokenizer reads it, as far as :class:`PTBTokenizer` looks
    ahead: the next two non-blank captions (the look-ahead may skip blank lines and span a whole short
    caption, as in "b." followed by the caption "Mr." and the line break after it), cut to ``limit``
    characters (the longest look-ahead is whitespace, a sentence-starting word and a line break)."""
    parts, seen = [], 0
    for j in range(k + 1, min(len(captions), k + 1 + lookahead)):
        parts.append(captions[j])
        if captions[j].strip():
            seen += 1
            if seen == 2:
                break
    return "\n".join(parts)[:limit]


def _postprocess(tokens: Iterable[str]) -> str:
    """coco-caption's post-processing of a tokenizer output line: lower-case (done by the jar), strip
    trailing whitespace (Python's ``rstrip``, so a token can lose a trailing Unicode space), split on
    single spaces, drop the punctuation tokens, join with single spaces."""
    line = " ".join(tokens).lower().rstrip()
    return " ".join(t for t in line.split(" ") if t not in PUNCTUATION)


def tokenize_captions(captions: Sequence[str], tokenizer: "PTBTokenizer | JavaPTBTokenizer | None" = None
                      ) -> list[str]:
    """Tokenize captions as coco-caption does: PTB tokens, lower-cased, punctuation tokens removed,
    joined with single spaces. ``captions`` are read as one text in this order (see the module
    docstring for why the order can matter); an empty or all-punctuation caption gives ``""``."""
    for k, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"caption #{k} is not a string: {c!r}")
    if isinstance(tokenizer, JavaPTBTokenizer):
        return tokenizer.tokenize(captions)
    if tokenizer is None:
        # memoised: scoring every epoch against the same references tokenizes them once; captions far longer
        # than any real caption are not kept (a cache of 10 KB strings would hold gigabytes)
        return [_tokenize_cached(c, _following(captions, k)) if len(c) <= _CACHED_CHARS
                else _postprocess(_default_tokenizer().tokens(c, _following(captions, k)))
                for k, c in enumerate(captions)]
    return [_postprocess(tokenizer.tokens(c, _following(captions, k))) for k, c in enumerate(captions)]


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> "PTBTokenizer":
    return PTBTokenizer()


_CACHED_CHARS = 1000


@functools.lru_cache(maxsize=1 << 17)
def _tokenize_cached(text: str, following: str) -> str:
    return _postprocess(_default_tokenizer().tokens(text, following))


def find_corenlp_jar() -> str | None:
    """Path of ``stanford-corenlp-3.4.1.jar``: ``$BNRHN_CORENLP_JAR``, else the one installed with
    pycocoevalcap, else None."""
    env = os.environ.get("BNRHN_CORENLP_JAR")
    if env:
        return env if os.path.isfile(env) else None
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "tokenizer", "stanford-corenlp-3.4.1.jar")
        if os.path.isfile(path):
            return path
    return None


class JavaPTBTokenizer:
    """coco-caption's tokenisation by the reference Java tokenizer itself (``tokenizer="ptb-java"``).

    Differences with pycocoevalcap's wrapper, all robustness fixes that leave the tokens unchanged:
    the temporary file goes to the system temporary directory (pycocoevalcap writes into its own
    installation directory, which fails on read-only installs), every line separator inside a caption
    becomes a space (pycocoevalcap replaces only ``\\n``, so a ``\\r`` shifts all later captions onto
    the wrong images), input and output are UTF-8 whatever the locale, and the number of output lines
    is checked.
    """

    def __init__(self, jar: str | None = None, java: str = "java") -> None:
        self.jar = jar or find_corenlp_jar()
        self.java = shutil.which(java)
        if self.java is None:
            raise FileNotFoundError(f"tokenizer 'ptb-java' needs Java: {java!r} was not found on PATH "
                                    "(tokenizer 'ptb' gives the same tokens without Java)")
        if not self.jar or not os.path.isfile(self.jar):
            raise FileNotFoundError("tokenizer 'ptb-java' needs stanford-corenlp-3.4.1.jar (installed with "
                                    "pycocoevalcap, or set BNRHN_CORENLP_JAR)")

    def tokenize(self, captions: Sequence[str]) -> list[str]:
        lines = [_LINE_BREAKS.sub(" ", c) for c in captions]
        if not lines:
            return []
        with tempfile.TemporaryDirectory(prefix="bnrhn-ptb-") as tmp:
            path = os.path.join(tmp, "captions.txt")
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write("\n".join(lines))
            cmd = [self.java, "-Dfile.encoding=UTF-8", "-cp", self.jar, "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase", "-encoding", "utf-8", path]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"Java PTBTokenizer failed (exit {proc.returncode}): "
                               f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}")
        out = proc.stdout.decode("utf-8").split("\n")
        if len(out) < len(lines):
            raise RuntimeError(f"Java PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
        return [_postprocess(line.rstrip().split(" ")) if line.strip() else "" for line in out[:len(lines)]]
