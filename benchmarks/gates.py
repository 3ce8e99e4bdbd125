"""Elementwise work of the recurrent steps: PyTorch's kernels against the fused CPU gate kernels (bnrhn.kernels).

Prints one table: µs per call (median of interleaved rounds) of

- tanh and σ of a [B, 3H] float32 tile: ``torch.tanh`` / ``torch.sigmoid`` against the kernels' own;
- one highway layer's elementwise forward and backward (free carry, G = 3): the composed PyTorch operations
  that the cells run without the extension (``bnrhn.kernels.composed``), against the fused ones;
- one BN-LSTM step's elementwise work (gates and memory, output; their backwards), both ways.

    python benchmarks/gates.py                    # B 64, H 128 and 512, 1 thread
    python benchmarks/gates.py --sizes 256 --threads 2

The speed of PyTorch's tanh depends on the processor (MKL's vector math): say which one you measured on
(``lscpu``: model name, AVX-512 or AVX2 only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnrhn import kernels
from bnrhn.kernels import composed


def highway_step(ops, a, s, ds):
    act = a.clone()
    ops.highway_forward(act, s, 3)
    ops.highway_backward(ds, act, s, 3)


def lstm_step(ops, a, c_prev, dh, dc):
    act = a.clone()
    c = ops.lstm_gates_forward(act, c_prev)
    _, tc = ops.lstm_output_forward(act, c)
    ops.lstm_output_backward(dh, act, tc)
    ops.lstm_gates_backward(dc, dh, act, c_prev, tc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="hidden sizes H")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=50, help="calls per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = kernels.build()  # timed even where the automatic choice would not use them (the status line says)
    print(kernels.status())
    g = torch.Generator().manual_seed(0)
    B = args.batch
    cases = {}
    for H in args.sizes:
        x = torch.randn(B, 3 * H, generator=g) * 2
        a4 = torch.randn(B, 4 * H, generator=g) * 2
        s, ds, dc = (torch.randn(B, H, generator=g) for _ in range(3))
        cases[(f"tanh [{B}, {3 * H}]", H)] = (lambda x=x: torch.tanh(x), lambda x=x: ops.tanh(x))
        cases[(f"sigmoid [{B}, {3 * H}]", H)] = (lambda x=x: torch.sigmoid(x), lambda x=x: ops.sigmoid(x))
        cases[(f"highway layer fwd+bwd, H {H}", H)] = tuple(
            lambda o=o, x=x, s=s, ds=ds: highway_step(o, x, s, ds) for o in (composed, ops))
        cases[(f"BN-LSTM step elementwise fwd+bwd, H {H}", H)] = tuple(
            lambda o=o, a=a4, c=s, dh=ds, dc=dc: lstm_step(o, a, c, dh, dc) for o in (composed, ops))
    times = {(key, k): [] for key in cases for k in (0, 1)}
    for fns in cases.values():
        for fn in fns:
            fn()
    for _ in range(args.rounds):
        for key, fns in cases.items():
            for k, fn in enumerate(fns):
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    fn()
                times[(key, k)].append((time.perf_counter() - t0) / args.reps * 1e6)
    print(f"\nµs per call, median of {args.rounds} interleaved rounds × {args.reps} calls, {args.threads} thread(s), "
          f"torch {torch.__version__}, ATen CPU capability {kernels.capability()}")
    print("| work | PyTorch kernels | fused kernels | speed-up |")
    print("|---|---:|---:|---:|")
    for key in cases:
        plain_us, fused_us = (statistics.median(times[(key, k)]) for k in (0, 1))
        print(f"| {key[0]} | {plain_us:.1f} | {fused_us:.1f} | {plain_us / fused_us:.2f}× |")


if __name__ == "__main__":
    main()
