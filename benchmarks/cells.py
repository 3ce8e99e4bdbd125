"""Training-step throughput of every cell, side by side with torch.nn.LSTM in the same run.

A step is forward + backward + Adam update (the trainer's: ``bnrhn.training.build_optimizer``, PyTorch's fused
update) of one recurrent layer on a [T, B, I] batch with a mean-squared loss on the outputs. Achieved GFLOP/s
counts the matrix products only: forward 2·B·T·G·H·(I + H) for a G-gate cell (per highway layer for the RHN
family), and backward twice the forward (gradients with respect to inputs and weights), so 3× forward in all.

With ``--products``, every cell's matrix products are also timed alone: the same products, of the
same shapes, that its training step computes (input projection for all steps and its two backward
products; per step and layer the recurrent product and its input gradient; per layer the recurrent
weight gradient over the whole sequence), into preallocated outputs, with no elementwise work in
between. Their GFLOP/s, as a multiple of nn.LSTM's whole step, is the most a cell can reach with
those product shapes: a ceiling that no fusion of the elementwise work can raise.

Cells are timed in interleaved rounds (every cell once per round) so that a noisy shared machine affects all
of them alike. ms/step is the median over rounds; the two "× nn.LSTM" columns are the median of each round's
ratio (the cell's step against nn.LSTM's in the same round, seconds apart), so that the machine's drift between
rounds cancels — they need not equal the ratios of the tokens/s and GFLOP/s columns, which are medians over
rounds — and "GFLOP× range" gives the GFLOP/s ratio's range over the rounds. The products-only ceiling is the
median products time against nn.LSTM's median step.

    python benchmarks/cells.py                  # B=64, T=20, I=H=512, RHN depth 3
    python benchmarks/cells.py --rounds 10 --batch 32 --json out.json
    python benchmarks/cells.py --products       # also the products-only ceiling of each cell
    python benchmarks/cells.py --cells bn_rhn bn_rhn:stats=momentum   # a cell with options: NAME:KEY=VALUE,...
    python benchmarks/cells.py --compiled bn_rhn rhn    # also torch.compile of those cells' composed steps
    python benchmarks/cells.py --reference bn_rhn bn_lstm   # also their reference steps, eager (fused=False)

``--compiled`` adds, for each cell named, a row for ``torch.compile`` of the whole layer with the cell's
composed reference step (``Recurrent(..., fused=False)``, no hand-written autograd nodes): Inductor fuses the
elementwise work of the unrolled time loop itself. Its compilation time (warm-up) is printed, not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from bnrhn import kernels
from bnrhn.kernels import onednn
from bnrhn.nn import Recurrent
from bnrhn.freed_memory import keep_freed_memory
from bnrhn.training import build_optimizer

CELLS = ["rnn", "lstm", "gru", "mut1", "mut2", "mut3", "rhn", "bn_rhn", "bn_rhn_tf", "bn_lstm"]


class TorchLSTM(nn.Module):
    """torch.nn.LSTM with the same call shape as our runner."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size)

    def forward(self, x):
        return self.lstm(x)

    def matmul_flops(self, batch: int, steps: int) -> int:
        return 2 * batch * steps * 4 * self.lstm.hidden_size * (self.lstm.input_size + self.lstm.hidden_size)


