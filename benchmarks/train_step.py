"""Cross-entropy training step of the captioners (loss + backward + Adam, the trainer's fused update), per model
and decoder cell.

Random frozen features of the encoder's shapes (EfficientNet-Lite2 by default: pooled 1,280-d, grid 9×9) and
random captions whose lengths follow Flickr8k's training captions (words + <start>/<end>, cut at 20 words:
mean 12.8, from 4 to 22 tokens; a fixed seed), batch 64, embedding and hidden 512 — the configuration of
docs/results.md's Show, Attend and Tell runs. Cells are timed in interleaved rounds (median kept), so that
a noisy machine affects all of them alike.

    python benchmarks/train_step.py                                  # show_attend_tell, lstm and bn_rhn
    python benchmarks/train_step.py --models show_tell show_attend_tell --cells lstm rhn bn_rhn bn_lstm
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnrhn import kernels
from bnrhn.models import CaptionerConfig, build_captioner
from bnrhn.freed_memory import keep_freed_memory
from bnrhn.training import build_optimizer

# Flickr8k training-caption lengths in tokens (<start> + words + <end>, words cut at 20 by --max-caption-len):
# how many of the 30,000 training captions of the official split have each length (bnrhn.data.vocab.tokenize)
LENGTH_COUNTS = {4: 15, 5: 125, 6: 340, 7: 854, 8: 1948, 9: 2501, 10: 2917, 11: 3318, 12: 3310, 13: 3134, 14: 2772,
                 15: 2332, 16: 1864, 17: 1338, 18: 980, 19: 683, 20: 518, 21: 369, 22: 682}


def batch(B: int, grid: int, features: int, vocab: int, generator: torch.Generator):
    lengths_pool = torch.tensor([n for n, c in LENGTH_COUNTS.items() for _ in range(c)])
    lengths = lengths_pool[torch.randint(len(lengths_pool), (B,), generator=generator)]
    L = int(lengths.max())
    tokens = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, n - 1] = 1, 2
        tokens[i, 1 : n - 1] = torch.randint(4, vocab, (n - 2,), generator=generator)
    pooled_or_grid = torch.randn(B, grid, features, generator=generator)
    return pooled_or_grid, tokens, lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["show_attend_tell"], choices=["show_tell", "show_attend_tell"])
    ap.add_argument("--cells", nargs="+", default=["lstm", "bn_rhn"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--grid", type=int, default=81, help="grid positions (81 = EfficientNet-Lite2's 9×9)")
    ap.add_argument("--features", type=int, default=1280)
    ap.add_argument("--vocab", type=int, default=2539)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI does: each step's large tensors reuse the last step's memory
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = [batch(args.batch, args.grid, args.features, args.vocab, g) for _ in range(args.steps)]
    setups = []
    for model in args.models:
        for cell in args.cells:
            torch.manual_seed(0)
            cfg = CaptionerConfig(model=model, vocab_size=args.vocab, feature_size=args.features, grid_size=args.grid,
                                  embed_size=args.hidden, hidden_size=args.hidden, cell=cell,
                                  dropout=0.4 if cell in ("bn_rhn", "bn_lstm") else 0.3)
            m = build_captioner(cfg).train()
            opt = build_optimizer(m.parameters(), "adam", lr=1e-4)
            setups.append((f"{model} {cell}", m, opt))

    def step(m, opt, feats, tokens, lengths):
        f = feats if m.needs_grid else feats.mean(1)
        loss, _, _ = m.loss(f, tokens, lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {name: [] for name, _, _ in setups}
    for name, m, opt in setups:  # warm-up
        step(m, opt, *data[0])
    for _ in range(args.rounds):
        for name, m, opt in setups:
            t0 = time.perf_counter()
            for d in data:
                step(m, opt, *d)
            times[name].append((time.perf_counter() - t0) / len(data) * 1e3)
    tokens = sum(int((d[2] - 1).sum()) for d in data) / len(data)
    print(kernels.status())
    print(f"Training step (loss + backward + Adam), batch {args.batch}, hidden {args.hidden}, grid {args.grid}×"
          f"{args.features}, {tokens:.0f} target words per batch, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds of {args.steps} steps")
    print("| model, cell | ms/step | words/s |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms:.1f} | {tokens / ms * 1e3:,.0f} |")


if __name__ == "__main__":
    main()
