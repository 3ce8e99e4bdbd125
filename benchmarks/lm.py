"""Character LM training, ours against a plain ``torch.nn.LSTM`` char-rnn, side by side in one run.

Both train on the same text with the same truncated-BPTT windows (B streams, windows of L characters,
the state carried across windows), the same sizes, Adam at the same learning rate and gradient-norm
clipping at 5, for ``--windows`` windows; then both score the whole validation text the same way.

- **ours**: ``bnrhn lm train``'s own objects (CharLM, CharLMTask, Trainer: logging, checks and all; Adam with
  PyTorch's fused update, as ``build_optimizer`` chooses on the CPU).
- **char-rnn**: about forty lines below (nn.Embedding → nn.LSTM → nn.Linear with PyTorch's default
  initialisations, ``torch.optim.Adam``'s default update and a bare training loop), written here as the
  independent reference.
- optional ablation rows (``--ablations``): ours with one setting changed, to see what makes the learning
  curves differ: the LSTM forget-gate bias started at 1 (LSTMCell's own default, which CharLM used
  before it took PyTorch's 0), and the embedding started at U(−0.1, 0.1) (what CharLM did before it kept
  nn.Embedding's N(0, 1)).

Runs alternate in ``--rounds`` rounds (median chars/s kept) so that a noisy machine affects both alike.
Chars/s counts training steps only (forward, backward, clipping, update; ours includes its per-step
logging), not validation.

    python benchmarks/lm.py                               # tiny Shakespeare from ../shared, 2 × 128, 200 windows
    python benchmarks/lm.py --windows 400 --rounds 3 --ablations --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from bnrhn.data.text import CharCorpus
from bnrhn.lm.evaluate import evaluate_ids
from bnrhn.lm.task import CharLMTask
from bnrhn.models.char_lm import CharLM
from bnrhn.freed_memory import keep_freed_memory
from bnrhn.training import Trainer, TrainerConfig, build_optimizer

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt"


# -- the reference: a plain char-rnn ------------------------------------------------------------------
class CharRNN(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embedding(x), state)
        return self.decoder(out), state


def streams(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[M + 1, B]: the text cut into B contiguous streams (the remainder dropped)."""
    m = (ids.numel() - 1) // batch
    return torch.stack([ids[b * m : b * m + m + 1] for b in range(batch)], dim=1)


def train_char_rnn(ids, vocab, args) -> tuple[nn.Module, float]:
    torch.manual_seed(args.seed)
    model = CharRNN(vocab, args.embed, args.hidden, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    s = streams(ids, args.batch)
    state, seconds, L = None, 0.0, args.seq_len
    for k in range(args.windows):
        k %= (s.shape[0] - 1) // L
        if k == 0:
            state = None
        x, y = s[k * L : (k + 1) * L], s[k * L + 1 : (k + 1) * L + 1]
        t0 = time.perf_counter()
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        state = tuple(t.detach() for t in state)
        seconds += time.perf_counter() - t0
    return model, seconds


def char_rnn_valid_loss(model, ids, args) -> float:
    """Mean cross-entropy over the validation text: B streams, windows of L, state carried (no padding:
    the streams' remainder is left out, a few characters)."""
    s = streams(ids, args.batch)
    total, count, state, L = 0.0, 0, None, args.seq_len
    with torch.no_grad():
        for k in range((s.shape[0] - 1) // L):
            x, y = s[k * L : (k + 1) * L], s[k * L + 1 : (k + 1) * L + 1]
            logits, state = model(x, state)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    return total / count


# -- ours ---------------------------------------------------------------------------------------------
def train_ours(corpus, args, forget_bias=None, embedding_init=None) -> tuple[nn.Module, float]:
    torch.manual_seed(args.seed)
    opts = {} if forget_bias is None else {"forget_bias": forget_bias}
    model = CharLM(len(corpus.vocab), "lstm", hidden_size=args.hidden, num_layers=args.layers,
                   embed_size=args.embed, **opts)
    if embedding_init == "uniform":
        nn.init.uniform_(model.embedding.weight, -0.1, 0.1)  # CharLM's initialisation before 2026-12-03
    task = CharLMTask(model, corpus, args.batch, args.seq_len)
    optimizer = build_optimizer(model.parameters(), "adam", args.lr, 0.0, 0.9)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainerConfig(run_dir=run_dir, max_epochs=10**6, max_steps=args.windows, grad_clip=5.0,
                            select_metric="loss", select_mode="min", validate_every=None, seed=args.seed,
                            progress=False, overwrite=True)
        summary = Trainer(task, optimizer, None, cfg).fit()
    return model, summary["train_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="a text file, split 90/5/5 (default: tiny Shakespeare)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--windows", type=int, default=200, help="training windows (steps) per run")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ablations", action="store_true", help="also ours with forget bias 1 / embedding U(-0.1, 0.1)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    keep_freed_memory()  # as the CLI does: each step's large tensors reuse the last step's memory
    if not Path(args.text).is_file():
        raise SystemExit(f"--text {args.text}: no such file (tiny Shakespeare lives in ../shared/data/text/)")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = CharCorpus.from_file(args.text, 0.05, 0.05)
    V = len(corpus.vocab)

    variants = {
        "ours (bnrhn lm train)": lambda: train_ours(corpus, args),
        "char-rnn (nn.LSTM, plain loop)": lambda: train_char_rnn(corpus.train, V, args),
    }
    if args.ablations:
        variants["ours, forget bias 1"] = lambda: train_ours(corpus, args, forget_bias=1.0)
        variants["ours, embedding U(-0.1, 0.1)"] = lambda: train_ours(corpus, args, embedding_init="uniform")
    chars = args.windows * args.batch * args.seq_len
    speed: dict[str, list[float]] = {name: [] for name in variants}
    valid: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, run in variants.items():
            model, seconds = run()
            speed[name].append(chars / seconds)
            if name not in valid:
                model.eval()
                if isinstance(model, CharRNN):
                    valid[name] = char_rnn_valid_loss(model, corpus.valid, args)
                else:
                    valid[name] = evaluate_ids(model, corpus.valid, args.batch, args.seq_len).loss

    ref = "char-rnn (nn.LSTM, plain loop)"
    rows = []
    for name in variants:
        cps = statistics.median(speed[name])
        rows.append(dict(variant=name, chars_per_s=cps, speed_vs_char_rnn=cps / statistics.median(speed[ref]),
                         valid_loss=valid[name], valid_loss_minus_char_rnn=valid[name] - valid[ref]))
    print(f"# char LM, {args.layers} × {args.hidden} LSTM, embed {args.embed}, batch {args.batch} × {args.seq_len}, "
          f"{args.windows} windows, {args.rounds} round(s), torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| variant | chars/s | × char-rnn | valid loss (nats) | − char-rnn |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['chars_per_s']:,.0f} | {r['speed_vs_char_rnn']:.2f} | {r['valid_loss']:.3f} | "
              f"{r['valid_loss_minus_char_rnn']:+.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
