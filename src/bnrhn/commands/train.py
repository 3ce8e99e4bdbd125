"""``bnrhn train``: train an image captioner (Show and Tell / Show, Attend and Tell) with any cell."""

from __future__ import annotations

import argparse

from bnrhn.commands._caption_args import S, add_compute_args, add_data_args, add_quiet, add_training_args

# Flags that may change when a run is resumed (budgets and early stopping); everything else comes from the run.
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "max_minutes", "patience", "device", "progress")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an image captioner",
        description=(
            "Train a captioner on frozen CNN features: Show and Tell or Show, Attend and Tell with any recurrent "
            "cell. Each epoch the validation split is captioned and scored (CIDEr, BLEU-4); the best checkpoint "
            "by CIDEr is kept as RUN_DIR/best.pt, the latest as RUN_DIR/last.pt (atomic writes; Ctrl-C saves a "
            "resumable checkpoint; --resume continues exactly). Every step is logged to RUN_DIR/log.csv and log.jsonl; "
            "RUN_DIR/loss.png plots the loss (with --objective scst also the mean sampled reward) and validation "
            "CIDEr, the starting checkpoint's (--init) at step 0."
        ),
        epilog="Example: bnrhn train --dataset flickr8k --cell bn_rhn --epochs 10 --run-dir runs/f8k-bnrhn; then "
               "self-critical fine-tuning: bnrhn train --objective scst --init runs/f8k-bnrhn/best.pt --lr 5e-5 "
               "--epochs 5 --run-dir runs/f8k-bnrhn-scst. "
               "Data-parallel (docs/distributed.md): torchrun --nproc_per_node 2 -m bnrhn train ... (same flags)",
    )
    p.add_argument("--config", metavar="FILE.json", help="settings from a JSON file (a run's config.json works); flags override it")
    p.add_argument("--run-dir", default=S, metavar="DIR", help="output folder (default runs/caption)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last.pt with its own settings "
                        f"(only {', '.join('--' + o.replace('_', '-') for o in RESUMABLE_OVERRIDES[:5])} may change)")
    p.add_argument("--overwrite", action="store_true", default=S, help="replace an existing run in --run-dir")
    add_data_args(p)
    add_training_args(p, single_run=True)
    add_compute_args(p)
    add_quiet(p)
    p.set_defaults(func=run)


# the settings a fine-tuning run (--init) takes from its checkpoint unless given as flags: what the data,
# the vocabulary and the model's shape depend on
# (not the machine's paths: --weights and --cache-dir stay this machine's; a checkpoint trained on other
# features is refused when the data is read)
INIT_SETTINGS = ("dataset", "images", "max_train_images", "max_val_images", "max_test_images", "synthetic_sizes",
                 "strict", "min_count", "max_caption_len", "encoder", "resize", "model",
                 "cell", "cell_options", "embed_size", "hidden_size", "num_layers", "dropout", "attention_size",
                 "alpha_c", "feature_norm", "batching")


def init_settings(path) -> dict:
    """The data and model settings (:data:`INIT_SETTINGS`) of the captioning checkpoint ``path``."""
    from bnrhn.cells import legacy_statistics
    from bnrhn.training import load_checkpoint

    if path.is_dir():
        path = path / ("best.pt" if (path / "best.pt").exists() else "last.pt")
    task = load_checkpoint(path).get("task") or {}  # clear FileNotFoundError / ValueError naming the file
    if "config" not in task:
        raise ValueError(f"--init {path} is not a captioning run's checkpoint")
    saved = {k: v for k, v in task["config"].items() if k in INIT_SETTINGS}
    saved["cell_options"] = legacy_statistics(saved.get("cell", "lstm"), saved.get("cell_options") or {})
    return saved


def run(args) -> int:
    import os
    import sys
    from pathlib import Path

    from bnrhn.captioning import CaptionConfig, train
    from bnrhn.cells import legacy_statistics
    from bnrhn.commands._caption_args import config_from_args
    from bnrhn.training import TrainingDiverged, load_checkpoint

    if args.resume:
        run_dir = Path(getattr(args, "run_dir", "runs/caption"))
        ckpt = load_checkpoint(run_dir / "last.pt")  # clear FileNotFoundError / ValueError naming the file
        task = ckpt.get("task") or {}
        if "config" not in task:
            raise ValueError(f"{run_dir / 'last.pt'} is not a captioning run's checkpoint")
        saved = dict(task["config"])
        # a run saved before batching and estimators were recorded: it trained on bucketed batches with the
        # momentum estimator, and resumes so
        saved.setdefault("batching", "bucketed")
        saved["cell_options"] = legacy_statistics(saved.get("cell", "lstm"), saved.get("cell_options") or {})
        given = {k: v for k, v in vars(args).items() if k in CaptionConfig.__dataclass_fields__}
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE_OVERRIDES and k != "run_dir" and saved.get(k) != v)
        if changed:
            raise ValueError(
                "--resume continues a run with its own settings; these flags differ from the run's: "
                + ", ".join("--" + k.replace("_", "-") for k in changed)
                + f". Drop them, or start a new run in another --run-dir"
            )
        saved.update({k: given[k] for k in RESUMABLE_OVERRIDES if k in given})
        saved["run_dir"] = str(run_dir)
        if args.quiet:
            saved["progress"] = False
        cfg = CaptionConfig.from_dict(saved, str(run_dir / "last.pt"))
    else:
        base = CaptionConfig.load(args.config).to_dict() if args.config else None
        if getattr(args, "init", None):  # over a --config file's settings too; flags still win
            base = {**(base or {}), **init_settings(Path(args.init))}
        cfg = config_from_args(args, base)
    if cfg.progress and not sys.stderr.isatty():
        cfg.progress = False
    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"bnrhn train: error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if (Path(cfg.run_dir) / "last.pt").exists():
            print(f"\ninterrupted: resume with  bnrhn train --resume --run-dir {cfg.run_dir}", file=sys.stderr)
        else:
            print("\ninterrupted before the first checkpoint; run the same command again "
                  "(feature extraction resumes where it stopped)", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # data-parallel: rank 0 reports the run
    best = result.best
    scores = ", ".join(f"{k} {best[k]:.3f}" for k in ("CIDEr", "BLEU-4", "loss") if k in best)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_s:,.0f} tokens/s, "
          f"{result.n_params:,} parameters; stopped: {result.stopped})")
    print(f"best checkpoint: {result.best_checkpoint}" + (f" (step {best.get('step')}: {scores})" if best else ""))
    print(f"logs: {result.run_dir / 'log.csv'}, {result.run_dir / 'log.jsonl'}")
    return 0
