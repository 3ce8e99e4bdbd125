"""Decoding speed: batched beam search (all images × beams in one tensor) vs a per-image beam-search loop.

    python benchmarks/decode.py                                   # trained checkpoint not needed: see below
    python benchmarks/decode.py --checkpoint runs/f8k/best.pt     # a trained captioner and its test images

With ``--checkpoint`` the model is the trained captioner and the images are the first ``--images``
images of its data set's test split (features from the cache, extracted if needed), with more taken
from the validation and training splits when the test split is smaller. Without it, a Show and Tell
model of the default size (embedding and hidden 512, ``--cell``, Flickr8k's vocabulary size) with
random weights decodes random features standardised like real ones; its captions are nonsense but
the work per step is the same.

Both methods run the same model, the same search rules and the same beam width, one after the other
in one process; the per-image loop decodes one image at a time (its beams still batched, as in
im2txt), the batched search decodes all images at once. The table reports captions per second, the
speed-up, and how many captions are identical. Because both methods share the search code, the
batched captions are also checked against :func:`bnrhn.decoding.beam_search_one`, an independent
plain-Python beam search (slow: only the first ``--reference`` images).

``--block-trigrams``, ``--remove-bad-endings`` and ``--length-norm A --length-penalty gnmt`` turn the
decoding options of :mod:`bnrhn.decoding.constraints` on for every search (the random-weight model's
bad endings are its 25 commonest word ids, as many as :data:`bnrhn.decoding.BAD_ENDINGS`).

The checkpoint quoted in docs/performance.md is the LSTM of the Flickr8k comparison
(``experiments/flickr8k-compare/runs/lstm-seed0/best.pt``; docs/results.md gives the command that
trains it).
"""

from __future__ import annotations

import argparse
import time

import torch


def _model_and_features(args):
    from bnrhn.decoding import BAD_ENDINGS, bad_ending_ids
    from bnrhn.models import CaptionerConfig, build_captioner

    if args.checkpoint:
        from bnrhn.captioning import load_captioner
        from bnrhn.captioning.data import SplitFeatures, attach_features, stderr_log
        from bnrhn.captioning.api import dataset_for_config, _encoder_for

        loaded = load_captioner(args.checkpoint)
        cfg = loaded.config
        cfg.progress = False
        ds = dataset_for_config(cfg, stderr_log)
        enc = _encoder_for(loaded, None, stderr_log)
        ds, fs = attach_features(ds, enc, cfg.cache_dir, loaded.model.needs_grid, False, False)
        recs = (ds.split("test") + ds.split("val") + ds.split("train"))[: args.images]
        feats = SplitFeatures.build(recs, fs, loaded.model.needs_grid).batch(torch.arange(len(recs)))
        args.bad_ids = bad_ending_ids(loaded.vocab.index)
        return loaded.model, feats, f"{args.checkpoint} ({cfg.model}, {cfg.cell}, vocab {len(loaded.vocab)})"
    args.bad_ids = list(range(4, 4 + len(BAD_ENDINGS)))
    torch.manual_seed(0)
    cfg = CaptionerConfig(model="show_tell", vocab_size=args.vocab, feature_size=1280, embed_size=512,
                          hidden_size=512, cell=args.cell)
    model = build_captioner(cfg).eval()
    feats = torch.randn(args.images, 1280)  # already "standardised": model.feature_mean/std are 0/1
    return model, feats, f"random-weight show_tell, {args.cell}, hidden 512, vocab {args.vocab}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained captioner (default: random weights of the default size)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--cell", default="lstm", help="cell of the random-weight model")
    p.add_argument("--vocab", type=int, default=2538, help="vocabulary of the random-weight model (Flickr8k, min count 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reference", type=int, default=50, metavar="N",
                   help="also compare the first N batched captions with the independent reference search")
    p.add_argument("--block-trigrams", action="store_true", help="trigram blocking in every search")
    p.add_argument("--remove-bad-endings", action="store_true", help="no caption ends in a bad-ending word")
    p.add_argument("--length-norm", type=float, default=0.0, metavar="A", help="length penalty exponent (0)")
    p.add_argument("--length-penalty", choices=("power", "gnmt"), default="power", help="its form (power)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from bnrhn.decoding import beam_search, beam_search_one, greedy

    model, feats, what = _model_and_features(args)
    model.eval()
    n = feats.shape[0]
    constraints = dict(block_trigrams=args.block_trigrams,
                       bad_ending_ids=args.bad_ids if args.remove_bad_endings else None)
    options = dict(length_norm=args.length_norm, length_penalty=args.length_penalty, **constraints)
    on = [k for k in ("block_trigrams", "remove_bad_endings") if getattr(args, k)]
    if args.length_norm:
        on.append(f"length penalty {args.length_penalty} {args.length_norm}")
    print(f"model: {what}; {n} images, beam {args.beam}, max length {args.max_len}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; options: {', '.join(on) or 'none'}")

    beam_search(model, feats[:8], args.beam, args.max_len, **options)  # warm-up
    t0 = time.perf_counter()
    batched = [h[0].tokens for h in beam_search(model, feats, args.beam, args.max_len, **options)]
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    looped = [beam_search(model, feats[i : i + 1], args.beam, args.max_len, **options)[0][0].tokens for i in range(n)]
    t_loop = time.perf_counter() - t0

    t0 = time.perf_counter()
    greedy(model, feats, args.max_len, **constraints)
    t_greedy = time.perf_counter() - t0

    n_ref = min(args.reference, n)
    reference = [beam_search_one(model, feats[i], args.beam, args.max_len, **options)[0].tokens for i in range(n_ref)]
    same_ref = sum(a == b for a, b in zip(batched, reference))
    same = sum(a == b for a, b in zip(batched, looped))
    mean_len = sum(map(len, batched)) / n
    print()
    print("| decoding | images | seconds | captions/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| per-image beam search loop (beam {args.beam}) | {n} | {t_loop:.2f} | {n / t_loop:.1f} | 1.0× |")
    print(f"| batched beam search (beam {args.beam}) | {n} | {t_batched:.2f} | {n / t_batched:.1f} | "
          f"{t_loop / t_batched:.1f}× |")
    print(f"| batched greedy | {n} | {t_greedy:.2f} | {n / t_greedy:.1f} | {t_loop / t_greedy:.1f}× |")
    print()
    print(f"identical captions (batched vs loop): {same}/{n}; (batched vs the independent reference search): "
          f"{same_ref}/{n_ref}; mean caption length {mean_len:.1f} words")


if __name__ == "__main__":
    main()
