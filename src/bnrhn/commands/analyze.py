"""``bnrhn analyze gradients|jacobian|gates``: the gradient-flow analyses, measured on real text;
``bnrhn analyze batchnorm``: whether a trained batch-norm model learned from its batches' composition.

Each writes PNG figures and the numbers (JSON + CSV) into ``--out``.
"""

from __future__ import annotations

import sys

from bnrhn.commands._caption_args import add_device


def _common(p, default_cells: str) -> None:
    p.add_argument("--text", metavar="FILE",
                   help="UTF-8 text the models read (real input); default with --checkpoint: its training text")
    p.add_argument("--ptb-chars", action="store_true",
                   help="FILE is word-level Penn Treebank: convert it to characters for the fresh models (checkpoints "
                        "apply the conversion they were trained with)")
    p.add_argument("--cells", default=None,
                   help=f"fresh models to compare, comma-separated cell specs, e.g. 'rnn,lstm:forget_bias=0,rhn:depth=5' "
                        f"(default without --checkpoint: {default_cells}; with --checkpoint: none)")
    p.set_defaults(default_cells=default_cells)
    p.add_argument("--checkpoint", action="append", default=[], metavar="CKPT",
                   help="a trained language model (bnrhn lm train's best.pt/last.pt); repeatable")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the fresh models (default 128)")
    p.add_argument("--length", type=int, default=None,
                   help="sequence length T in characters (default 100); with --task: the task's T (default: the "
                        "checkpoint's, else 100; smnist 784)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh weights and of the text positions (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and numbers")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    add_device(p, default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="gradient-flow analysis: gradient norms, Jacobian spectra, Geršgorin discs, gates",
        description="Measure why gated and highway cells keep gradients alive, on real text, for fresh or trained models.",
    )
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    g = sub.add_parser("gradients", help="‖∂L_T/∂h_t‖ for every t: how far back the last loss's gradient reaches",
                       description="For each model, the norm of the gradient of the last step's loss w.r.t. the state "
                                   "at every earlier step, over a batch of real text windows (log-scale figure).")
    _common(g, "rnn,lstm,gru,rhn,bn_rhn")
    g.add_argument("--batch", type=int, default=32, help="number of text windows averaged (default 32)")
    g.add_argument("--state", choices=("h", "full"), default="h",
                   help="plot ‖∂L/∂h_t‖ (h) or the whole state's gradient, e.g. [h, c] (full); both are in the JSON")
    g.add_argument("--layer", type=int, default=-1, help="stacked layer whose states are measured (default: top)")
    g.add_argument("--task", choices=("adding", "copy", "smnist"), default=None,
                   help="measure on generated sequences of a long-range task instead of text: fresh task models "
                        "of --cells at --length, and/or checkpoints of bnrhn tasks train (L is each sequence's task "
                        "loss, read out after the last step)")
    g.set_defaults(func=run, analysis="gradients")

    j = sub.add_parser("jacobian", help="spectral radius, σ_max and Geršgorin discs of A_t = ∂s_t/∂s_(t−1)",
                       description="The temporal Jacobian along one real sequence: its spectral radius and largest "
                                   "singular value per step, and the Geršgorin discs with the eigenvalues at one step.")
    _common(j, "rnn,lstm,rhn,bn_rhn")
    j.add_argument("--part", choices=("full", "h"), default="full",
                   help="full: the whole state (LSTM [h, c], 2H×2H); h: the block ∂h_t/∂h_(t−1) (default full)")
    j.add_argument("--layer", type=int, default=0, help="stacked layer (default 0)")
    j.add_argument("--disc-step", type=int, default=None, help="step t whose discs are drawn (1..T, default T)")
    j.set_defaults(func=run, analysis="jacobian")

    a = sub.add_parser("gates", help="mean transform and carry gate per highway depth (RHN family)",
                       description="Mean transform-gate and carry-gate activity per highway depth of RHN-family models.")
    _common(a, "rhn,bn_rhn,bn_rhn_tf")
    a.add_argument("--batch", type=int, default=32, help="number of text windows (default 32)")
    a.set_defaults(func=run, analysis="gates")

    b = sub.add_parser(
        "batchnorm", help="batch-composition leak: loss with batch statistics (sorted/random batches) vs population",
        description="Teacher-forced validation loss of a trained captioner or character LM, per position and in total, "
                    "with batch statistics over length-sorted batches, over random batches, and with the population "
                    "statistics that inference uses; plus the number of valid rows per position. A model that reads "
                    "its batches' composition has the sorted loss far below the other two. Writes batchnorm.json, "
                    "batchnorm.csv and batchnorm.png into --out (or prints only, without --out).",
        epilog="Example: bnrhn analyze batchnorm runs/demo/runs/bn_rhn-seed0/best.pt --out figures/bn-leak")
    b.add_argument("checkpoint", metavar="CKPT", help="best.pt / last.pt of bnrhn train, compare, demo or lm train")
    b.add_argument("--split", default=None,
                   help="captioner: val (default) or test; LM: valid (default) or test")
    b.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="rows per batch (default: the run's training batch size)")
    b.add_argument("--precise-batches", type=int, default=50, metavar="K",
                   help="captioner: also measure population statistics recomputed over K random training batches "
                        "('precise BN'; 0 = skip; default 50)")
    b.add_argument("--cache-dir", default=None, metavar="DIR", help="feature cache root of the run (default: the run's)")
    b.add_argument("--out", default=None, metavar="DIR", help="folder for batchnorm.json/.csv/.png")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    add_device(b, default="auto")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=run_batchnorm, analysis="batchnorm")


