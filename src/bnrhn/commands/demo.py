"""``bnrhn demo``: the BN-RHN paper's comparison (LSTM vs RHN vs BN-RHN) on the synthetic scenes, in minutes."""

from __future__ import annotations

import argparse

from bnrhn.commands._caption_args import add_device
from bnrhn.commands.compare import add_compare_args

# Measured on 2 CPU cores (see docs/results.md): scene generation, features and three runs in under 10 minutes.
DEMO_BUDGET = "1500"
DEMO_SYNTHETIC_SIZES = (1500, 150, 150)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="compare LSTM, RHN and BN-RHN captioners on generated scenes (no data set needed, minutes on a CPU)",
        description=(
            "Generate the synthetic shape scenes (1,500 training, 150 validation, 150 test images), extract frozen "
            "MobileNetV2 features, train a Show-and-Tell captioner with each cell under the same budget and seed, "
            "caption the test images with beam search and write the comparison report (results.md, loss.png, "
            "gallery.html) - everything 'bnrhn compare' does, with settings chosen to finish in minutes."
        ),
        epilog="Example: bnrhn demo --out runs/demo   (then open runs/demo/results.md and runs/demo/gallery.html)",
    )
    p.add_argument("--out", metavar="DIR", help="report folder (default: runs/demo-YYYYMMDD-HHMMSS)")
    p.add_argument("--budget", default=DEMO_BUDGET, metavar="STEPS|TIME",
                   help=f"training budget per cell: steps or time such as 2m (default {DEMO_BUDGET} steps)")
    p.add_argument("--cache-dir", metavar="DIR", help="scene and feature cache (default $BNRHN_CACHE or ~/.cache/bnrhn)")
    p.add_argument("--weights", metavar="PATH", help="MobileNetV2 weights file (default: found offline, see 'bnrhn features --help')")
    add_compare_args(p, ["lstm", "rhn", "bn_rhn"], jobs_help="the CPU cores, at most one per run; 1 under torchrun")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="CPU threads for PyTorch, per run (default 1: the demo's small models lose more to thread "
                        "synchronisation than they gain; measured 3.0 min with 1 thread, 5.7 min with 2 on 2 cores, "
                        "one run at a time)")
    add_device(p, default="auto")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(args) -> int:
    import os
    import time
    from pathlib import Path

    from bnrhn.captioning import demo_config
    from bnrhn.commands.compare import run_settings
    from bnrhn.experiments.compare import CompareSettings, parse_budget
    from bnrhn.experiments.runner import command_line

    from bnrhn.commands.lm import set_threads

    from bnrhn.training.distributed import environment_world_size

    if args.seeds < 1:
        raise ValueError(f"--seeds must be ≥ 1, got {args.seeds}")
    # by default one run per core (one at a time under torchrun, whose processes train each run together)
    jobs = args.jobs or (1 if environment_world_size() > 1 else min(available_cores(), len(args.cells) * args.seeds))
    set_threads(args.threads * jobs)  # the runner gives each of the runs side by side its share
    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    steps, minutes = parse_budget(args.budget)
    extra = {k: v for k, v in (("cache_dir", args.cache_dir), ("weights", args.weights)) if v}
    base = demo_config(run_dir=out / "runs", synthetic_sizes=DEMO_SYNTHETIC_SIZES, progress=not args.quiet,
                       device=args.device, **extra)
    command = command_line(args.argv)
    if not args.out:  # the report's reproduce line must name the folder it was written to
        command += f" --out {out}"
    settings = CompareSettings(
        cells=list(args.cells), base=base, out_dir=out, budget_steps=steps, budget_minutes=minutes,
        seeds=[args.seed + k for k in range(args.seeds)], beam=args.beam, gallery_size=args.gallery,
        overwrite=args.overwrite, resume=args.resume, command=command, jobs=jobs,
    )
    rc = run_settings(settings)
    if rc == 0 and int(os.environ.get("RANK", "0")) == 0:
        print(f"\nReport: {out / 'results.md'}\nGallery (open in a browser): {(out / 'gallery.html').resolve()}")
    return rc
