"""``bnrhn compare``: train several caption decoders under one protocol and write the paper's table."""

from __future__ import annotations

import argparse

from bnrhn.commands._caption_args import add_compute_args, add_data_args, add_quiet, add_training_args, positive_int


def add_compare_args(p: argparse.ArgumentParser, default_cells: list[str], jobs_help: str = "1") -> None:
    p.add_argument("--cells", nargs="+", default=default_cells, metavar="CELL",
                   help=f"decoder cells to compare (default: {' '.join(default_cells)}); see 'bnrhn cells'")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="repeat with N seeds (seed, seed+1, ...) and report mean ± std (default 1)")
    p.add_argument("--beam", type=int, default=3, metavar="K", help="beam size for the test captions (3)")
    p.add_argument("--gallery", type=int, default=12, metavar="N", help="test images in gallery.html (12)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing --out folder (only bnrhn's own report files and runs are replaced)")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted comparison in --out: finished runs are kept, an interrupted one "
                        "continues from its last checkpoint (repeat the original command and add --resume)")
    p.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                   help="train N runs at a time, longest first, each in its own process with 1/N of the CPU threads; "
                        "each run's messages then go to output.log in its folder, and its result is the one it has "
                        "alone with as many threads (with a time --budget, runs side by side do less in that time) "
                        f"(default {jobs_help})")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train several decoders (e.g. lstm rhn bn_rhn) under one protocol and compare them",
        description=(
            "Train each decoder cell with the same data, encoder, sizes, budget and seed; caption the test split "
            "with beam search; score BLEU-1..4, ROUGE-L, METEOR and CIDEr; write results.md/results.json (the "
            "BN-RHN paper's table, best in bold), loss.png (training loss and validation CIDEr vs steps), "
            "gallery.html (test images with every model's caption) and the runs' checkpoints into --out."
        ),
        epilog="Example: bnrhn compare --cells lstm rhn bn_rhn --dataset flickr8k --budget 20m --out runs/f8k-compare",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="experiment folder (must not exist, unless --overwrite)")
    p.add_argument("--budget", required=True, metavar="STEPS|TIME",
                   help="training budget per run: steps (e.g. 3000; deterministic) or time (e.g. 10m, 1.5h)")
    add_compare_args(p, ["lstm", "rhn", "bn_rhn"])
    p.add_argument("--config", metavar="FILE.json", help="base settings from a JSON file (a run's config.json works)")
    add_data_args(p)
    add_training_args(p, single_run=False)
    add_compute_args(p)
    add_quiet(p)
    p.set_defaults(func=run)


def settings_from_args(args, base_defaults: dict | None = None):
    """CompareSettings from parsed arguments (``base_defaults`` = the command's own base config)."""
    from pathlib import Path

    from bnrhn.captioning import CaptionConfig
    from bnrhn.commands._caption_args import config_from_args
    from bnrhn.experiments.compare import CompareSettings, parse_budget
    from bnrhn.experiments.runner import command_line

    base = dict(base_defaults or {})
    if getattr(args, "config", None):
        base.update(CaptionConfig.load(args.config).to_dict())
    cfg = config_from_args(args, base)
    steps, minutes = parse_budget(args.budget)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be ≥ 1, got {args.seeds}")
    return CompareSettings(
        cells=list(args.cells), base=cfg, out_dir=Path(args.out), budget_steps=steps, budget_minutes=minutes,
        seeds=[args.seed + k for k in range(args.seeds)], beam=args.beam, gallery_size=args.gallery,
        overwrite=args.overwrite, resume=args.resume, command=command_line(args.argv), jobs=args.jobs or 1,
    )


def run_settings(settings) -> int:
    """Run a comparison; Ctrl-C and divergence end with a message saying how to go on."""
    import sys

    from bnrhn.experiments.compare import run_compare

    try:
        run_compare(settings)
    except KeyboardInterrupt:
        again = settings.command if "--resume" in settings.command.split() else f"{settings.command} --resume"
        print(f"\ninterrupted; finished runs and the current run's last checkpoint are kept in {settings.out_dir}.\n"
              f"Continue with:  {again}", file=sys.stderr)
        return 130
    return 0


def run(args) -> int:
    return run_settings(settings_from_args(args))
