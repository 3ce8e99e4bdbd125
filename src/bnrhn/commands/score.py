"""``bnrhn score``: coco-caption's metrics of a COCO result file."""

from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="BLEU-1..4, METEOR, ROUGE-L and CIDEr of a caption result file (coco-caption's numbers)",
        description=(
            "Score a COCO result file ([{\"image_id\": ..., \"caption\": ...}]) against reference captions with "
            "coco-caption's metrics: BLEU-1..4, METEOR 1.5 (needs Java), ROUGE-L and CIDEr(-D). Prints a table "
            "and writes corpus and per-image scores as JSON."
        ),
        epilog=(
            "References: COCO caption annotations (captions_val2017.json), a Karpathy split file "
            "(dataset_coco.json, dataset_flickr8k.json; see --split) or Flickr8k's Flickr8k.token.txt. Result "
            "image ids are matched to the references' image_id / cocoid / imgid / filename (with or without "
            "extension). Every result image must have references; reference images without a result are left "
            "out (the scores, CIDEr's document frequencies included, are over the result's images)."
        ),
    )
    p.add_argument("results", metavar="RESULTS.json", help="COCO result file: [{\"image_id\", \"caption\"}, ...]")
    p.add_argument("--references", "-r", required=True, metavar="ANNOTATIONS",
                   help="COCO caption annotations, Karpathy split JSON or Flickr8k token file")
    p.add_argument("--split", help="Karpathy files only: use the references of this split (e.g. test, val)")
    p.add_argument("--metrics", "-m", default="bleu,meteor,rouge,cider",
                   help="comma-separated subset of bleu, meteor, rouge, cider (default: all)")
    p.add_argument("--tokenizer", choices=["ptb", "ptb-java", "none"], default="ptb",
                   help="ptb: coco-caption's PTB tokenisation in Python (default); ptb-java: the reference Java "
                        "tokenizer; none: captions are tokenized already")
    p.add_argument("--json", metavar="OUT", help="where to write the scores (default: RESULTS with suffix "
                                                  ".scores.json); '-' to write nothing")
    p.add_argument("--digits", type=int, default=4, help="decimals in the printed table (default 4)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (METEOR, and n-gram metrics of "
                                                              "very long captions)")
    p.set_defaults(func=run)


def default_output(results: str) -> str:
    root, ext = os.path.splitext(results)
    return (root if ext.lower() == ".json" else results) + ".scores.json"


def check_output_path(out: str, inputs: dict[str, str]) -> None:
    """Refuse, before any work, an output path that is one of the inputs (same resolved path or same file,
    hard links and symlinks included), a folder, or a path in a folder that does not exist."""
    if os.path.isdir(out):
        raise IsADirectoryError(f"--json {out} is a folder; give a file name, e.g. {os.path.join(out, 'scores.json')}")
    for what, path in inputs.items():
        same = os.path.realpath(out) == os.path.realpath(path)
        if not same and os.path.exists(out) and os.path.exists(path):
            same = os.path.samefile(out, path)
        if same:
            raise ValueError(f"--json {out} is the {what} ({path}): writing the scores would overwrite it; choose another file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--json {out}: the folder {parent} does not exist")


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a uniquely named temporary file in the same folder (never a fixed
    name that could be a user's file), replacing ``path`` only once the text is complete."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(args) -> int:
    import json
    import warnings

    from bnrhn.metrics import parse_metrics, score
    from bnrhn.metrics.files import load_references, load_results, match_references

    metrics = parse_metrics(args.metrics)
    out_path = None if args.json == "-" else (args.json or default_output(args.results))
    if out_path:
        check_output_path(out_path, {"result file": args.results, "references": args.references})

    candidates = load_results(args.results)
    refs = load_references(args.references, split=args.split)
    references, naming, left_out = match_references(list(candidates), refs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unavailable metrics are reported below
        result = score(candidates, references, metrics=metrics,
                       tokenizer=None if args.tokenizer == "none" else args.tokenizer, progress=not args.quiet and sys.stderr.isatty(),
                       on_note=lambda note: print(f"bnrhn score: warning: {note}", file=sys.stderr, flush=True))

    print(f"{len(candidates)} images scored against {result.n_references} references "
          f"({refs.format} file, matched on {naming!r}"
          + (f"; {left_out} reference images without a result left out" if left_out else "") + ")")
    print(result.table(digits=args.digits))
    for key, why in result.unavailable.items():
        print(f"bnrhn score: warning: {key} not computed: {why}", file=sys.stderr)

    if out_path:
        payload = result.to_dict()
        payload.update({"results": os.path.abspath(args.results), "references": os.path.abspath(args.references),
                        "split": args.split, "matched_on": naming, "reference_images_left_out": left_out})
        write_atomic(out_path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        print(f"scores written to {out_path}")
    return 0
