"""``bnrhn lm train|sample|evaluate|experiment``: character-level language models."""

from __future__ import annotations

import sys

from bnrhn.commands._caption_args import add_compute_args, add_device

# Options of `lm train` whose value may change when resuming (budgets, device, output).
_RESUME_OVERRIDES = ("epochs", "max_steps", "max_minutes", "device", "progress", "patience", "precision")


def _add_train_options(p) -> None:
    d = p.add_argument_group("corpus (one of)")
    d.add_argument("--text", metavar="FILE", help="one UTF-8 text file, split into train/validation/test by fractions")
    d.add_argument("--train", metavar="FILE", help="training text (with --valid, optionally --test)")
    d.add_argument("--valid", metavar="FILE", help="validation text")
    d.add_argument("--test", metavar="FILE", help="test text")
    d.add_argument("--ptb", metavar="DIR",
                   help="folder with word-level Penn Treebank ptb.{train,valid,test}.txt, converted to characters "
                        "('_' between words, one sentence per line; see docs/language_models.md)")
    d.add_argument("--valid-fraction", type=float, help="with --text: validation fraction (default 0.05)")
    d.add_argument("--test-fraction", type=float, help="with --text: test fraction (default 0.05)")
    d.add_argument("--ptb-unk", metavar="CHAR", help="with --ptb: replace <unk> by this one character (default: keep '<unk>')")
    m = p.add_argument_group("model")
    m.add_argument("--cell", help="recurrent cell (see `bnrhn cells`; default lstm)")
    m.add_argument("--hidden", type=int, help="hidden size (default 256)")
    m.add_argument("--layers", type=int, help="stacked layers (default 1)")
    m.add_argument("--embed", type=int, help="character embedding size (default min(hidden, 128); hidden with --tie-weights)")
    m.add_argument("--tie-weights", action="store_true", default=None, help="share embedding and softmax weights (embed = hidden)")
    m.add_argument("--input-dropout", type=float, help="variational dropout on the embeddings (default 0)")
    m.add_argument("--dropout", type=float, help="variational dropout on every layer's output (default 0)")
    m.add_argument("--recurrent-dropout", type=float, help="variational dropout on h_(t-1) in the recurrence (default 0)")
    m.add_argument("--cell-option", action="append", metavar="KEY=VALUE",
                   help="a cell option, e.g. depth=5, per_step=false, stats=cumulative, carry_norm=recurrence (repeatable)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help="parallel text streams B (default 32)")
    o.add_argument("--seq-len", type=int, help="truncated-BPTT window L ≥ 2 (default 100)")
    o.add_argument("--eval-batch-size", type=int, help="streams for validation/test (default: batch size)")
    o.add_argument("--reset-state", dest="carry_state", action="store_false", default=None,
                   help="start every window from the zero state instead of carrying the state across windows "
                        "(fixed-length sequences; evaluation does the same)")
    o.add_argument("--valid-chars", type=int,
                   help="validate during training on the first N validation characters (default: all); "
                        "the final scores always use the whole validation text")
    o.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), help="default adam")
    o.add_argument("--lr", type=float, help="learning rate (default 2e-3)")
    o.add_argument("--weight-decay", type=float, help="default 0")
    o.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    o.add_argument("--schedule", choices=("none", "step", "exponential", "cosine"), help="learning-rate schedule (default none)")
    o.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    o.add_argument("--step-size", type=int, help="steps between decays (step/exponential schedules)")
    o.add_argument("--gamma", type=float, help="decay factor (step/exponential schedules; default 0.5)")
    o.add_argument("--grad-clip", type=float, help="clip the global gradient norm at this value (default 5; 0 = off)")
    o.add_argument("--diverge-factor", type=float,
                   help="stop as diverged when the loss exceeds this × the mean loss of the first 5 steps (default 10; 0 = off)")
    o.add_argument("--epochs", type=int, help="passes over the training text (default 10)")
    o.add_argument("--max-steps", type=int, help="stop after this many training windows")
    o.add_argument("--max-minutes", type=float, help="stop after this much wall-clock time")
    o.add_argument("--validate-every", type=int, help="validate every N steps (default: each epoch)")
    o.add_argument("--checkpoint-every", type=int, help="save last.pt every N steps (default: at each validation)")
    o.add_argument("--patience", type=int, help="early stopping after N validations without improvement")
    o.add_argument("--seed", type=int, help="random seed (default 0)")
    add_compute_args(p)
    o.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice); 1 is much faster for small models "
                        "on a busy machine")