def run(args) -> int:
    from pathlib import Path

    from bnrhn.analysis.common import read_analysis_text
    from bnrhn.analysis.runner import prepare_models, run_gates, run_gradients, run_jacobian
    from bnrhn.data.text import check_seq_len

    from bnrhn.commands.lm import set_threads
    from bnrhn.devices import resolve_device

    device = resolve_device(args.device)  # a missing GPU fails before any text or checkpoint is read
    set_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if getattr(args, "task", None):
        return _run_task_gradients(args, log, device)
    if args.length is None:
        args.length = 100
    check_seq_len(args.length)
    if args.hidden < 1:
        raise ValueError(f"--hidden must be a positive integer, got {args.hidden}")
    if getattr(args, "batch", 1) < 1:
        raise ValueError(f"--batch must be a positive integer, got {args.batch}")
    spec = args.cells if args.cells is not None else ("" if args.checkpoint else args.default_cells)
    cells = [c.strip() for c in spec.split(",") if c.strip()]
    text_path = args.text
    if text_path is None and args.checkpoint:
        text_path = _checkpoint_text(args.checkpoint[0])
        log(f"text: {text_path} (the first checkpoint's validation text)")
    text = read_analysis_text(text_path)
    models = prepare_models(text, str(text_path), cells, args.checkpoint, args.hidden, args.length, args.seed,
                            fresh_transform="ptb_chars" if args.ptb_chars else None, log=log, device=device)
    out = Path(args.out)
    if args.analysis == "gradients":
        rep = run_gradients(models, out, str(text_path), args.length, args.batch, args.seed, args.state, args.layer)
        for label, r in rep["results"].items():
            g = r["h"]["geomean"]
            marks = [d for d in (0, 10, 25, 50, args.length - 1) if d < len(g)]
            print(f"{label:34s} " + "  ".join(f"d={d}: {g[d]:.2e}" for d in marks))
        files = ["gradients.png", "gradients.json", "gradients.csv"]
    elif args.analysis == "jacobian":
        rep = run_jacobian(models, out, str(text_path), args.length, args.seed, args.part, args.layer, args.disc_step)
        for label, r in rep["results"].items():
            print(f"{label:34s} {r['state']:10s} mean ρ(A) {r['mean_spectral_radius']:.3f}  mean σ_max {r['mean_sigma_max']:.3f}"
                  f"  max disc radius {max(r['discs']['radii']):.3g}")
        files = ["jacobian_spectrum.png", "gershgorin.png", "jacobian.json", "jacobian.csv", "gershgorin.csv",
                 "eigenvalues.csv"]
    else:
        rep = run_gates(models, out, str(text_path), args.length, args.batch, args.seed)
        for label, r in rep["results"].items():
            t = ", ".join(f"{v:.3f}" for v in r["transform_mean"][0])
            c = ", ".join(f"{v:.3f}" for v in r["carry_mean"][0])
            print(f"{label:34s} transform per depth [{t}]  carry [{c}]")
        if rep["skipped_not_highway"]:
            log(f"skipped (not highway cells): {', '.join(rep['skipped_not_highway'])}")
        files = ["gates.png", "gates.json", "gates.csv"]
    log("wrote " + ", ".join(str(out / f) for f in files))
    return 0


def _run_task_gradients(args, log, device) -> int:
    """``analyze gradients --task``: fresh task models (--cells) and task checkpoints on generated sequences."""
    from pathlib import Path

    import torch

    from bnrhn.analysis.common import parse_cell_spec
    from bnrhn.analysis.runner import run_task_gradients
    from bnrhn.tasks.heads import SequenceModel
    from bnrhn.tasks.train import TaskTrainConfig, load_task_model

    if args.text or args.ptb_chars:
        raise ValueError("--task measures on generated sequences: leave out --text and --ptb-chars")
    models = []
    for path in args.checkpoint:
        model, cfg = load_task_model(path)
        models.append((f"{cfg.cell} ({Path(path).parent.name})", model, cfg))
    length = args.length
    if length is None:  # the checkpoint's, else the task's usual default
        same = [c for _, _, c in models if c.task == args.task]
        length = same[0].length if same else (784 if args.task == "smnist" else 100)
    spec = args.cells if args.cells is not None else ("" if args.checkpoint else args.default_cells)
    for item in [c.strip() for c in spec.split(",") if c.strip()]:
        name, opts = parse_cell_spec(item)
        cfg = TaskTrainConfig(task=args.task, length=length, cell=name, hidden=args.hidden, cell_options=opts,
                              seed=args.seed)
        torch.manual_seed(args.seed)
        models.append((f"{item} (fresh)", SequenceModel.from_config(cfg.model_config()), cfg))
    if not models:
        raise ValueError("nothing to analyse: give --cells and/or --checkpoint")
    rep = run_task_gradients(models, Path(args.out), args.task, length, args.batch, args.seed, args.state, args.layer,
                             device=device)
    for label, r in rep["results"].items():
        g = r["h"]["geomean"]
        marks = [d for d in (0, 10, 25, 50) if d < len(g) - 1] + [len(g) - 1]
        print(f"{label:34s} " + "  ".join(f"d={d}: {g[d]:.2e}" for d in marks))
    log("wrote " + ", ".join(str(Path(args.out) / f) for f in ("gradients.png", "gradients.json", "gradients.csv")))
    return 0


