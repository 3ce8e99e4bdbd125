"""Feature extraction speed (MobileNetV2, 224²), one optimisation at a time, side by side in one run.

CNN rows time the frozen trunk alone on a preprocessed batch (``--batch`` images, median of
``--rounds``), each row adding one step to the one above:

1. the network as loaded (NCHW, batch norm as separate layers), eager;
2. batch norm folded into the convolutions;
3. channels-last memory format (oneDNN's preferred layout for depthwise convolutions);
4. the batch run ``CPU_CHUNK`` images at a time (what the encoder does on CPU: the early feature maps of
   a few images stay in the last-level cache, those of a whole batch do not);
5. ``torch.compile`` with Inductor's ``freezing`` (weights as constants, prepacked for oneDNN, ReLU6
   and the residual additions fused into the convolutions), chunks as in row 4 — its compilation time
   is printed, not timed.

Each row's largest absolute difference from row 1 is printed beside it (float16 precision: 2⁻¹¹ relative).

End-to-end rows run ``bnrhn.encoders.extract_features`` — decode, preprocess, CNN, write the float16
cache — over ``--images`` real image files, with the eager and the compiled CNN; the extractor decodes
the next batch in a second thread while the CNN runs.

    python benchmarks/features.py                     # Flickr8k images from ../shared, 2 threads
    python benchmarks/features.py --images 512 --threads 2 --json out.json
    python benchmarks/features.py --folder DIR        # any folder of images
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bnrhn.encoders import build_encoder, extract_features, load_image, stack_images
from bnrhn.encoders.base import CPU_CHUNK, _fuse_conv_bn
from bnrhn.encoders.compiled import CompiledTrunk

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"


def time_cnn(run, x: torch.Tensor, rounds: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        out = run(x)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times), out.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=str(DEFAULT_FOLDER), help="image files (default: Flickr8k in ../shared)")
    p.add_argument("--images", type=int, default=512, help="images for the end-to-end rows")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = sorted(q for q in Path(args.folder).iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"--folder {args.folder}: no .jpg/.jpeg/.png images")
    paths = paths[: args.images]
    encoder = build_encoder("mobilenet_v2")
    x_cl = stack_images([encoder.preprocess(load_image(q)) for q in paths[: args.batch]])
    batch = x_cl.contiguous()

    def chunked(run):
        return lambda x: torch.cat([run(part) for part in x.split(CPU_CHUNK)])

    plain = copy.deepcopy(encoder.model.features).eval()
    folded = _fuse_conv_bn(copy.deepcopy(plain)).eval()
    channels_last = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    variants = [("1. as loaded (NCHW, separate batch norm)", plain, batch),
                ("2. + batch norm folded", folded, batch),
                ("3. + channels-last", channels_last, x_cl),
                (f"4. + {CPU_CHUNK} images at a time", chunked(channels_last), x_cl)]
    if not args.no_compile:
        t0 = time.perf_counter()
        compiled = CompiledTrunk(channels_last, CPU_CHUNK, print)  # what extraction runs (falls back, saying so)
        with torch.inference_mode():
            compiled(x_cl[:CPU_CHUNK])
        print(f"torch.compile: compiled and warmed up in {time.perf_counter() - t0:.1f} s")
        variants.append((f"5. + torch.compile (freezing){'' if compiled.engine == 'compiled' else ': fell back'}",
                         chunked(compiled), x_cl))
    rows, ref = [], None
    for name, run, x in variants:
        rate, out = time_cnn(run, x, args.rounds)
        ref = out if ref is None else ref
        rows.append(dict(what=name, images_per_s=rate, max_abs_diff=float((out - ref).abs().max())))

    for compile in ("no",) + (() if args.no_compile else ("yes",)):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            fs = extract_features(paths, encoder, cache, grid=True, batch_size=args.batch, progress=False,
                                  log=lambda m: None, compile=compile)
            wall = time.perf_counter() - t0
        rows.append(dict(what=f"end to end, {fs.meta['cnn']} CNN ({len(paths)} files, grid + pooled)",
                         images_per_s=len(paths) / fs.seconds, wall_s=wall, max_abs_diff=None))

    print(f"# MobileNetV2 features, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| what | images/s | × row 1 | max abs. difference vs row 1 |")
    print("|---|---:|---:|---:|")
    for r in rows:
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(f"| {r['what']} | {r['images_per_s']:.1f} | {r['images_per_s'] / rows[0]['images_per_s']:.2f} | {diff} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
