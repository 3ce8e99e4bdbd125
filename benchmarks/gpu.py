"""Every cell's training throughput and decoding speed on an accelerator, with cuDNN's ``torch.nn.LSTM``
beside them in the same run, in each precision.

Training: one recurrent layer, forward + backward + Adam update on a [T, B, H] batch (the shapes of
``benchmarks/cells.py``: B 64, T 20, H 512), timed with the device synchronised around each step, in fp32
and under ``torch.autocast`` in bf16 and fp16 (fp16 with a gradient scaler): tokens/s and the ratio to
``nn.LSTM`` in the same precision. Decoding: greedy and beam-3 captions/s of a random-weight Show-and-Tell
captioner of each cell (hidden 512, vocabulary 10,000), 500 images at a time.

Ready for a GPU machine; on a machine without one, ``--device cpu`` runs the same table (small sizes make it
a smoke test).

    python benchmarks/gpu.py                               # --device cuda
    python benchmarks/gpu.py --cells lstm bn_rhn --precisions fp32 bf16 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import CELLS, TorchLSTM  # noqa: E402  (the same layers and the same reference as benchmarks/cells.py)

from bnrhn.nn import Recurrent  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_tokens_per_s(layer, args, device, precision: str) -> float:
    x = torch.randn(args.steps, args.batch, args.size, device=device)
    target = torch.randn(args.steps, args.batch, args.size, device=device)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    times = []
    for k in range(args.warmup + args.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision in DTYPES):
            out, _ = layer(x)
            loss = (out.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        synchronize(device)
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    return args.steps * args.batch / statistics.median(times)


def decode_captions_per_s(cell: str, args, device, method: str) -> float:
    from bnrhn.decoding import beam_search, greedy
    from bnrhn.models import CaptionerConfig, build_captioner

    torch.manual_seed(0)
    model = build_captioner(CaptionerConfig(vocab_size=args.vocab, feature_size=1280, embed_size=args.size,
                                            hidden_size=args.size, cell=cell)).to(device).eval()
    feats = torch.randn(args.images, 1280, device=device)
    run = (lambda: greedy(model, feats, 20)) if method == "greedy" else (lambda: beam_search(model, feats, 3, 20))
    run()  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    run()
    synchronize(device)
    return args.images / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--cells", nargs="+", default=CELLS)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="time steps T")
    p.add_argument("--size", type=int, default=512, help="input and hidden size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--images", type=int, default=500, help="images per decoding")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    from bnrhn.devices import resolve_device

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for precision in args.precisions:
        torch.manual_seed(0)
        reference = training_tokens_per_s(TorchLSTM(args.size, args.size).to(device), args, device, precision)
        rows.append({"precision": precision, "cell": "torch.nn.LSTM", "tokens_per_s": reference, "ratio": 1.0})
        for cell in args.cells:
            torch.manual_seed(0)
            tps = training_tokens_per_s(Recurrent(cell, args.size, args.size).to(device), args, device, precision)
            rows.append({"precision": precision, "cell": cell, "tokens_per_s": tps, "ratio": tps / reference})
    decode = [{"cell": c, "greedy": decode_captions_per_s(c, args, device, "greedy"),
               "beam3": decode_captions_per_s(c, args, device, "beam")} for c in args.cells]
    print(f"{name}, torch {torch.__version__}; training: B {args.batch}, T {args.steps}, H {args.size}, "
          f"median of {args.repeats}\n")
    print("| precision | cell | training tokens/s | × nn.LSTM |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['cell']} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f} |")
    print(f"\n| cell | greedy captions/s | beam-3 captions/s |  ({args.images} images, vocabulary {args.vocab})\n"
          "|---|---:|---:|")
    for r in decode:
        print(f"| {r['cell']} | {r['greedy']:,.0f} | {r['beam3']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "training": rows,
                                               "decode": decode}, indent=2))


if __name__ == "__main__":
    main()