def register(subparsers) -> None:
    p = subparsers.add_parser("lm", help="character-level language models: train, sample, evaluate, experiments",
                              description="Character-level language models with any recurrent cell.")
    sub = p.add_subparsers(dest="lm_command", metavar="SUBCOMMAND", required=True)

    t = sub.add_parser("train", help="train a character language model (truncated BPTT)",
                       description="Train a character LM: TBPTT with the state carried across windows, gradient "
                                   "clipping, Adam/SGD, checkpoints (last.pt, best.pt) and exact resume.")
    _add_train_options(t)
    t.add_argument("--run-dir", default=None, help="output folder (default runs/lm)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir with its saved settings")
    t.add_argument("--overwrite", action="store_true", help="start afresh even if --run-dir holds a run")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    s = sub.add_parser("sample", help="generate text from a trained model",
                       description="Generate text: the prime text, then --length characters drawn from the model.")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt / last.pt of `bnrhn lm train` (or its run folder)")
    s.add_argument("--prime", default=None, help="text to start from (default: a newline)")
    s.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    s.add_argument("--length", type=int, default=500, help="characters to generate (default 500)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    add_device(s, default="auto")
    s.set_defaults(func=run_sample)

    e = sub.add_parser("evaluate", help="loss (nats/char), bits per character and perplexity on a text",
                       description="Score a trained model on a text file (the whole file, state carried) or on a "
                                   "split of its own corpus.")
    e.add_argument("checkpoint", metavar="CHECKPOINT")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="UTF-8 text to score (converted like the training text, e.g. PTB)")
    src.add_argument("--split", choices=("train", "valid", "test"), help="a split of the model's own corpus (default test)")
    e.add_argument("--raw", action="store_true", help="with --text: do not apply the training corpus's conversion")
    e.add_argument("--skip-unknown", action="store_true", help="drop characters the model does not know (default: error)")
    e.add_argument("--batch-size", type=int, default=None, help="parallel streams (default: the model's eval batch size)")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's training window)")
    e.add_argument("--json", action="store_true", help="print the scores as JSON")
    add_device(e, default="auto")
    e.set_defaults(func=run_evaluate)

    x = sub.add_parser("experiment", help="named experiments (seed-report: LSTM vs BN-LSTM variants on PTB characters)",
                       description="Run a named experiment and write a table (markdown + JSON) and loss curves.")
    x.add_argument("name", choices=("seed-report",), help="seed-report: LSTM vs BN-LSTM variants on PTB characters")
    x.add_argument("--ptb", default=None, metavar="DIR", help="word-level PTB folder (default ../shared/data/text/ptb or $BNRHN_DATA/text/ptb)")
    x.add_argument("--out", default="experiments/seed-report", help="output folder (default experiments/seed-report)")
    x.add_argument("--variants", default=None,
                   help="comma-separated subset of: lstm, bn_lstm, bn_lstm_shared, bn_lstm_cumulative, bn_lstm_carry_norm")
    x.add_argument("--hidden", type=int, default=128, help="hidden units (default 128; the paper: 1000)")
    x.add_argument("--seq-len", type=int, default=100, help="TBPTT window (default 100, as in the paper)")
    x.add_argument("--batch-size", type=int, default=32, help="default 32 (the paper: 64)")
    x.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    x.add_argument("--epochs", type=int, default=1, help="epochs per variant (default 1)")
    x.add_argument("--max-steps", type=int, default=1000,
                   help="training windows per variant (default 1000: the same data for every variant; 0 = no limit)")
    x.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock budget per variant in minutes (default 0 = none)")
    x.add_argument("--validate-every", type=int, default=250, help="validate every N steps (default 250)")
    x.add_argument("--eval-batch-size", type=int, default=128, help="streams for validation (default 128)")
    x.add_argument("--valid-chars", type=int, default=50000,
                   help="validate during training on the first N validation characters (default 50000; 0 = all); "
                        "the final scores always use the whole validation and test texts")
    x.add_argument("--seed", type=int, default=0)
    add_device(x, default="auto")
    x.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    x.add_argument("--overwrite", action="store_true", help="rerun variants that already have results")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=run_experiment)


# ------------------------------------------------------------------------------------------------------
def parse_cell_options(items: list[str] | None, cells: list[str]) -> dict:
    """``--cell-option KEY=VALUE`` items → options, each accepted by at least one of ``cells`` (a comparison's
    shared options go to the cells that have them)."""
    from bnrhn.analysis.common import parse_value
    from bnrhn.cells import cell_options

    valid = set().union(*(cell_options(c) for c in cells))
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--cell-option expects KEY=VALUE, got {item!r}")
        if key not in valid:
            which = f"cell {cells[0]!r}" if len(cells) == 1 else f"any of the cells {', '.join(cells)}"
            raise ValueError(f"--cell-option {key!r} is not an option of {which}; valid: {', '.join(sorted(valid))}")
        out[key] = parse_value(value.strip())
    return out


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when given (a ValueError for n < 1)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be ≥ 1, got {n}")
    import torch

    torch.set_num_threads(n)


