"""Probe the reference Java tokenizer for the words that keep their period, and check ours against it.

This is how the period rules of ``bnrhn.metrics.tokenizer`` were measured (black-box: only the jar's
output is used). Candidates are every word followed by a period in the Flickr8k and COCO val2017
captions, plus a list of English abbreviations written for this probe (``GENERIC``), each in lower case,
capitalised and in capitals, and the 26 letters. Each candidate W is run through the jar (``tokenizer="ptb-java"``, i.e.
coco-caption's ``PTBTokenizer -preserveLines -lowerCase`` plus punctuation removal) in these contexts,
one caption per line, as coco-caption feeds it:

    mid     "a W. b"           the period kept mid-sentence?        (abbreviations: "mr.", "inc.", "u.s.")
    digit   "a W. 5 b"         kept before a number only?           ("no. 5" but "no .")
    comma   "a W., b"          kept before a comma?                 (every word: "dog.," → "dog." ",")
    sentence "a W." + "The dog" split again before a new sentence?  (single letters: "b." / "b" ".")

and sentence openers S (caption words and function words, capitalised or in capitals, and the
candidates with their period) in "a b. S x".
The script prints the classes found and then runs ``bnrhn``'s tokenizer on exactly the same lines:
it exits with status 1 if any line is tokenized differently. Needs Java and pycocoevalcap's jar.

    python benchmarks/ptb_probe.py [--data DIR] [--show N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bnrhn.metrics.tokenizer import JavaPTBTokenizer, tokenize_captions  # noqa: E402

# English abbreviations (titles, ranks, months, days, US states, addresses, business, Latin, units,
# references, degrees), written for this probe.
GENERIC = """mr mrs ms mx dr drs st sts jr sr snr jnr prof profs esq hon rev fr msgr sra srta mme mlle messrs gen col lt
capt maj sgt cpl pvt adm cmdr comdr cdr brig ens spc supt insp det atty gov govs sen sens rep reps pres amb asst assoc
dir mgr treas secy jan feb mar apr may jun jul aug sep sept oct nov dec mon tue tues wed weds thu thur thurs fri sat sun
ala ariz ark calif cal colo conn del dak fla ga ida ill ind kan kans ky la md mass mich minn miss mo mont neb nebr nev
okla ore oreg pa penn tenn tex ut vt va wash wis wisc wyo ave blvd rd ln ct pl hwy pkwy sq ter cir bldg fl flr apt ste
rm mt mtn ft pt pte bd dist twp co inc corp ltd llc plc bros assn dept univ inst intl natl govt mfg div est etc vs viz
cf ca al approx esp seq ibid ff no nos vol vols pp p ch chap sec art arts fig figs ed eds trans repr in yd yds mi oz
lb lbs qt gal hr hrs min mins cm mm km kg mg ml tbsp tsp doz deg temp ph.d m.d b.a m.a j.d a.m p.m a.d b.c u.s u.k
u.n e.u u.s.a d.c n.y l.a e.g i.e""".split()
FUNCTION_WORDS = """i you he she it we they me him her us them my your his its our their this that these those there
here what which who when where why how all any both each few more most other some such no not only so than too very
can will just now also but and or if then because as until while of at by for with about after before to from up
down in out on off over under again once one two last many since yet an a the""".split()
CONTEXTS = {"mid": ["a {}. b"], "digit": ["a {}. 5 b"], "comma": ["a {}., b"], "sentence": ["a {}.", "The dog"]}


def caption_words(data: Path) -> tuple[set[str], set[str]]:
    """(words followed by a period, all words) in the Flickr8k and COCO val2017 captions."""
    caps = []
    with open(data / "flickr8k" / "Flickr8k.token.txt", encoding="utf-8") as f:
        caps += [line.split("\t", 1)[1] for line in f if "\t" in line]
    with open(data / "coco" / "captions_val2017.json", encoding="utf-8") as f:
        caps += [a["caption"] for a in json.load(f)["annotations"]]
    dotted = {m.group(1) for c in caps for m in re.finditer(r"(?<![\w.'&/-])([A-Za-z0-9][\w.'&/-]*?)\.(?!\w)", c)}
    words = {w.lower() for c in caps for w in re.findall(r"[A-Za-z]+", c)}
    return dotted, words


def variants(words) -> list[str]:
    return sorted({v for w in words for v in (w, w.lower(), w.capitalize(), w.upper())})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("BNRHN_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--show", type=int, default=40, help="differences to print")
    args = ap.parse_args(argv)
    dotted, words = caption_words(Path(args.data))
    forms = variants(dotted | set(GENERIC) | set(string.ascii_lowercase))
    openers = variants(words | set(FUNCTION_WORDS)) + [w + "." for w in forms]
    lines, where = [], []           # the probe lines, and (kind, form, context) of each probe's first line
    for w in forms:
        for ctx, pattern in CONTEXTS.items():
            where.append(("word", w, ctx, len(lines)))
            lines += [p.format(w) for p in pattern]
    for s in openers:
        where.append(("opener", s, "", len(lines)))
        lines.append(f"a b. {s} x")
    print(f"{len(forms)} candidate forms, {len(openers)} sentence-opener candidates, {len(lines)} lines", flush=True)
    java = JavaPTBTokenizer().tokenize(lines)
    ours = tokenize_captions(lines)

    kept = defaultdict(dict)
    found_openers = []
    for kind, w, ctx, i in where:
        toks = java[i].split(" ")
        if kind == "opener":
            if toks[:2] == ["a", "b"]:
                found_openers.append(w)
        else:
            kept[w][ctx] = w.lower() + "." in toks
    classes = defaultdict(list)
    for w, k in kept.items():
        if k["mid"] and not k["sentence"]:
            classes["keeps it, but not before a new sentence (single letters)"].append(w)
        elif k["mid"]:
            classes["keeps its period"].append(w)
        elif k["digit"]:
            classes["keeps its period before a number only"].append(w)
        elif not k["comma"]:
            classes["never keeps it, not even before a comma"].append(w)
    for name, ws in classes.items():
        print(f"\n{name} ({len(ws)}):\n  " + " ".join(ws))
    print(f"\nsentence openers ({len(found_openers)}):\n  " + " ".join(found_openers))

    diff = [(lines[i], o, j) for i, (o, j) in enumerate(zip(ours, java)) if o != j]
    print(f"\nbnrhn's tokenizer vs the jar on these {len(lines)} lines: {len(diff)} differ")
    for line, o, j in diff[: args.show]:
        print(f"  {line!r}: bnrhn {o!r}, jar {j!r}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
