"""``bnrhn evaluate CHECKPOINT --split test``: caption a split, write COCO-format results, print metrics."""

from __future__ import annotations

from bnrhn.commands._caption_args import add_decoding_options, positive_int, add_device


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a trained captioner on a data split",
        description=(
            "Caption every image of a split with a trained checkpoint (beam search by default), write the "
            "captions as a COCO-format results JSON and print BLEU-1..4, METEOR, ROUGE-L and CIDEr. The data "
            "set is the one the model was trained on unless --dataset names another."
        ),
        epilog="Example: bnrhn evaluate runs/f8k/best.pt --split test --beam 3",
    )
    p.add_argument("checkpoint", help="a checkpoint file (best.pt / last.pt) or a run folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to caption (test)")
    p.add_argument("--method", default="beam", choices=("beam", "greedy"), help="decoding (beam)")
    p.add_argument("--beam", type=int, default=3, metavar="K", help="beam size (3)")
    p.add_argument("--max-len", type=positive_int, default=None, metavar="N", help="longest caption in words (the model's, 20)")
    p.add_argument("--length-norm", type=float, default=None, metavar="A",
                   help="length normalisation exponent (0 = off; left out: the checkpoint's)")
    add_decoding_options(p, None, "the checkpoint's")
    p.add_argument("--metrics", nargs="+", default=None, metavar="M",
                   help="metrics (default all: BLEU-1 BLEU-2 BLEU-3 BLEU-4 METEOR ROUGE-L CIDEr)")
    p.add_argument("--dataset", default=None, metavar="SPEC", help="evaluate on another data set (same specs as train)")
    p.add_argument("--images", default=None, metavar="DIR", help="image folder for --dataset")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="only the first N images of the split")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="feature cache root")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where results_<split>.json and metrics_<split>.{json,md} go (default: <run dir>/eval)")
    add_device(p, default="auto")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from bnrhn.captioning import ALL_METRICS, evaluate, scores_table

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "eval"
    metrics = tuple(args.metrics) if args.metrics else ALL_METRICS
    results, scores = evaluate(
        ckpt, split=args.split, beam=args.beam, method=args.method, max_len=args.max_len,
        length_norm=args.length_norm, metrics=metrics, out_dir=out, dataset=args.dataset, images=args.images,
        max_images=args.max_images, cache_dir=args.cache_dir, device=args.device,
        length_penalty=args.length_penalty, block_trigrams=args.block_trigrams,
        remove_bad_endings=args.remove_bad_endings,
        progress=False if args.quiet or not sys.stderr.isatty() else None,
    )
    print(scores_table(scores))
    print(f"\n{len(results)} captions: {out / f'results_{args.split}.json'} (COCO results format)")
    return 0