def _checkpoint_text(path: str) -> str:
    from bnrhn.lm.task import load_char_lm

    lm = load_char_lm(path)
    src = lm.corpus_info.get("source", {})
    for key in ("valid", "path"):
        if key in src:
            return src[key]
    raise ValueError(f"{path}: the checkpoint does not record its text; give --text FILE")


def run_batchnorm(args) -> int:
    import json
    from pathlib import Path

    from bnrhn.analysis.batchnorm import leak_summary
    from bnrhn.commands.lm import set_threads
    from bnrhn.reports.plots import MODE_LABELS, plot_batchnorm_leak
    from bnrhn.training import load_checkpoint

    from bnrhn.devices import resolve_device

    resolve_device(args.device)  # a missing GPU fails before the checkpoint is read
    set_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if args.batch_size is not None and args.batch_size < 2:
        raise ValueError(f"--batch-size must be ≥ 2 (batch statistics need two rows), got {args.batch_size}")
    if args.precise_batches < 0:
        raise ValueError(f"--precise-batches must be ≥ 0, got {args.precise_batches}")
    kind = (load_checkpoint(args.checkpoint).get("task") or {}).get("kind")
    if kind == "bnrhn-captioner":
        from bnrhn.captioning import batchnorm_leak

        report = batchnorm_leak(args.checkpoint, split=args.split or "val", batch_size=args.batch_size, device=args.device,
                                precise_batches=args.precise_batches, cache_dir=args.cache_dir,
                                progress=not args.quiet, log=log)
    else:
        report = _lm_report(args, log)
    d = report.to_dict()
    print(f"{args.checkpoint}: {report.kind}, {report.split} split, {report.sequences:,} "
          f"{'captions' if report.kind == 'captioner' else 'characters'}, batches of {report.batch_size}")
    for mode, m in report.modes.items():
        print(f"  {MODE_LABELS.get(mode, mode):48s} {m.loss:.4f} nats/token")
    for key, value in leak_summary(report).items():
        if not key.startswith("loss_"):
            print(f"  {key:48s} {value:+.2%}" if key.endswith(("_random", "_batch")) else f"  {key:48s} {value:.4f}")
    for note in report.notes:
        print(f"  note: {note}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        d["checkpoint"] = str(args.checkpoint)
        (out / "batchnorm.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
        modes = list(report.modes)
        rows = ["position," + ",".join(f"loss_{m},tokens_{m},valid_rows_{m}" for m in modes)]
        for k in range(max(len(m.per_step_loss) for m in report.modes.values())):
            cells = []
            for m in report.modes.values():
                cells += ([f"{m.per_step_loss[k]:.6f}", str(m.per_step_tokens[k]), f"{m.valid_rows[k]:.2f}"]
                          if k < len(m.per_step_loss) else ["", "", ""])
            rows.append(f"{k + 1}," + ",".join(cells))
        (out / "batchnorm.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        plot_batchnorm_leak(out / "batchnorm.png", d, title=f"{Path(args.checkpoint).parent.name}: {report.split} loss by position")
        log("wrote " + ", ".join(str(out / f) for f in ("batchnorm.json", "batchnorm.csv", "batchnorm.png")))
    return 0


def _lm_report(args, log):
    from bnrhn.analysis.batchnorm import lm_leak
    from bnrhn.lm.task import load_char_lm
    from bnrhn.lm.train import trained_split

    lm = load_char_lm(args.checkpoint, args.device)  # refuses a checkpoint of any other kind, naming it
    split = args.split or "valid"
    try:
        ids, what = trained_split(lm, split)
    except ValueError as exc:
        raise ValueError(f"{args.checkpoint}: {exc}") from None
    bs = args.batch_size or int(lm.train_config.get("batch_size", 32))
    log(f"text: {what} ({ids.numel():,} characters)")
    return lm_leak(lm.model, ids, batch_size=bs, seq_len=lm.seq_len, carry_state=lm.carry_state, split_name=split)
