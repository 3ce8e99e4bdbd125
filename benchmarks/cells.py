"""Training-step throughput of every cell, side by side with torch.nn.LSTM in the same run.

A step is forward + backward + Adam update of one recurrent layer on a [T, B, I] batch with a
mean-squared loss on the outputs. Achieved GFLOP/s counts the matrix products only:
forward 2·B·T·G·H·(I + H) for a G-gate cell (per highway layer for the RHN family), and backward
twice the forward (gradients with respect to inputs and weights), so 3× forward in all.

Cells are timed in interleaved rounds (every cell once per round, the median over rounds kept) so
that a noisy shared machine affects all of them alike.

    python benchmarks/cells.py                  # B=64, T=20, I=H=512, RHN depth 3
    python benchmarks/cells.py --rounds 10 --batch 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from bnrhn.nn import Recurrent

CELLS = ["rnn", "lstm", "gru", "rhn", "bn_rhn", "bn_rhn_tf", "bn_lstm"]


class TorchLSTM(nn.Module):
    """torch.nn.LSTM with the same call shape as our runner."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size)

    def forward(self, x):
        return self.lstm(x)

    def matmul_flops(self, batch: int, steps: int) -> int:
        return 2 * batch * steps * 4 * self.lstm.hidden_size * (self.lstm.input_size + self.lstm.hidden_size)


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        out, _ = model(x)
        loss = (out - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="sequence length T")
    ap.add_argument("--size", type=int, default=512, help="input and hidden size")
    ap.add_argument("--depth", type=int, default=3, help="recurrence depth of the RHN family")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=CELLS)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, N = args.batch, args.steps, args.size
    x = torch.randn(T, B, N)
    target = torch.randn(T, B, N)

    models: dict[str, nn.Module] = {"torch.nn.LSTM": TorchLSTM(N, N)}
    for name in args.cells:
        opts = {"depth": args.depth} if "rhn" in name else {}
        models[name] = Recurrent(name, N, N, **opts)
    steps = {name: make_step(m.train(), x, target) for name, m in models.items()}
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    rows = []
    for name, model in models.items():
        sec = statistics.median(times[name])
        flops = 3 * model.matmul_flops(B, T)
        rows.append({"cell": name, "ms_per_step": 1e3 * sec, "tokens_per_s": B * T / sec, "gflops": flops / sec / 1e9,
                     "params": sum(p.numel() for p in model.parameters())})
    ref = rows[0]
    for r in rows:
        r["tokens_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["gflops_ratio"] = r["gflops"] / ref["gflops"]

    print(f"Training step (forward + backward + Adam), B={B}, T={T}, I=H={N}, RHN depth {args.depth}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"| {'cell':14s} | {'params':>9s} | {'ms/step':>8s} | {'tokens/s':>9s} | {'× nn.LSTM':>9s} | {'GFLOP/s':>8s} | {'× nn.LSTM':>9s} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 11}|")
    for r in rows:
        print(f"| {r['cell']:14s} | {r['params']:9d} | {r['ms_per_step']:8.1f} | {r['tokens_per_s']:9.0f} | "
              f"{r['tokens_ratio']:9.2f} | {r['gflops']:8.1f} | {r['gflops_ratio']:9.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