def parse_cell_spec(spec: str) -> tuple[str, dict]:
    """``"bn_rhn:stats=momentum,min_rows=8"`` → ``("bn_rhn", {"stats": "momentum", "min_rows": 8})``."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--cells: expected NAME:KEY=VALUE,..., got {spec!r}")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return name, opts


def bypassing(step):
    def bypassed_step() -> None:
        with kernels.bypassed():
            step()

    return bypassed_step


def paired_ratios(ref_ms: list[float], cell_ms: list[float]) -> tuple[float, float, float]:
    """A cell's speed against the reference's, round by round (each round's ``ref / cell`` step time): the median,
    the lowest and the highest of those ratios."""
    speed = [ref / cell for ref, cell in zip(ref_ms, cell_ms, strict=True)]
    return statistics.median(speed), min(speed), max(speed)


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    opt = build_optimizer(model.parameters(), "adam", lr=1e-4)

    def step() -> None:
        out, _ = model(x)
        loss = (out - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def product_columns(cell) -> tuple[int, list[int]]:
    """Output widths of a cell's products: (input projection, [recurrent product of each highway layer])."""
    if isinstance(cell, TorchLSTM):
        return 4 * cell.lstm.hidden_size, [4 * cell.lstm.hidden_size]
    H = cell.hidden_size
    if hasattr(cell, "gate_names"):  # the RHN family
        G, L = len(cell.gate_names), cell.depth
        return (L if cell.input_at == "every" else 1) * G * H, [G * H] * L
    G = cell.matmul_flops(1, 1) // (2 * H * (cell.input_size + H))
    return G * H, [G * H]


def make_products(input_size: int, hidden_size: int, columns: tuple[int, list[int]], batch: int, steps: int):
    """The matrix products of one training step alone, into preallocated outputs (see the module docstring)."""
    I, H, B, T = input_size, hidden_size, batch, steps
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    in_cols, rec_cols = columns
    x, w_in, d_in = rand(T * B, I), rand(in_cols, I), rand(T * B, in_cols)
    xp, dx, dw_in = torch.empty(T * B, in_cols), torch.empty(T * B, I), torch.empty(in_cols, I)
    layers = [(rand(B, H), rand(G, H), rand(B, G), torch.empty(B, G), torch.empty(B, H),
               rand(T * B, G), rand(T * B, H), torch.empty(G, H)) for G in rec_cols]

    def step() -> None:
        torch.mm(x, w_in.t(), out=xp)
        for _ in range(T):
            for h, w, da, a, dh, _, _, _ in layers:
                torch.mm(h, w.t(), out=a)
                torch.mm(da, w, out=dh)
        for *_, da_all, h_all, dw in layers:
            torch.mm(da_all.t(), h_all, out=dw)
        torch.mm(d_in, w_in, out=dx)
        torch.mm(d_in.t(), x, out=dw_in)

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
    ap.add_argument("--products", action="store_true",
                    help="also time each cell's matrix products alone (the ceiling its GFLOP/s can reach)")
    ap.add_argument("--compiled", nargs="*", default=[], metavar="CELL",
                    help="also torch.compile of these cells' composed steps (rows 'compiled NAME')")
    ap.add_argument("--reference", nargs="*", default=[], metavar="CELL",
                    help="also these cells' reference steps, eager (rows 'NAME, reference': Recurrent(..., "
                         "fused=False), no hand-written autograd node, kernel or deferred weight gradient)")
    ap.add_argument("--composed", nargs="*", default=[], metavar="CELL",
                    help="also these cells with the fused CPU gate kernels bypassed (rows 'NAME, composed': "
                         "PyTorch's kernels for tanh, σ and the state update, as where the kernels cannot be built)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    keep_freed_memory()  # as the CLI does: each step's large tensors reuse the last step's memory
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, N = args.batch, args.steps, args.size
    x = torch.randn(T, B, N)
    target = torch.randn(T, B, N)

    models: dict[str, nn.Module] = {"torch.nn.LSTM": TorchLSTM(N, N)}
    def layer_of(spec: str, **runner_options) -> Recurrent:
        name, opts = parse_cell_spec(spec)
        if "rhn" in name:
            opts = {"depth": args.depth, **opts}
        return Recurrent(name, N, N, **runner_options, **opts)

    for spec in args.cells:
        models[spec] = layer_of(spec)
    compiled: dict[str, nn.Module] = {}
    for spec in args.compiled:
        layer = layer_of(spec, use_vendor_kernel=False, fused=False)  # Inductor gets plain PyTorch operations
        models[f"compiled {spec}"] = layer
        compiled[f"compiled {spec}"] = torch.compile(layer)
    for spec in args.reference:
        models[f"{spec}, reference"] = layer_of(spec, use_vendor_kernel=False, fused=False)
    for spec in args.composed:
        models[f"{spec}, composed"] = layer_of(spec)
    steps = {name: make_step(compiled.get(name, m).train(), x, target) for name, m in models.items()}
    for spec in args.composed:
        steps[f"{spec}, composed"] = bypassing(steps[f"{spec}, composed"])
    print(kernels.status())
    if args.products:
        for name, m in models.items():
            cell = m if isinstance(m, TorchLSTM) else m.cells[0]
            columns = product_columns(cell)
            in_cols, rec_cols = columns
            counted = 2 * B * T * (in_cols * N + sum(rec_cols) * N)
            assert counted == m.matmul_flops(B, T), f"{name}: product shapes do not match its FLOP count"
            steps[f"{name} products"] = make_products(N, N, columns, B, T)
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(max(args.warmup, 2 if name in compiled else 0)):
            step()
        if name in compiled:
            print(f"{name}: compiled and warmed up in {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    rows = []
    for name, model in models.items():
        sec = statistics.median(times[name])
        flops = 3 * model.matmul_flops(B, T)
        row = {"cell": name, "ms_per_step": 1e3 * sec, "tokens_per_s": B * T / sec, "gflops": flops / sec / 1e9,
               "params": sum(p.numel() for p in model.parameters()), "flops": flops,
               "round_ms": [1e3 * t for t in times[name]]}
        if args.products:
            row["products_ms"] = 1e3 * statistics.median(times[f"{name} products"])
            row["products_gflops"] = flops / row["products_ms"] / 1e6
        rows.append(row)
    ref = rows[0]
    for r in rows:  # each round's ratio to nn.LSTM's step of the same round; their median and range
        median, low, high = paired_ratios(ref["round_ms"], r["round_ms"])
        work = r["flops"] / ref["flops"]
        r["tokens_ratio"] = median
        r["gflops_ratio"] = work * median
        r["gflops_ratio_range"] = [work * low, work * high]
        if args.products:
            r["products_ratio"] = r["products_gflops"] / ref["gflops"]

    print(f"Training step (forward + backward + Adam), B={B}, T={T}, I=H={N}, RHN depth {args.depth}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    extra_head = f" {'products ms':>11s} | {'ceiling × nn.LSTM':>17s} |" if args.products else ""
    extra_rule = f"{'-' * 13}|{'-' * 19}|" if args.products else ""
    print(f"| {'cell':22s} | {'params':>9s} | {'ms/step':>8s} | {'tokens/s':>9s} | {'× nn.LSTM':>9s} | {'GFLOP/s':>8s} | {'× nn.LSTM':>9s} | {'GFLOP× range':>12s} |" + extra_head)
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 14}|" + extra_rule)
    for r in rows:
        extra = f" {r['products_ms']:11.1f} | {r['products_ratio']:17.2f} |" if args.products else ""
        low, high = r["gflops_ratio_range"]
        print(f"| {r['cell']:22s} | {r['params']:9d} | {r['ms_per_step']:8.1f} | {r['tokens_per_s']:9.0f} | "
              f"{r['tokens_ratio']:9.2f} | {r['gflops']:8.1f} | {r['gflops_ratio']:9.2f} | {f'{low:.2f}–{high:.2f}':>12s} |"
              + extra)
    print(onednn.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows, "recurrent_products": onednn.summary()}, f, indent=2)


if __name__ == "__main__":
    main()
