"""Caption metrics: bnrhn.metrics vs pycocoevalcap (coco-caption), side by side in one run.

COCO val2017 (5,000 images): for every image the candidate is one held-out human caption (the first)
and the references are its other captions (4 for 4,987 images, 5-6 for 13). Both scorers get exactly
the same input; the script checks that the numbers agree and times:

1. tokenisation of the raw captions (ours: Python; coco-caption: Java PTBTokenizer in a subprocess);
   "memoised" is ours again on captions seen before, as in ``score()`` called every epoch,
2. BLEU-1..4, ROUGE-L and CIDEr-D on the *same tokenized* captions (``score(..., tokenizer=None)`` vs
   pycocoevalcap's ``Bleu(4)``, ``Rouge()``, ``Cider()``), per metric and in total: the speed target,
3. with ``--meteor``: METEOR (ours in its persistent JVM, first and second call, vs pycocoevalcap's
   ``Meteor()`` started and used once, as ``COCOEvalCap.evaluate`` does).

Each timing is the best of ``--repeat`` runs (wall clock, ``time.perf_counter``); runs of the two
scorers alternate so that both see the same machine load. For the in-process scorers the CPU time of
the process (``time.process_time``) is printed too: it is less sensitive to other load on the machine. Usage::

    python benchmarks/metrics.py [--images N] [--repeat R] [--meteor] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bnrhn.metrics import PTBTokenizer, score, tokenize_captions  # noqa: E402

KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]


def load_coco(path: Path, n_images: int | None):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    items = sorted(caps.items())[:n_images] if n_images else sorted(caps.items())
    cands = OrderedDict((i, c[0]) for i, c in items)
    refs = OrderedDict((i, c[1:]) for i, c in items)
    return cands, refs


def best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def coco_scorers(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    times, out = {}, {}
    t = time.perf_counter()
    b, b_img = Bleu(4).compute_score(gts, res, verbose=0)
    times["BLEU"] = time.perf_counter() - t
    for k in range(4):
        out[f"BLEU-{k + 1}"] = (b[k], np.asarray(b_img[k]))
    t = time.perf_counter()
    r, r_img = Rouge().compute_score(gts, res)
    times["ROUGE-L"] = time.perf_counter() - t
    out["ROUGE-L"] = (r, np.asarray(r_img))
    t = time.perf_counter()
    c, c_img = Cider().compute_score(gts, res)
    times["CIDEr"] = time.perf_counter() - t
    out["CIDEr"] = (c, np.asarray(c_img))
    return times, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("BNRHN_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--images", type=int, default=None, help="first N images only (default: all 5,000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--meteor", action="store_true", help="also time METEOR (needs Java; ~2 minutes)")
    ap.add_argument("--markdown", action="store_true", help="print the result tables as markdown")
    args = ap.parse_args(argv)

    path = Path(args.data) / "coco" / "captions_val2017.json"
    if not path.exists():
        print(f"data not found: {path} (use --data or BNRHN_DATA)", file=sys.stderr)
        return 2
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer as CocoPTBTokenizer
    except ImportError:
        print("pycocoevalcap is not installed: nothing to compare with", file=sys.stderr)
        return 2

    cands, refs = load_coco(path, args.images)
    ids = list(cands)
    n_refs = sum(len(r) for r in refs.values())
    print(f"COCO val2017: {len(ids)} images, {n_refs} references, 1 held-out candidate each")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, NumPy {np.__version__}")

    # ---------------------------------------------------------------- 1. tokenisation
    flat = [s for i in ids for s in refs[i]]

    def ours_tok():
        # an explicit tokenizer instance: no memoisation, every caption is lexed
        tk = PTBTokenizer()
        return tokenize_captions(flat, tk), tokenize_captions([cands[i] for i in ids], tk)

    def ours_tok_memo():
        # what score() does by default: memoised per caption (references repeat from call to call)
        return tokenize_captions(flat), tokenize_captions([cands[i] for i in ids])

    def coco_tok():
        tk = CocoPTBTokenizer()
        return (tk.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids}),
                tk.tokenize({i: [{"caption": cands[i]}] for i in ids}))

    from bnrhn.metrics import tokenizer as tokmod

    tokmod._patterns.cache_clear()                # one-time set-up: character classes and token patterns
    t = time.perf_counter()
    PTBTokenizer().tokens("a")
    t_setup = time.perf_counter() - t
    t_tok_ours, (ref_tok, cand_tok) = best(ours_tok, args.repeat)
    t_tok_coco, (gts, res) = best(coco_tok, args.repeat)
    ours_tok_memo()
    t_tok_memo, memo = best(ours_tok_memo, args.repeat)
    assert memo == (ref_tok, cand_tok)
    theirs_flat = [s for i in ids for s in gts[i]] + [res[i][0] for i in ids]
    tok_diff = sum(a != b for a, b in zip(ref_tok + cand_tok, theirs_flat))

    # ---------------------------------------------------------------- 2. BLEU + ROUGE-L + CIDEr-D
    tok_refs, pos = OrderedDict(), 0
    for i in ids:
        tok_refs[i] = ref_tok[pos: pos + len(refs[i])]
        pos += len(refs[i])
    tok_cands = OrderedDict(zip(ids, cand_tok))
    res_in = {i: [tok_cands[i]] for i in ids}

    ours_t, coco_t, ours_cpu, coco_cpu = [], [], [], []
    ours_stage, coco_stage = None, None
    for _ in range(args.repeat):                     # alternate the two scorers
        t, c = time.perf_counter(), time.process_time()
        ours = score(tok_cands, tok_refs, metrics="bleu,rouge,cider", tokenizer=None)
        ours_t.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
        if ours_stage is None or ours_t[-1] == min(ours_t):
            ours_stage = dict(ours.timings)
        t, c = time.perf_counter(), time.process_time()
        stage, theirs = coco_scorers(tok_refs, res_in)
        coco_t.append(time.perf_counter() - t)
        coco_cpu.append(time.process_time() - c)
        if coco_stage is None or coco_t[-1] == min(coco_t):
            coco_stage = stage
    worst_corpus = max(abs(ours.corpus[k] - theirs[k][0]) for k in KEYS)
    worst_image = max(float(np.max(np.abs(np.array([ours.per_image[i][k] for i in ids]) - theirs[k][1])))
                      for k in KEYS)

    rows = [("BLEU-1..4", ours_stage["ngrams"] + ours_stage["bleu"], coco_stage["BLEU"]),
            ("ROUGE-L", ours_stage["rouge"], coco_stage["ROUGE-L"]),
            ("CIDEr-D", ours_stage["cider"], coco_stage["CIDEr"])]
    total_ours, total_coco = min(ours_t), min(coco_t)

    # ---------------------------------------------------------------- 3. METEOR (optional)
    meteor_rows = []
    if args.meteor:
        from pycocoevalcap.meteor.meteor import Meteor as CocoMeteor

        from bnrhn.metrics.meteor import get_meteor

        m = get_meteor()
        t = time.perf_counter()
        m_cold = m.score([tok_cands[i] for i in ids], [tok_refs[i] for i in ids])
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        m_warm = m.score([tok_cands[i] for i in ids], [tok_refs[i] for i in ids])
        t_warm = time.perf_counter() - t
        t = time.perf_counter()
        cm = CocoMeteor()
        t_start = time.perf_counter() - t
        t = time.perf_counter()
        c_score, c_img = cm.compute_score(tok_refs, res_in)
        t_coco = time.perf_counter() - t
        del cm
        m_diff = max(abs(m_cold[0] - c_score), float(np.max(np.abs(np.array(m_cold[1]) - np.array(c_img)))))
        meteor_rows = [(m_cold[0], c_score, m_diff, t_cold, t_warm, t_start, t_coco, m_warm == m_cold)]

    # ---------------------------------------------------------------- report
    fmt = (lambda *c: "| " + " | ".join(c) + " |") if args.markdown else (lambda *c: "  ".join(f"{x:>14}" for x in c))
    print()
    print("Scores (ours / pycocoevalcap), from the same tokens:")
    print(fmt("metric", "bnrhn", "pycocoevalcap"))
    if args.markdown:
        print(fmt("---", "---:", "---:"))
    for k in KEYS:
        print(fmt(k, f"{ours.corpus[k]:.6f}", f"{theirs[k][0]:.6f}"))
    for (mo, mc, *_rest) in meteor_rows:
        print(fmt("METEOR", f"{mo:.6f}", f"{mc:.6f}"))
    print(f"largest difference: corpus {worst_corpus:.2e}, per image {worst_image:.2e}"
          + (f"; METEOR {meteor_rows[0][2]:.2e}" if meteor_rows else ""))
    print()
    print(f"Time, best of {args.repeat} (seconds):")
    print(fmt("stage", "bnrhn", "pycocoevalcap", "speed-up"))
    if args.markdown:
        print(fmt("---", "---:", "---:", "---:"))
    print(fmt("tokenize", f"{t_tok_ours:.3f}", f"{t_tok_coco:.3f}", f"{t_tok_coco / t_tok_ours:.1f}x"))
    print(fmt("tokenize, memoised", f"{t_tok_memo:.3f}", f"{t_tok_coco:.3f}", f"{t_tok_coco / t_tok_memo:.1f}x"))
    for name, a, b in rows:
        print(fmt(name, f"{a:.3f}", f"{b:.3f}", f"{b / a:.1f}x"))
    print(fmt("BLEU+ROUGE-L+CIDEr-D", f"{total_ours:.3f}", f"{total_coco:.3f}", f"{total_coco / total_ours:.1f}x"))
    print(fmt("same, CPU time", f"{min(ours_cpu):.3f}", f"{min(coco_cpu):.3f}", f"{min(coco_cpu) / min(ours_cpu):.1f}x"))
    for (_mo, _mc, _d, t_cold, t_warm, t_start, t_coco, same) in meteor_rows:
        print(fmt("METEOR, 1st call", f"{t_cold:.1f}", f"{t_start + t_coco:.1f}", f"{(t_start + t_coco) / t_cold:.1f}x"))
        print(fmt("METEOR, next calls", f"{t_warm:.1f}", f"{t_start + t_coco:.1f}", f"{(t_start + t_coco) / t_warm:.1f}x"))
    print(f"(bnrhn's tokenizer also has a one-time set-up per process of {t_setup:.2f} s, not included above.)")
    print(f"(bnrhn total = score(..., tokenizer=None) including input checks and per-image dicts; stages "
          f"are its own timings. Tokenizations differing: {tok_diff} of {len(theirs_flat)}.)")
    if meteor_rows:
        print(f"(pycocoevalcap METEOR = Meteor() start {meteor_rows[0][5]:.1f} s + compute_score "
              f"{meteor_rows[0][6]:.1f} s; bnrhn's 1st call includes its JVM start.)")
    ok = worst_corpus <= 1e-6 and worst_image <= 1e-6 and tok_diff == 0 and \
        all(r[2] <= 1e-4 for r in meteor_rows)
    print("numbers identical (1e-6; METEOR 1e-4):", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
