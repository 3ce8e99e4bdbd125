"""Data-parallel training on one machine's CPU: 1 process × N threads against N processes × 1 thread (gloo).

A Show-and-Tell captioner of each cell trains on a fixed sequence of random batches (features, captions of
8–20 words) with Adam: the global batch is the same in both layouts, each of the N processes holding B/N
rows under ``DistributedDataParallel`` (batch-norm statistics synchronised over the processes, as
``bnrhn train`` under torchrun does). Per layout: training tokens/s (forward, backward, update) and, for the
processes, the share of a step that the communication costs, measured as 1 − t(local) / t(DDP), where
t(local) is the same step on the same shard with no gradient all-reduce and per-process statistics.

    python benchmarks/distributed.py                          # lstm, bn_rhn; 2 processes; H 256, B 64
    python benchmarks/distributed.py --cells lstm rhn bn_rhn --size 512 --steps 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnrhn.models import CaptionerConfig, build_captioner
from bnrhn.layers.seq_batchnorm import synchronize_batch_norm


def batches(args, n: int):
    """The fixed batch sequence: (features [B, F], tokens [B, L], lengths [B])."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(8, 21, (args.batch,), generator=g) + 2  # <start> words <end>
        tokens = torch.randint(4, args.vocab, (args.batch, int(lengths.max())), generator=g)
        tokens[:, 0] = 1
        tokens[torch.arange(args.batch), lengths - 1] = 2
        tokens[torch.arange(tokens.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
        out.append((torch.randn(args.batch, args.features, generator=g), tokens, lengths))
    return out


def model_for(args, cell: str):
    torch.manual_seed(0)
    cfg = CaptionerConfig(vocab_size=args.vocab, feature_size=args.features, embed_size=args.size,
                          hidden_size=args.size, cell=cell, dropout=0.0)
    return build_captioner(cfg)


def timed_steps(model, step_fn, data, warmup: int) -> tuple[float, int]:
    """(seconds, tokens) of the steps after ``warmup``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds, tokens = 0.0, 0
    for k, batch in enumerate(data):
        t0 = time.perf_counter()
        loss, n, _ = step_fn(*batch)  # the captioner's loss: (mean loss, tokens, parts for logging)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= warmup:
            seconds += time.perf_counter() - t0
            tokens += n
    return seconds, tokens


def single(args, cell: str) -> float:
    torch.set_num_threads(args.processes)
    model = model_for(args, cell).train()
    seconds, tokens = timed_steps(model, model.loss, batches(args, args.warmup + args.steps), args.warmup)
    return tokens / seconds


class _Loss(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats, tokens, lengths):
        return self.model.loss(feats, tokens, lengths)


def _rank(rank: int, args, cell: str, folder: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=args.processes, timeout=timedelta(seconds=300))
    W = args.processes
    shard = [(f[rank::W], t[rank::W, : int(l.max())], l[rank::W]) for f, t, l in batches(args, args.warmup + args.steps)]
    rows = {}
    for layout in ("local", "ddp"):  # the same shard: without, then with the communication
        model = model_for(args, cell).train()
        if layout == "ddp":
            synchronize_batch_norm(model)
            wrapped = DistributedDataParallel(_Loss(model), forward_sync_buffers=False)
            step = wrapped
        else:
            step = model.loss
        dist.barrier()
        seconds, tokens = timed_steps(model, step, shard, args.warmup)
        total = torch.tensor([float(tokens)])
        dist.all_reduce(total)
        longest = torch.tensor([seconds])
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)  # the group is as fast as its slowest process
        rows[layout] = (float(total) / float(longest), float(longest))
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def processes(args, cell: str) -> tuple[float, float]:
    """(tokens/s of N processes, communication share of their step)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(args, cell, folder), nprocs=args.processes, join=True)
        rows = json.loads(Path(folder, "result.json").read_text())
    return rows["ddp"][0], 1.0 - rows["local"][1] / rows["ddp"][1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=["lstm", "bn_rhn"])
    p.add_argument("--processes", type=int, default=2, help="N (and the threads of the single process)")
    p.add_argument("--size", type=int, default=256, help="embedding and hidden size")
    p.add_argument("--batch", type=int, default=64, help="global batch (captions)")
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--features", type=int, default=1280)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternate the layouts this often; medians kept")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = []
    for cell in args.cells:
        one, many, share = [], [], []
        for _ in range(args.rounds):
            one.append(single(args, cell))
            tps, comm = processes(args, cell)
            many.append(tps)
            share.append(comm)
        rows.append({"cell": cell, "one_process_tokens_per_s": statistics.median(one),
                     "processes_tokens_per_s": statistics.median(many),
                     "speedup": statistics.median(many) / statistics.median(one),
                     "communication_share": statistics.median(share)})
    N = args.processes
    print(f"H {args.size}, global batch {args.batch}, {args.steps} timed steps, median of {args.rounds} rounds, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print(f"| cell | 1 process × {N} threads (tokens/s) | {N} processes × 1 thread (tokens/s) | speed-up | "
          f"communication share of a step |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cell']} | {r['one_process_tokens_per_s']:,.0f} | {r['processes_tokens_per_s']:,.0f} | "
              f"{r['speedup']:.2f}× | {r['communication_share']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