def run_train(args) -> int:
    from dataclasses import asdict, fields
    from pathlib import Path

    from bnrhn.devices import resolve_device
    from bnrhn.lm.train import LMTrainConfig, load_lm_config, train_char_lm
    from bnrhn.training import TrainingDiverged
    from bnrhn.training.distributed import environment_rank

    if getattr(args, "device", None) is not None:
        resolve_device(args.device)  # a missing GPU fails before anything else is looked at
    set_threads(args.threads)
    given = {f.name: getattr(args, f.name) for f in fields(LMTrainConfig)
             if getattr(args, f.name, None) is not None and f.name not in ("cell_options", "progress", "overwrite")}
    if args.grad_clip == 0:
        given["grad_clip"] = None
    if args.diverge_factor == 0:
        given["diverge_factor"] = None
    progress = not args.quiet and sys.stderr.isatty()
    run_dir = args.run_dir or "runs/lm"
    if args.resume:
        cfg = load_lm_config(run_dir)
        changed = {k: v for k, v in given.items() if k in _RESUME_OVERRIDES}
        ignored = sorted(k for k in given if k not in _RESUME_OVERRIDES and k != "run_dir" and given[k] != getattr(cfg, k))
        if ignored:
            print(f"note: --resume keeps the run's saved settings; ignoring {', '.join('--' + k.replace('_', '-') for k in ignored)}",
                  file=sys.stderr)
        cfg = LMTrainConfig.from_dict({**asdict(cfg), **changed, "run_dir": run_dir, "progress": progress})
    else:
        cell = given.get("cell", "lstm")
        given["cell_options"] = parse_cell_options(args.cell_option, [cell])
        cfg = LMTrainConfig(**{**given, "run_dir": run_dir, "progress": progress, "overwrite": args.overwrite})
    log = (lambda s: print(s, file=sys.stderr))
    try:
        res = train_char_lm(cfg, resume=args.resume, log=log)
    except TrainingDiverged as exc:
        print(f"bnrhn lm train: training diverged: {exc}", file=sys.stderr)
        return 3
    if environment_rank() != 0:
        return 0  # data-parallel: rank 0 reports the run
    v, t = res["valid"], res["test"]
    print(f"run: {res['run_dir']}  ({res['steps']} steps, {res['epochs']:.2f} epochs, stopped: {res['stopped']}, "
          f"{res['seconds_per_epoch']:.0f} s/epoch, {res['chars_per_second']:.0f} chars/s)")
    print(f"best validation: loss {v['loss']:.4f} nats/char, {v['bpc']:.4f} BPC, perplexity {v['perplexity']:.3f}")
    if t:
        print(f"test:            loss {t['loss']:.4f} nats/char, {t['bpc']:.4f} BPC, perplexity {t['perplexity']:.3f}")
    print(f"checkpoints: {Path(res['run_dir']) / 'best.pt'}, {Path(res['run_dir']) / 'last.pt'}")
    return 0


def run_sample(args) -> int:
    from bnrhn.lm.sample import check_temperature, default_prime, sample_text
    from bnrhn.lm.task import load_char_lm

    check_temperature(args.temperature)  # before the (slower) checkpoint load
    if args.length < 0:
        raise ValueError(f"--length must be ≥ 0, got {args.length}")
    lm = load_char_lm(args.checkpoint, args.device)
    prime = args.prime if args.prime is not None else default_prime(lm.vocab)
    text = sample_text(lm.model, lm.vocab, prime, args.length, args.temperature, args.seed, lm.seq_len)
    sys.stdout.write(text)
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0


def run_evaluate(args) -> int:
    import json

    from bnrhn.data.text import apply_transform, read_text
    from bnrhn.lm.evaluate import evaluate_ids
    from bnrhn.lm.train import trained_split
    from bnrhn.lm.task import load_char_lm

    lm = load_char_lm(args.checkpoint, args.device)
    batch = args.batch_size or int(lm.train_config.get("eval_batch_size") or lm.train_config.get("batch_size", 32))
    seq_len = args.seq_len or lm.seq_len
    if args.text:
        text = read_text(args.text)
        if not args.raw:
            text = apply_transform(text, lm.transform)
        ids = lm.vocab.encode(text, source=args.text, unknown="skip" if args.skip_unknown else "error")
        dropped = len(text) - ids.numel()
        what = args.text
    else:
        split = args.split or "test"
        ids, what = trained_split(lm, split, "; use --text FILE")
        dropped = 0
    if ids.numel() < 2:
        raise ValueError(f"{what}: fewer than 2 characters left to score")
    score = evaluate_ids(lm.model, ids, batch, seq_len, carry_state=lm.carry_state)
    out = {"text": what, **score.as_dict(), "skipped_unknown_chars": dropped, "batch_size": batch, "seq_len": seq_len,
           "carry_state": lm.carry_state}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{what}: {score.chars:,} characters predicted"
              + (f" ({dropped} unknown characters skipped)" if dropped else ""))
        print(f"loss {score.loss:.4f} nats/char   {score.bpc:.4f} bits/char   perplexity {score.perplexity:.3f}")
    return 0


def run_experiment(args) -> int:
    from bnrhn.devices import resolve_device
    from bnrhn.lm.experiment import run_seed_report

    resolve_device(args.device)  # a missing GPU fails before the report folder is made
    set_threads(args.threads)
    run_seed_report(args)
    return 0
