"""``bnrhn caption CHECKPOINT IMAGE...``: caption your own images with a trained model."""

from __future__ import annotations

from bnrhn.commands._caption_args import positive_int, add_device


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption image files with a trained checkpoint",
        description=(
            "Caption image files with a trained captioner: prints the beam's best captions for each image "
            "with their log-probabilities. Files that are missing or not images are reported and skipped."
        ),
        epilog="Example: bnrhn caption runs/f8k/best.pt photo.jpg --beam 5 --topk 3",
    )
    p.add_argument("checkpoint", help="a checkpoint file (best.pt / last.pt) or a run folder")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--beam", type=int, default=3, metavar="K", help="beam size (3)")
    p.add_argument("--topk", type=int, default=None, metavar="N",
                   help="captions to print per image (default: the beam size; with --sample: 5 samples)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (one caption) instead of beam search")
    p.add_argument("--sample", action="store_true", help="sample captions instead of beam search")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--max-len", type=positive_int, default=None, metavar="N", help="longest caption in words (the model's, 20)")
    p.add_argument("--length-norm", type=float, default=None, metavar="A", help="length normalisation exponent (0 = off)")
    p.add_argument("--weights", default=None, metavar="PATH", help="encoder weights file (default: found offline)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    add_device(p, default="auto")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from bnrhn.captioning import caption_images

    if args.greedy and args.sample:
        raise ValueError("choose one of --greedy and --sample")
    method = "greedy" if args.greedy else "sample" if args.sample else "beam"
    topk = args.topk if args.topk is not None else (5 if args.sample else args.beam)
    if args.beam < 1 or topk < 1:
        raise ValueError(f"--beam and --topk must be ≥ 1, got {args.beam} and {topk}")
    results = caption_images(args.checkpoint, args.images, beam=args.beam, topk=topk, max_len=args.max_len,
                             length_norm=args.length_norm, weights=args.weights, method=method,
                             temperature=args.temperature, seed=args.seed, device=args.device)
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            print(f"bnrhn caption: error: {r.path}: {r.error}; skipped", file=sys.stderr)
            if args.json:
                print(json.dumps({"image": r.path, "error": r.error}))
            continue
        if args.json:
            print(json.dumps({"image": r.path, "captions": [{"caption": c, "logprob": round(lp, 4)} for c, lp in r.captions]}))
        else:
            print(r.path)
            for k, (c, lp) in enumerate(r.captions, 1):
                print(f"  {k}. {c}  (log p = {lp:.2f})")
    if failed:
        print(f"bnrhn caption: {failed} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0
