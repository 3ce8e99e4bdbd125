"""The seed-report experiment end to end on a miniature Penn Treebank: table, JSON, loss curves, and a
diverging variant recorded as an outcome rather than a crash."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from bnrhn.cli import main
from bnrhn.lm import task as task_module
from figure_support import assert_readable, saved_figures  # noqa: F401  (fixture)

WORDS = "the market fell N points as <unk> investors sold shares of the company 's stock".split()


@pytest.fixture
def mini_ptb(tmp_path):
    rng = random.Random(0)
    d = tmp_path / "ptb"
    d.mkdir()
    for split, n in (("train", 40), ("valid", 10), ("test", 10)):
        lines = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " " for _ in range(n)]
        (d / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_seed_report_records_divergence_as_an_outcome(mini_ptb, tmp_path, monkeypatch, capsys, saved_figures):
    # Make the carry-norm variant's loss non-finite at its 4th step, as a real divergence would: the
    # trainer raises TrainingDiverged before the optimiser step and the experiment records it.
    real_step = task_module.CharLMTask.train_step
    calls = {"n": 0}

    def train_step(self, window):
        loss, n = real_step(self, window)
        if self.model.config.get("carry_norm") == "recurrence":
            calls["n"] += 1
            if calls["n"] >= 4:
                loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(task_module.CharLMTask, "train_step", train_step)
    out = tmp_path / "report"
    args = ["lm", "experiment", "seed-report", "--ptb", str(mini_ptb), "--out", str(out), "--hidden", "8",
            "--seq-len", "10", "--batch-size", "4", "--epochs", "1", "--max-steps", "0", "--validate-every", "3",
            "--eval-batch-size", "16", "--variants", "lstm,bn_lstm,bn_lstm_shared,bn_lstm_cumulative,bn_lstm_carry_norm",
            "--quiet"]
    assert main(args) == 0
    table = capsys.readouterr().out
    rep = json.loads((out / "results.json").read_text())
    v = rep["variants"]
    assert list(v) == ["lstm", "bn_lstm", "bn_lstm_shared", "bn_lstm_cumulative", "bn_lstm_carry_norm"]
    # Character-level PTB by hand (docs: words joined by "_", every sentence ends with "\n"): the whole
    # validation text is scored, N − 1 predictions; a model that learnt anything beats the uniform
    # distribution over the vocabulary (ln V nats per character).
    lines = {split: (mini_ptb / f"ptb.{split}.txt").read_text().split("\n") for split in ("train", "valid", "test")}
    chars = {split: "".join("_".join(line.split()) + "\n" for line in ls if line.split()) for split, ls in lines.items()}
    vocab_size = len(set("".join(chars.values())))
    assert rep["corpus"]["vocab_size"] == vocab_size and rep["corpus"]["valid_chars"] == len(chars["valid"])
    for name in ("lstm", "bn_lstm", "bn_lstm_shared", "bn_lstm_cumulative"):
        assert v[name]["outcome"].startswith("trained") and v[name]["seconds_per_epoch"] > 0, name
        for split in ("valid", "test"):
            s = v[name][split]
            assert s["chars"] == len(chars[split]) - 1, (name, split)
            assert s["bpc"] == pytest.approx(s["loss"] / math.log(2), rel=1e-12), (name, split)  # BPC = loss / ln 2
            assert s["perplexity"] == pytest.approx(math.exp(s["loss"]), rel=1e-12), (name, split)
            assert s["perplexity"] == pytest.approx(2 ** s["bpc"], rel=1e-9), (name, split)
            assert 0 < s["loss"] < math.log(vocab_size), (name, split, s["loss"], math.log(vocab_size))
    assert v["bn_lstm"]["config"]["cell_options"] == {"stats": "momentum"}  # the report's estimators, named
    assert v["bn_lstm_shared"]["config"]["cell_options"] == {"per_step": False, "stats": "momentum"}
    assert v["bn_lstm_cumulative"]["config"]["cell_options"] == {"stats": "cumulative"}
    div = v["bn_lstm_carry_norm"]
    assert div["outcome"].startswith("diverged: loss is nan at step 4") and div["diverged_step"] == 4
    assert div["valid"] is not None and "before the divergence" in div["valid_from"]  # last good checkpoint scored
    dv = div["valid"]
    assert dv["chars"] == len(chars["valid"]) - 1 and dv["bpc"] == pytest.approx(dv["loss"] / math.log(2), rel=1e-12)
    assert dv["perplexity"] == pytest.approx(math.exp(dv["loss"]), rel=1e-12)
    assert "| BN-LSTM (normalise the carry) | diverged" in table
    assert (out / "results.md").read_text() in table + "\n"
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert len(saved_figures) == 1
    assert_readable(saved_figures[0])
    # A second call reuses the finished variants instead of training again.
    assert main(args[:-3] + ["--variants", "lstm", "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["variants"]["lstm"] == v["lstm"]


def test_unknown_variant(mini_ptb, tmp_path, capsys):
    assert main(["lm", "experiment", "seed-report", "--ptb", str(mini_ptb), "--out", str(tmp_path / "x"),
                 "--variants", "lstm,gru"]) == 2
    assert "unknown variant(s) gru" in capsys.readouterr().err


def test_a_variant_is_kept_only_while_its_settings_are_unchanged(mini_ptb, tmp_path):
    """The seed report's rule for reusing a finished variant (the runner asks it before training the variant)."""
    from dataclasses import asdict

    from bnrhn.cli import build_parser
    from bnrhn.lm.experiment import SeedReport

    def variant(*more):
        args = build_parser().parse_args(["lm", "experiment", "seed-report", "--out", str(tmp_path), "--hidden", "8",
                                          *more])
        (run,) = SeedReport(args, ["lstm"], "cpu", mini_ptb, tmp_path).runs()
        return SeedReport(args, ["lstm"], "cpu", mini_ptb, tmp_path), run

    spec, run = variant()
    run.run_dir.mkdir(parents=True)
    (run.run_dir / spec.result_file).write_text(json.dumps({"outcome": "trained", "config": asdict(run.config)}))
    assert spec.finished(run)["outcome"] == "trained"
    other, other_run = variant("--lr", "0.01")
    assert other.finished(other_run) is None
    assert not spec.can_continue(run)  # a cut-off variant starts again: its checkpoint may be of other settings
