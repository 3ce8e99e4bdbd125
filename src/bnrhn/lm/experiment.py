"""The seed report's experiment: LSTM vs BN-LSTM variants on Penn Treebank characters.

S. Glinskis ("Final Project", 2017) put batch normalisation into an LSTM language model on PTB
characters, following Cooijmans et al. (2016, "Recurrent Batch Normalization"), and compared how the
normalisation statistics are kept. The variants here:

============================ =====================================================================
``lstm``                     plain LSTM (forget bias 1), the baseline
``bn_lstm``                  BN-LSTM, statistics per time step, running averages (momentum 0.1)
``bn_lstm_shared``           BN-LSTM, one set of population statistics shared by all time steps
``bn_lstm_cumulative``       BN-LSTM, per-step population statistics as plain averages over all
                             batches (Ioffe & Szegedy Alg. 2) instead of running averages
``bn_lstm_carry_norm``       BN-LSTM that normalises the memory c_t *inside* the recurrence
                             (``carry_norm="recurrence"``), the variant the report saw diverge
============================ =====================================================================

The BN-LSTM variants name ``stats`` explicitly (the report's estimators), although the cell's own
default is batch renormalization. Every variant trains with the same data, seed, size, optimiser and budget. A variant whose loss
becomes NaN/inf stops with :class:`bnrhn.training.TrainingDiverged`; that is recorded as its outcome.
The results go to ``results.json``, ``results.md`` (a table) and ``loss_curves.png``; each variant's row also
to ``<variant>/seed_report_run.json``, so that a later call keeps it while its settings are unchanged.
The report is a specification (:class:`SeedReport`) of the one experiment runner,
:mod:`bnrhn.experiments.runner`.

At the published size (Cooijmans et al.: 1000 hidden units, windows of 100 characters) on a GPU::

    bnrhn lm experiment seed-report --hidden 1000 --seq-len 100 --batch-size 64 --epochs 20 --max-steps 0 \
        --valid-chars 0 --device cuda
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bnrhn.experiments.runner import ExperimentSpec, Run, command_line, run_experiment

VARIANTS: dict[str, dict[str, Any]] = {
    "lstm": {"cell": "lstm", "options": {"forget_bias": 1.0}, "label": "LSTM",
             "what": "plain LSTM, forget-gate bias 1 (as the BN-LSTM's)"},
    "bn_lstm": {"cell": "bn_lstm", "options": {"stats": "momentum"}, "label": "BN-LSTM (per step, momentum)",
                "what": "statistics per time step, running averages with momentum 0.1 (Cooijmans et al.)"},
    "bn_lstm_shared": {"cell": "bn_lstm", "options": {"per_step": False, "stats": "momentum"}, "label": "BN-LSTM (shared statistics)",
                       "what": "one set of population statistics for all time steps"},
    "bn_lstm_cumulative": {"cell": "bn_lstm", "options": {"stats": "cumulative"}, "label": "BN-LSTM (cumulative)",
                           "what": "per-step population statistics as plain averages over all training batches"},
    "bn_lstm_carry_norm": {"cell": "bn_lstm", "options": {"carry_norm": "recurrence", "stats": "momentum"},
                           "label": "BN-LSTM (normalise the carry)",
                           "what": "c_t = BN(c_t) inside the recurrence (the seed report's diverging variant)"},
}


def default_ptb_dir() -> Path:
    env = os.environ.get("BNRHN_DATA")
    if env:
        return Path(env) / "text" / "ptb"
    return Path("..") / "shared" / "data" / "text" / "ptb"


def _train_curve(run_dir: Path) -> dict[str, list]:
    from bnrhn.training import read_log

    curve: dict[str, list] = {"train_step": [], "train_loss": [], "valid_step": [], "valid_loss": []}
    log = run_dir / "log.jsonl"
    if not log.exists():
        return curve
    for row in read_log(log):
        loss = row.get("loss")
        loss = float(loss) if not isinstance(loss, str) else float("nan")
        if row.get("kind") == "validation":
            curve["valid_step"].append(row["step"])
            curve["valid_loss"].append(loss)
        else:
            curve["train_step"].append(row["step"])
            curve["train_loss"].append(loss)
    return curve


def _smooth(values: list[float], k: int = 25) -> list[float]:
    out, acc, window = [], 0.0, []
    for v in values:
        window.append(v)
        acc += v
        if len(window) > k:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—" if x is None else str(x)
    return f"{x:.{digits}f}"


SETTINGS = ("hidden", "seq_len", "batch_size", "lr", "epochs", "max_steps", "max_minutes", "validate_every",
            "eval_batch_size", "valid_chars", "seed", "device")  # the arguments every variant shares (in the report)


class SeedReport(ExperimentSpec):
    """The seed report as a specification of :func:`bnrhn.experiments.runner.run_experiment`: one run per
    variant, in ``OUT/<variant>/``. An output folder gathers the variants of several calls, so the report has
    no settings file of its own and no resume is refused: a finished variant is kept while its own settings
    are unchanged (``--overwrite`` runs it again), and the report also shows the variants that earlier calls
    measured and this one did not ask for. (``train`` notes when the variant started, for ``diverged``.)"""

    noun = "seed report"
    log_name = "lm experiment"
    settings_file = None
    result_file = "seed_report_run.json"

    def __init__(self, args, names: list[str], device: str, ptb: Path, out: Path) -> None:
        self.args, self.names, self.device, self.ptb, self.out = args, names, device, ptb, out
        self.corpus = None
        self.earlier: dict[str, dict[str, Any]] = {}  # the variants of the report already in the folder
        self._started: tuple[float, dict[str, Any]] = (0.0, {})

    def settings(self) -> dict:
        return {k: getattr(self.args, k) for k in SETTINGS}

    def check(self, log) -> None:
        from bnrhn.data.text import CharCorpus

        self.corpus = CharCorpus.ptb_chars(self.ptb)
        report_path = self.out / "results.json"
        if report_path.is_file():
            self.earlier = json.loads(report_path.read_text(encoding="utf-8")).get("variants", {})

    def runs(self) -> list[Run]:
        from bnrhn.lm.train import LMTrainConfig

        args, progress = self.args, not self.args.quiet and sys.stderr.isatty()
        return [Run(name, self.out / name, LMTrainConfig(
            run_dir=str(self.out / name), ptb=str(self.ptb), cell=VARIANTS[name]["cell"], hidden=args.hidden,
            cell_options=dict(VARIANTS[name]["options"]), batch_size=args.batch_size, seq_len=args.seq_len,
            eval_batch_size=args.eval_batch_size, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps or None,
            max_minutes=args.max_minutes or None, validate_every=args.validate_every,
            valid_chars=args.valid_chars or None, seed=args.seed, device=self.device, progress=progress,
            overwrite=True,
        )) for name in self.names]

    def finished(self, run: Run) -> dict | None:
        """The variant's result when it was trained with the same settings (its result file, or its row in a
        report written before the result files existed)."""
        saved = super().finished(run) or self.earlier.get(run.name)
        if saved is None or _cfg_key(saved.get("config", {})) != _cfg_key(asdict(run.config)):
            return None
        return saved

    def can_continue(self, run: Run) -> bool:
        """Never: the settings may change between calls, so a cut-off variant's checkpoint may be of other
        settings; the variant starts again."""
        return False

    def train(self, run: Run, resume: bool, log) -> dict[str, Any]:
        from bnrhn.lm.train import train_char_lm

        variant = VARIANTS[run.name]
        log(f"{variant['label']}: {variant['what']}")
        row: dict[str, Any] = {"label": variant["label"], "what": variant["what"], "config": asdict(run.config),
                               "load_average_start": _load_average()}
        self._started = (time.perf_counter(), row)
        res = train_char_lm(run.config, corpus=self.corpus, log=log)
        row.update(res)
        bad_valid = [v for v in res["validations"] if not math.isfinite(v.get("loss", math.nan))]
        if res["stopped"] == "max_minutes":
            row["outcome"] = f"trained; stopped by the {self.args.max_minutes:g}-minute budget"
        elif res["stopped"] == "max_steps":
            row["outcome"] = f"trained {res['steps']} windows (budget)"
        else:
            row["outcome"] = f"trained; {res['stopped'].replace('_', ' ')}"
        if bad_valid:
            row["outcome"] += f"; {len(bad_valid)} validation(s) non-finite"
        row["diverged_step"] = None
        return self._finished_row(row, log)

    def diverged(self, run: Run, exc: Exception, log) -> dict[str, Any]:
        from bnrhn.training import load_checkpoint

        _, row = self._started
        msg = str(exc)
        row["outcome"] = f"diverged: {msg.split(';')[0]}"
        row["diverged_step"] = _step_from_message(msg)
        row.update(_scores_after_divergence(run.run_dir, run.config, self.corpus, load_checkpoint))
        log(row["outcome"])
        return self._finished_row(row, log)

    def _finished_row(self, row: dict[str, Any], log) -> dict[str, Any]:
        row["wall_seconds"] = time.perf_counter() - self._started[0]
        row["load_average_end"] = _load_average()
        log(f"{row['outcome']}; valid BPC {_fmt((row.get('valid') or {}).get('bpc'))} ({row['wall_seconds']:.0f} s)")
        return row

    def report(self, results: dict[str, dict], out_dir: Path, log) -> dict[str, Any]:
        """``results.json``, ``results.md`` and ``loss_curves.png`` of this call's variants and of those that
        earlier calls measured in the folder (table order: :data:`VARIANTS`)."""
        from bnrhn.reports.analysis_figures import plot_loss_curves

        args = self.args
        rows = {name: row for name, row in self.earlier.items() if name in VARIANTS and name not in self.names}
        rows.update(results)
        rows = {k: rows[k] for k in VARIANTS if k in rows}
        report = _write_report(out_dir, args, self.ptb, self.corpus, rows)
        curves = {VARIANTS[k]["label"]: {**_train_curve(out_dir / k), "diverged_step": row.get("diverged_step")}
                  for k, row in rows.items()}
        smoothed = {k: {**c, "train_loss": _smooth(c["train_loss"])} for k, c in curves.items()}
        plot_loss_curves(
            smoothed, out_dir / "loss_curves.png",
            title=f"PTB characters, hidden {args.hidden}, windows of {args.seq_len}, batch {args.batch_size}: "
                  f"training loss (25-step mean) and validation loss"
                  + (f" (first {args.valid_chars:,} validation characters)" if args.valid_chars else ""),
            ylabel="loss (nats per character)",
        )
        return report


def run_seed_report(args) -> dict[str, Any]:
    """Run every requested variant (keeping those with results from the same settings unless ``--overwrite``),
    write the report and print its table."""
    from bnrhn.devices import resolve_device
    from bnrhn.training.distributed import refuse_data_parallel

    refuse_data_parallel("bnrhn lm experiment")  # its variants write one report; data-parallel is for lm train
    # the device the variants record: "auto" resolved to its kind, so that finished variants (saved with
    # "cpu" or "cuda" before auto was the default) are recognised as the same settings
    device = args.device if args.device != "auto" else resolve_device("auto").type
    names = list(VARIANTS) if not args.variants else [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    spec = SeedReport(args, names, device, Path(args.ptb) if args.ptb else default_ptb_dir(), out)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    command = command_line(args.argv) if hasattr(args, "argv") else ""
    # the folder gathers the variants of every call: never refused (overwrite), finished variants are kept
    # unless --overwrite (resume)
    report = run_experiment(spec, out, resume=not args.overwrite, overwrite=True, command=command, log=log)
    print((out / "results.md").read_text())
    return report


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cfg_key(cfg: dict[str, Any]) -> str:
    """Settings that decide a variant's result (JSON-normalised), to reuse finished variants. Settings added
    since a variant was saved count with their default value (which is what that run used)."""
    from dataclasses import MISSING, fields

    from bnrhn.lm.train import LMTrainConfig

    cfg = {**{f.name: f.default for f in fields(LMTrainConfig) if f.default is not MISSING}, **cfg}
    return json.dumps({k: v for k, v in cfg.items() if k not in ("progress", "overwrite")}, sort_keys=True, default=str)


def _step_from_message(msg: str) -> int | None:
    import re

    m = re.search(r"at step (\d+)", msg)
    return int(m.group(1)) if m else None


def _scores_after_divergence(run_dir: Path, cfg, corpus, load_checkpoint) -> dict[str, Any]:
    """Validation scores of the last good checkpoint of a diverged run (if one was saved)."""
    from bnrhn.lm.evaluate import evaluate_ids
    from bnrhn.models.char_lm import CharLM

    out: dict[str, Any] = {"valid": None, "test": None}
    from bnrhn.training import read_log

    rows = list(read_log(run_dir / "log.jsonl")) if (run_dir / "log.jsonl").exists() else []
    train_rows = [r for r in rows if r.get("kind") == "train"]
    out["steps"] = train_rows[-1]["step"] if train_rows else 0
    out["train_seconds"] = sum(r["tokens"] / r["tokens_per_s"] for r in train_rows if r.get("tokens_per_s"))
    steps_per_epoch = max(1, (corpus.train.numel() - 1) // cfg.batch_size // cfg.seq_len)
    out["epochs"] = out["steps"] / steps_per_epoch
    out["seconds_per_epoch"] = out["train_seconds"] / out["epochs"] if out["epochs"] else math.nan
    out["chars_per_second"] = (sum(r["tokens"] for r in train_rows) / out["train_seconds"]) if out["train_seconds"] else math.nan
    ckpt_path = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        model = CharLM(**cfg.model_kwargs(len(corpus.vocab)))
        model.load_state_dict(ckpt["model"])
        out["valid"] = evaluate_ids(model, corpus.valid, cfg.eval_batch_size or cfg.batch_size, cfg.seq_len).as_dict()
        out["valid_from"] = f"{ckpt_path.name} (step {ckpt['trainer']['global_step']}, before the divergence)"
    return out


def _write_report(out: Path, args, ptb: Path, corpus, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    info = corpus.summary()
    report = {
        "experiment": "seed-report",
        "ptb": str(ptb),
        "corpus": info,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "variants": rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, allow_nan=True, default=str) + "\n", encoding="utf-8")
    lines = [
        f"PTB characters ({info['vocab_size']} symbols; train {info['train_chars']:,}, valid {info['valid_chars']:,} "
        f"characters), hidden {args.hidden}, TBPTT windows of {args.seq_len}, batch {args.batch_size}, Adam lr {args.lr}, "
        f"budget per variant: {args.epochs} epoch(s)" + (f" or {args.max_steps} windows" if args.max_steps else "")
        + (f" or {args.max_minutes:g} min" if args.max_minutes else "") + ", whichever comes first.",
        "Validation scores on the whole validation text with the best checkpoint.",
        "",
        "| variant | outcome | steps | epochs | valid loss (nats) | valid BPC | valid perplexity | test BPC | s/epoch | chars/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        v, t = r.get("valid") or {}, r.get("test") or {}
        lines.append(
            f"| {r['label']} | {r['outcome']} | {r.get('steps', '—')} | {_fmt(r.get('epochs'), 2)} | {_fmt(v.get('loss'))} | "
            f"{_fmt(v.get('bpc'))} | {_fmt(v.get('perplexity'))} | {_fmt(t.get('bpc'))} | "
            f"{_fmt(r.get('seconds_per_epoch'), 0)} | {_fmt(r.get('chars_per_second'), 0)} |"
        )
    lines += ["", "s/epoch: training time per pass over the training text (excluding validation), extrapolated from "
              "the steps run when a variant stopped before a full epoch."]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
