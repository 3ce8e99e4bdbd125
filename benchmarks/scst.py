"""Self-critical training speed: one SCST step, its parts, and a cross-entropy step of as many captions.

    python benchmarks/scst.py                                  # random-weight Show and Tell, Flickr8k references
    python benchmarks/scst.py --checkpoint runs/f8k/best.pt    # a trained captioner and its training images

An SCST step (:mod:`bnrhn.captioning.scst`) samples ``--samples`` captions for each of ``--images`` images
(step-by-step decoding, no gradient), rewards them with CIDEr-D (PTB tokenisation of the samples and
:class:`bnrhn.metrics.cider.CiderDReward`), and runs the teacher-forced pass and backward on the samples.
The table gives milliseconds per step (median of ``--steps`` after one warm-up), each part's share, and a
cross-entropy step (``model.loss`` + backward) on ``images × samples`` reference captions for scale.

Without ``--checkpoint`` the model is a Show and Tell of the default size (embedding and hidden 512) with
random weights, the references are Flickr8k's training captions (``../shared/data`` or ``$BNRHN_DATA``),
and the features are random: its samples are nonsense and longer than a trained model's (they run to
``--max-len`` more often), so the sampling share is an upper bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _setup(args):
    from bnrhn.captioning.data import CaptionTensors, find_data_root
    from bnrhn.captioning.scst import SelfCritical, training_reward
    from bnrhn.data.captions import read_flickr8k
    from bnrhn.data.vocab import Vocabulary
    from bnrhn.models import CaptionerConfig, build_captioner

    if args.checkpoint:
        from bnrhn.captioning import load_captioner
        from bnrhn.captioning.api import prepare_data

        loaded = load_captioner(args.checkpoint)
        cfg = loaded.config
        cfg.progress = False
        data = prepare_data(cfg, lambda m: None)
        model, vocab, records = loaded.model, loaded.vocab, data.train.records
        feats = data.train.feats
        what = f"{args.checkpoint} ({cfg.model}, {cfg.cell})"
    else:
        root = find_data_root()
        if root is None or not (root / "flickr8k").is_dir():
            raise SystemExit("Flickr8k's captions are needed for the references: set BNRHN_DATA")
        records = read_flickr8k(root / "flickr8k").split("train")
        vocab = Vocabulary.build([c for r in records for c in r.captions], min_count=5)
        torch.manual_seed(0)
        model = build_captioner(CaptionerConfig(model="show_tell", vocab_size=len(vocab), feature_size=1280,
                                                embed_size=512, hidden_size=512, cell=args.cell,
                                                pad_id=vocab.pad_id, start_id=vocab.start_id,
                                                end_id=vocab.end_id, unk_id=vocab.unk_id))
        feats = torch.randn(len(records), 1280)
        what = f"random-weight show_tell, {args.cell}, hidden 512"
    t0 = time.perf_counter()
    reward = training_reward([r.captions for r in records])
    ref_seconds = time.perf_counter() - t0
    scst = SelfCritical(reward, vocab, samples=args.samples, baseline=args.baseline, max_len=args.max_len)
    caps = CaptionTensors.build(records, vocab, 20)
    return model, feats, scst, caps, what, ref_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained captioner (default: random weights, Flickr8k references)")
    p.add_argument("--cell", default="lstm", help="cell of the random-weight model (lstm)")
    p.add_argument("--images", type=int, default=32, help="images per step (32)")
    p.add_argument("--samples", type=int, default=5, help="captions sampled per image (5)")
    p.add_argument("--baseline", choices=("mean", "greedy"), default="mean")
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--steps", type=int, default=5, help="timed steps (5)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, feats, scst, caps, what, ref_seconds = _setup(args)
    g = torch.Generator().manual_seed(0)
    rows = {"scst": [], "sample": [], "reward": [], "pass": [], "xe": []}
    for step in range(args.steps + 1):
        images = torch.randperm(feats.shape[0], generator=g)[: args.images]
        t0 = time.perf_counter()
        loss, _, parts = scst.loss(model, feats[images].float(), images)
        loss.backward()
        t1 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        idx = torch.randperm(len(caps), generator=g)[: args.images * args.samples]
        lengths = caps.lengths[idx]
        model.train()
        t2 = time.perf_counter()
        xe, _, _ = model.loss(feats[caps.image[idx]].float(), caps.tokens[idx, : int(lengths.max())], lengths)
        xe.backward()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if step == 0:
            continue  # warm-up
        total = t1 - t0
        rows["scst"].append(total)
        rows["sample"].append(parts["sample_seconds"])
        rows["reward"].append(parts["reward_seconds"])
        rows["pass"].append(total - parts["sample_seconds"] - parts["reward_seconds"])
        rows["xe"].append(t3 - t2)
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    print(f"model: {what}; {args.images} images x {args.samples} samples per step, baseline {args.baseline}, "
          f"{torch.get_num_threads()} threads; reward set-up (tokenize + count {len(scst.reward.references)} "
          f"images' references) {ref_seconds:.1f} s once")
    print()
    print("| part | ms per step (median) | share of the SCST step |")
    print("|---|---:|---:|")
    for key, label in (("sample", "sampling (no gradient)"), ("reward", "reward: tokenize + CIDEr-D"
                       + (" + greedy baseline" if args.baseline == "greedy" else "")),
                       ("pass", "teacher-forced log p + backward"), ("scst", "**SCST step**")):
        print(f"| {label} | {med[key]:.1f} | {100 * med[key] / med['scst']:.0f}% |")
    print(f"| cross-entropy step, {args.images * args.samples} reference captions | {med['xe']:.1f} | "
          f"{100 * med['xe'] / med['scst']:.0f}% |")


if __name__ == "__main__":
    main()
