"""``bnrhn caption CHECKPOINT IMAGE...``: caption your own images with a trained model."""

from __future__ import annotations

from pathlib import Path

from bnrhn.commands._caption_args import add_decoding_options, positive_int, add_device


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption image files with a trained checkpoint",
        description=(
            "Caption image files with a trained captioner: prints the beam's best captions for each image "
            "with their log-probabilities. Files that are missing or not images are reported and skipped. "
            "With --attention DIR (Show, Attend and Tell checkpoints), also writes each image's attention figure "
            "(Xu et al. 2015): the image, then one panel per word of the best caption with the attention map of "
            "that word upsampled and laid over the image, as DIR/<image name>.attention.png, and DIR/gallery.html "
            "showing every image with its captions and figure. Existing files are never replaced without --overwrite."
        ),
        epilog="Examples: bnrhn caption runs/f8k/best.pt photo.jpg --beam 5 --topk 3;  "
               "bnrhn caption runs/f8k-sat/best.pt photo.jpg --attention attention/  (a Show, Attend and Tell run)",
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
    p.add_argument("--length-norm", type=float, default=None, metavar="A",
                   help="length normalisation exponent (0 = off; left out: the checkpoint's)")
    add_decoding_options(p, None, "the checkpoint's")
    p.add_argument("--weights", default=None, metavar="PATH", help="encoder weights file (default: found offline)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.add_argument("--attention", default=None, metavar="DIR",
                   help="write each image's attention figure (one panel per word of the best caption) to "
                        "DIR/<image name>.attention.png and a DIR/gallery.html of them (Show, Attend and Tell "
                        "checkpoints only)")
    p.add_argument("--overwrite", action="store_true", help="let --attention replace files already in DIR")
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
    figures = _attention_targets(args) if args.attention else {}
    results = caption_images(args.checkpoint, args.images, beam=args.beam, topk=topk, max_len=args.max_len,
                             length_norm=args.length_norm, weights=args.weights, method=method,
                             temperature=args.temperature, seed=args.seed, device=args.device,
                             attention=bool(args.attention), length_penalty=args.length_penalty,
                             block_trigrams=args.block_trigrams, remove_bad_endings=args.remove_bad_endings)
    failed = 0
    written: dict[int, Path] = {}
    for i, r in enumerate(results):
        if r.error:
            failed += 1
            print(f"bnrhn caption: error: {r.path}: {r.error}; skipped", file=sys.stderr)
            if args.json:
                print(json.dumps({"image": r.path, "error": r.error}))
            continue
        if args.attention and r.captions:
            from bnrhn.captioning import attention_figure

            written[i] = attention_figure(r, figures[i])
        if args.json:
            line = {"image": r.path, "captions": [{"caption": c, "logprob": round(lp, 4)} for c, lp in r.captions]}
            if i in written:
                line["attention"] = str(written[i])
            print(json.dumps(line))
        else:
            print(r.path)
            for k, (c, lp) in enumerate(r.captions, 1):
                print(f"  {k}. {c}  (log p = {lp:.2f})")
            if i in written:
                print(f"  attention: {written[i]}")
    if args.attention:
        _write_attention_gallery(args, results, written)
    if failed:
        print(f"bnrhn caption: {failed} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


GALLERY = "gallery.html"


def _figure_names(images: list[str]) -> list[str]:
    """``<image name>.attention.png`` per image, in order; a name that two images would share gets ``-2``,
    ``-3``... (``a/photo.jpg`` and ``b/photo.jpg`` → ``photo.attention.png``, ``photo-2.attention.png``)."""
    names, taken = [], set()
    for image in images:
        stem = Path(image).stem or "image"
        name, k = f"{stem}.attention.png", 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}.attention.png"
        taken.add(name)
        names.append(name)
    return names


def _attention_targets(args) -> dict[int, Path]:
    """The figure of each image (by position) under ``--attention DIR``; refuses, before any work, to replace
    an existing file there (a figure, the gallery or its thumbnails) without ``--overwrite``."""
    out = Path(args.attention)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--attention {out} exists and is not a folder")
    figures = {i: out / name for i, name in enumerate(_figure_names(args.images))}
    thumbnails = [out / "images" / f"{k:04d}.jpg" for k in range(len(args.images))]  # write_gallery's names
    existing = [p for p in [*figures.values(), out / GALLERY, *thumbnails] if p.exists()]
    if existing and not args.overwrite:
        names = ", ".join(str(p) for p in existing[:3])
        names += f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise FileExistsError(f"--attention {out} already holds {names}; choose another folder or pass --overwrite "
                              "to replace them")
    return figures


def _write_attention_gallery(args, results, written: dict[int, Path]) -> None:
    """DIR/gallery.html: every captioned image, its captions and its attention figure."""
    import sys

    from bnrhn.reports import write_gallery

    items = [
        {"image": r.path, "image_id": r.path,
         "captions": {f"{k}.": f"{c}  (log p = {lp:.2f})" for k, (c, lp) in enumerate(r.captions, 1)},
         "attention": written[i]}
        for i, r in enumerate(results) if i in written
    ]
    if items:
        page = write_gallery(Path(args.attention) / GALLERY, items, title=f"Attention of {args.checkpoint}")
        print(f"bnrhn caption: attention figures and {page} written", file=sys.stderr)
