"""Shared helpers of the metrics tests: the real caption data, Java, and candidate sets.

Data come from ``<repo root>/../shared/data`` or ``$BNRHN_DATA``; tests that need them skip with the
reason when they are absent, and so do tests that need Java.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("BNRHN_DATA", REPO.parent / "shared" / "data"))


def need_file(rel: str) -> Path:
    path = data_dir() / rel
    if not path.exists():
        pytest.skip(f"real data not found: {path} (set BNRHN_DATA or put the shared data at ../shared/data)")
    return path


def need_java() -> str:
    """Java and the two jars that pycocoevalcap ships (CoreNLP's tokenizer, METEOR 1.5), or skip."""
    java = shutil.which("java")
    if java is None:
        pytest.skip("Java is not on PATH: the reference tokenizer/METEOR jars of pycocoevalcap cannot run")
    from bnrhn.metrics.meteor import find_meteor_jar
    from bnrhn.metrics.tokenizer import find_corenlp_jar

    if find_corenlp_jar() is None or find_meteor_jar() is None:
        pytest.skip("pycocoevalcap's jars (stanford-corenlp-3.4.1.jar, meteor-1.5.jar) were not found")
    return java


def need_pycocoevalcap():
    return pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (the reference scorer) is not installed")


@functools.lru_cache(maxsize=None)
def flickr8k(split: str = "test") -> "OrderedDict[str, list[str]]":
    """image file name -> its 5 raw captions, for the images of an official Flickr8k split, in file order."""
    tokens = need_file("flickr8k/Flickr8k.token.txt")
    names = need_file(f"flickr8k/Flickr_8k.{split}Images.txt").read_text().split()
    caps: dict[str, list[str]] = {}
    with open(tokens, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                key, cap = line.split("\t", 1)
                caps.setdefault(key.split("#", 1)[0], []).append(cap)
    return OrderedDict((n, caps[n]) for n in names if n in caps)


@functools.lru_cache(maxsize=None)
def flickr8k_all() -> list[str]:
    """All 40,460 Flickr8k captions, in the order of ``Flickr8k.token.txt`` (image by image)."""
    with open(need_file("flickr8k/Flickr8k.token.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f if "\t" in line]


@functools.lru_cache(maxsize=None)
def coco_val() -> "OrderedDict[int, list[str]]":
    """COCO val2017 image id -> its raw captions, images in increasing id order."""
    with open(need_file("coco/captions_val2017.json"), encoding="utf-8") as f:
        data = json.load(f)
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    return OrderedDict(sorted(caps.items()))


def subset(d, n: int):
    return OrderedDict(list(d.items())[:n])


def _punct_caps(caption: str, rng: random.Random) -> str:
    """The caption with random capitals and punctuation that tokenisation must remove or split."""
    words = caption.split()
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            w = w.upper()
        elif r < 0.3:
            w = w.capitalize()
        r = rng.random()
        if r < 0.1:
            w = w + ","
        elif r < 0.15:
            w = '"' + w + '"'
        elif r < 0.2:
            w = "(" + w + ")"
        elif r < 0.23:
            w = w + "!"
        elif r < 0.26:
            w = w + "'s"
        out.append(w)
    return " ".join(out) + rng.choice([".", "...", "!", " .", "?", ""])


def candidate_sets(refs_by_image, seed: int = 0):
    """Candidate sets used for parity: name -> (candidates {id: raw caption}, references {id: [raw]}).

    Candidates come from the images' own human captions: the held-out first caption (references are the
    others), another image's caption (shuffled), truncated and word-dropped held-out captions, a set with
    every third candidate empty, and candidates with capitals and punctuation.
    """
    rng = random.Random(seed)
    ids = list(refs_by_image)
    held = {i: refs_by_image[i][0] for i in ids}
    refs = {i: list(refs_by_image[i][1:]) for i in ids}
    shift = max(1, len(ids) // 3)
    sets = {
        "held_out": held,
        "shuffled": {i: held[ids[(k + shift) % len(ids)]] for k, i in enumerate(ids)},
        "truncated": {i: " ".join(held[i].split()[: max(1, len(held[i].split()) // 2)]) for i in ids},
        "word_dropped": {i: " ".join(w for w in held[i].split() if rng.random() > 0.3) for i in ids},
        "empty": {i: ("" if k % 3 == 0 else held[i]) for k, i in enumerate(ids)},
        "punct_caps": {i: _punct_caps(held[i], rng) for i in ids},
    }
    return {name: (cands, refs) for name, cands in sets.items()}


# Strings that exercise the tokenizer's rules: the Python tokenizer must give the jar's tokens on each
# (tests/test_metrics_tokenizer.py checks them against CoreNLP 3.4.1, alone and as one text).
TRICKY = [
    "A man's dog doesn't (really) like [brackets] or {braces}.",
    "\"Quoted\" words and 'single quotes' here!",
    "and/or 3.5 1,000 $5 50% 10:30 a.m. U.S. Mr. Smith St. Louis vs. Dr.",
    "A black-and-white photo... of a dog -- running",
    "Ellipsis\u2026 \u201ccurly\u201d \u2018quotes\u2019 \u2013 en dash \u2014 em dash",
    "cannot gonna wanna gotta 'tis o'clock '90s rock'n'roll",
    "Caf\u00e9 na\u00efve fa\u00e7ade \u65e5\u672c emoji \U0001F600 here \u00f1",
    "x & y <tag> a*b #hash @at ~tilde ^caret = + |pipe| \\back",
    "He said: \"hi\"; she said? no! yes.",
    "I'm you're we'll they've he'd can't won't ain't",
    "e-mail x-ray t-shirt mid-air 5-year-old 1-2 -5 +5 well-known. a 5-3 win",
    "wow!! what?! really?? hi!? no!!!",
    "the letter a. two dogs",
    "the letter x.",
    "A dog",
    "the letter b. The next",
    "Mass. Wash. wash. Miss. miss. Inc. inc. etc. vs. Jr. Dr. dr. Mr. mr.",
    "google.com www.example.org/path http://foo.bar/baz?x=1 foo@bar.com picture.jpg",
    "5 1/2 3/4 \u00bd (555) 123-4567 555-1234 12/25/2014 90\u00b0",
    "\u00a35 \u20ac5 \u00a2 \u00a5 $5 US$5 # ## @ @@ _ __ * ** ^ ~ | \\ = ==",
    ".... . . . .. a..b a...b end....",
    "a 'quote' here 'a b' 'em 'cause '90s 90's o'neil d'avignon l'amour y'all c'mon",
    "don'ts it's. its' dogs' the dogs' bone james' car",
    "- -- --- ---- ----- a - b a-b a--b a---b",
    "i.e. e.g. a.m. p.m. u.k. U.K. ph.d. Ph.D.",
    "o\u2019clock don\u2019t it\u2019s she\u2019ll \u00aba\u00bb \u2039b\u203a",
    "c++ c# :) :-( ;) AT&T at&t Q&A R&B f*ck",
    "dog., dog.; u.s., e.g., etc., x,y 5,000-year 3.5-inch",
    "&amp; &lt; &gt; &quot; &mdash; soft\u00adhyphen 4\u00ad x\u00a0nbsp \u2009thin",
    "a dog\ron two lines",
    "",
    "   ",
    ".",
    "!!!",
    "A DOG IS RUNNING.",
    "\u0130stanbul \u03a3\u0391\u03a3 stra\u00dfe",
    "dos and don'ts, Hawai'i ma'am ne'er O'Neil c'mon j'ai y'all",
    "a <unk> dog <UNK> . </s> the letter b. <unk> x",
    "room no. 5, fig. 3 and no. seven; art. 2 pp. 5-9",
    "2 1/2 feet, 12 3/4 inches, 10:30 a.m. 3.5mm 5:30pm 1990s '90s",
    "US$5 HK$ 10 A$ call (555) 123-4567 or 555-1234",
    "&amp; &lt;b&gt; &quot;quoted&quot; AT&amp;T &#39;",
    "they'll we're you've I'd he'S she'LL",
    ":) ;-) :D =( c++ C# f#",
    "Ph.D. M.D. a.m. p.m. D.C. T.V. R.V. the letter k. The dog",
    "Mass. Wash. Miss. mass. wash. miss. Inc. MFG. Mfg. Pte. PTE.",
    "\u0093quoted\u0094 don\u0092t \u0096 dash\u0085 \u0080 5",
    "they'll",
]
