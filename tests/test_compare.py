"""``bnrhn compare`` / ``bnrhn demo`` end to end on CI-sized synthetic scenes: every report file, a table
with the seven metrics per cell, a gallery whose images exist, determinism, resume, and bad input refused
before any training starts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bnrhn.cli import main
from bnrhn.encoders import find_mobilenet_weights
from bnrhn.experiments.compare import REPORT_FILES, parse_budget
from bnrhn.reports import METRIC_ORDER
from table_support import parse_markdown_table


def _need_weights():
    try:
        find_mobilenet_weights()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


HAVE_JAVA = shutil.which("java") is not None
# The metrics the comparisons below are scored on: all seven with Java; without it the six computed in-process
# (METEOR alone runs in a JVM), so that only the test of the METEOR row needs Java.
SCORED = tuple(m for m in METRIC_ORDER if HAVE_JAVA or m != "METEOR")


def _need_java():
    if not HAVE_JAVA:
        pytest.skip("METEOR needs Java (a JRE on PATH)")


@pytest.fixture(scope="module", autouse=True)
def metrics_without_java():
    """Without Java, every comparison of this module scores the metrics other than METEOR: the experiment
    takes its metric list from bnrhn.captioning.scoring.ALL_METRICS when it evaluates a run."""
    if HAVE_JAVA:
        yield
        return
    import bnrhn.captioning.scoring as scoring

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "ALL_METRICS", tuple(m for m in scoring.ALL_METRICS if m != "METEOR"))
        yield


@pytest.fixture(scope="module")
def cache(shared_cache):
    return shared_cache


def tiny_args(cache, out, *more) -> list[str]:
    return ["compare", "--cells", "lstm", "bn_rhn", "--dataset", "synthetic:60,10,6", "--min-count", "1",
            "--embed-size", "16", "--hidden-size", "16", "--batch-size", "32", "--lr", "0.01", "--budget", "12", "--validate-every", "6",
            "--gallery", "4", "--cache-dir", str(cache), "--out", str(out), "--quiet", *more]


@pytest.fixture(scope="module")
def report(cache, tmp_path_factory, metrics_without_java):
    _need_weights()
    out = tmp_path_factory.mktemp("cmp") / "report"
    assert main(tiny_args(cache, out)) == 0
    return out


def test_report_files_table_and_gallery(report):
    for name in REPORT_FILES:
        assert (report / name).is_file(), name
    # the batch-norm diagnostic of every run: three validation losses for BN-RHN, the population one for LSTM
    runs = {r["cell"]: r for r in json.loads((report / "results.json").read_text())["runs"]}
    assert {"loss_sorted", "loss_random", "loss_population", "generalisation_gap"} <= set(runs["bn_rhn"]["batchnorm"])
    assert "loss_sorted" not in runs["lstm"]["batchnorm"] and "loss_population" in runs["lstm"]["batchnorm"]
    assert runs["bn_rhn"]["batching"] == "random" and runs["lstm"]["batching"] == "bucketed"
    leak_table = parse_markdown_table((report / "results.md").read_text())
    assert float(leak_table["val loss, population stats (inference)"]["bn_rhn"]) == pytest.approx(
        runs["bn_rhn"]["batchnorm"]["loss_population"], abs=1e-3)
    assert leak_table["val loss, batch stats, sorted batches"]["lstm"] == "–"
    logged = {c: [loss for _, loss in json.loads((Path(r["run_dir"]) / "compare_run.json").read_text())["losses"]]
              for c, r in runs.items()}
    for cell in ("lstm", "bn_rhn"):  # the mean of the last 100 logged steps (all 12 here), and the gap to it
        mean = sum(logged[cell][-100:]) / len(logged[cell][-100:])
        assert float(leak_table["train loss, logged (last 100 steps)"][cell]) == pytest.approx(mean, abs=1e-3)
        gap = runs[cell]["batchnorm"]["loss_population"] - mean
        assert float(leak_table["gap (val population − logged train)"][cell]) == pytest.approx(gap, abs=2e-3)
    text = (report / "results.md").read_text()
    table = parse_markdown_table(text)
    scores = {r["cell"]: r["scores"] for r in json.loads((report / "results.json").read_text())["runs"]}
    assert [m for m in METRIC_ORDER if m in table] == list(SCORED)
    for metric in SCORED:
        assert set(table[metric]) == {"lstm", "bn_rhn"}
        for cell, value in table[metric].items():
            assert float(value) == pytest.approx(scores[cell][metric], abs=5e-4), (metric, cell)
        # the best value of the row is bold
        row = next(line for line in text.splitlines() if line.startswith(f"| {metric} |"))
        best = max(scores[c][metric] for c in scores)
        assert f"**{best:.3f}**" in row, row
    for row in ("training time (per run)", "tokens/s (training)", "parameters", "steps"):
        assert set(table[row]) == {"lstm", "bn_rhn"}
    assert table["steps"] == {"lstm": "12", "bn_rhn": "12"}

    data = json.loads((report / "results.json").read_text())
    assert set(data["table"]) == {"lstm", "bn_rhn"}
    assert {r["cell"] for r in data["runs"]} == {"lstm", "bn_rhn"}
    for run in data["runs"]:
        assert (Path(run["run_dir"]) / "best.pt").is_file()
        assert (Path(run["run_dir"]) / "results_test.json").is_file()
        assert run["parameters"] > 0 and run["steps"] == 12

    page = (report / "gallery.html").read_text()
    sources = re.findall(r"<img src=['\"]([^'\"]+)['\"]", page)
    assert len(sources) == 4
    for src in sources:
        assert not Path(src).is_absolute() and (report / src).is_file()
    assert "lstm" in page and "bn_rhn" in page
    assert (report / "loss.png").stat().st_size > 10_000


def test_meteor_row_with_java(report):
    _need_java()
    table = parse_markdown_table((report / "results.md").read_text())
    for run in json.loads((report / "results.json").read_text())["runs"]:
        meteor = run["scores"]["METEOR"]  # NaN when METEOR could not be computed (no JVM, jar missing)
        assert 0 <= meteor <= 1 and float(table["METEOR"][run["cell"]]) == pytest.approx(meteor, abs=5e-4)
        saved = json.loads((Path(run["run_dir"]) / "metrics_test.json").read_text())["scores"]
        assert saved["METEOR"] == pytest.approx(meteor, abs=1e-12)  # the run's own scores file


def test_command_txt_reproduces_the_run(report, cache):
    import shlex

    first = (report / "command.txt").read_text().splitlines()[0]
    assert shlex.split(first) == ["bnrhn", *tiny_args(cache, report)]
    assert f"`{first}`" in (report / "results.md").read_text()


def test_same_seed_same_metrics_and_resume_keeps_finished_runs(report, cache, tmp_path):
    again = tmp_path / "again"
    assert main(tiny_args(cache, again)) == 0
    first = json.loads((report / "results.json").read_text())["table"]
    second = json.loads((again / "results.json").read_text())["table"]
    assert first == second

    # --resume on a finished comparison retrains nothing and writes the same table
    stamp = {p: p.stat().st_mtime_ns for p in (again / "runs").rglob("*.pt")}
    assert main(tiny_args(cache, again, "--resume")) == 0
    assert {p: p.stat().st_mtime_ns for p in (again / "runs").rglob("*.pt")} == stamp
    assert json.loads((again / "results.json").read_text())["table"] == first


def test_resume_continues_an_interrupted_comparison(report, cache, tmp_path):
    """A comparison cut off after its first run: --resume trains only the missing one; same table."""
    out = tmp_path / "cut"
    shutil.copytree(report, out)
    shutil.rmtree(out / "runs" / "bn_rhn-seed0")
    (out / "results.md").unlink()
    assert main(tiny_args(cache, out, "--resume")) == 0
    assert json.loads((out / "results.json").read_text())["table"] == \
        json.loads((report / "results.json").read_text())["table"]


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_resume_can_add_seeds(report, cache, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(report, out)
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    assert main(tiny_args(cache, out, "--resume", "--seeds", "2")) == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted((r["cell"], r["seed"]) for r in data["runs"]) == [("bn_rhn", 0), ("bn_rhn", 1), ("lstm", 0), ("lstm", 1)]
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # seed 0 was not retrained
    assert json.loads((out / "compare.json").read_text())["seeds"] == [0, 1]
    assert "±" in (out / "results.md").read_text()


def test_resume_of_a_comparison_saved_before_the_divergence_watchdog(report, cache, tmp_path):
    """compare.json files written before --diverge-factor existed have no such key: they still resume, and a
    different watchdog setting does not count as a different experiment (it only stops a diverged run)."""
    out = tmp_path / "older"
    shutil.copytree(report, out)
    saved = json.loads((out / "compare.json").read_text())
    del saved["base_config"]["diverge_factor"]
    for key in ("objective", "init", "scst_samples", "scst_baseline"):  # and older still: before SCST
        del saved["base_config"][key]
    (out / "compare.json").write_text(json.dumps(saved))
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    assert main(tiny_args(cache, out, "--resume", "--diverge-factor", "0")) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")} == stamp


def test_resume_with_other_settings_is_refused(report, cache, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(report, out)
    args = tiny_args(cache, out, "--resume")
    args[args.index("--budget") + 1] = "20"
    assert main(args) == 2
    assert "budget_steps" in capsys.readouterr().err


# -- bad input: refused before any training -------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (("--cells", "lstm", "nosuchcell"), "unknown cell"),
    (("--budget", "0"), "--budget must be positive"),
    (("--budget", "ten minutes"), "--budget must be a number of steps"),
    (("--dataset", "flickr8k:/nonexistent/flickr8k"), "/nonexistent/flickr8k"),
    (("--seeds", "0"), "--seeds"),
    (("--cell-option", "nosuch=1"), "nosuch"),
])
def test_bad_input_is_refused_before_training(cache, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    args = tiny_args(cache, out)
    flag = change[0]
    if flag in args and flag != "--cell-option":
        i = args.index(flag)
        end = i + 1
        while end < len(args) and not args[end].startswith("--"):
            end += 1
        args[i:end] = list(change)
    else:
        args += list(change)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err
    assert not (out / "runs").exists()


def test_existing_output_folder_is_refused_and_left_alone(cache, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(tiny_args(cache, out)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "my notes"


def test_overwrite_keeps_the_users_files(report, cache, tmp_path):
    out = tmp_path / "mine"
    shutil.copytree(report, out)
    (out / "notes.txt").write_text("my notes")
    assert main(tiny_args(cache, out, "--overwrite", "--cells", "lstm")) == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert set(json.loads((out / "results.json").read_text())["table"]) == {"lstm"}


def test_parse_budget():
    assert parse_budget("2000") == (2000, None)
    assert parse_budget("10m") == (None, 10.0)
    assert parse_budget("1.5h") == (None, 90.0)
    assert parse_budget("90s") == (None, 1.5)
    for bad in ("0", "-3", "1.5", "abc", "10 parsecs"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)


def test_demo_help_names_the_report(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in ("results.md", "loss.png", "gallery.html"):  # the report files the demo writes
        assert name in text and name in REPORT_FILES, name
    assert "bnrhn demo --out runs/demo" in text


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_seeds_report_mean_and_std(report, cache, tmp_path):
    out = tmp_path / "seeds"
    assert main(tiny_args(cache, out, "--cells", "lstm", "--seeds", "2")) == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted((r["cell"], r["seed"]) for r in data["runs"]) == [("lstm", 0), ("lstm", 1)]
    per_seed = [r["scores"]["CIDEr"] for r in data["runs"]]
    mean, std = data["table"]["lstm"]["CIDEr"]
    assert mean == pytest.approx(sum(per_seed) / 2) and std == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    runs = [json.loads((Path(r["run_dir"]) / "compare_run.json").read_text()) for r in data["runs"]]
    assert runs[0]["losses"] != runs[1]["losses"]  # the seed changes the run
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| CIDEr |"))
    assert f"{mean:.3f} ± {std:.3f}" in row


def test_a_diverged_cell_is_reported_not_fatal(report, cache, tmp_path, monkeypatch):
    """A cell whose loss turns NaN is a result of the comparison: the others are still trained and scored."""
    import bnrhn.captioning as captioning
    from bnrhn.training import TrainingDiverged

    real_train = captioning.train

    def train(cfg, resume=False, log=print):
        if cfg.cell == "bn_rhn":
            raise TrainingDiverged("loss is nan at step 1 (forced by the test)")
        return real_train(cfg, resume=resume, log=log)

    monkeypatch.setattr(captioning, "train", train)
    out = tmp_path / "nan"
    assert main(tiny_args(cache, out)) == 0
    table = parse_markdown_table((out / "results.md").read_text())
    assert table["diverged (NaN loss)"] == {"lstm": "0 of 1", "bn_rhn": "1 of 1"}
    assert table["CIDEr"]["bn_rhn"] == "–" and float(table["CIDEr"]["lstm"]) >= 0
    assert json.loads((out / "results.json").read_text())["table"]["bn_rhn"]["CIDEr"] is None


@pytest.mark.slow  # two comparisons (about 30 s here): CI runs it (make test-slow)
def test_jobs_give_the_same_table_as_one_run_at_a_time(cache, tmp_path):
    """--jobs 2 trains the two runs side by side in worker processes (1 thread each, as the run alone here):
    the same table, each run's messages in its output.log."""
    _need_weights()
    _need_java()  # the workers are fresh processes: they score METEOR too (no monkeypatch reaches them)
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main(tiny_args(cache, tmp_path / "alone")) == 0
        torch.set_num_threads(2)
        assert main(tiny_args(cache, tmp_path / "side", "--jobs", "2")) == 0
    finally:
        torch.set_num_threads(threads)
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())
    side = json.loads((tmp_path / "side" / "results.json").read_text())
    assert side["table"] == alone["table"]
    assert [r["steps"] for r in side["runs"]] == [r["steps"] for r in alone["runs"]]
    for cell in ("lstm", "bn_rhn"):
        assert "evaluating" in (tmp_path / "side" / "runs" / f"{cell}-seed0" / "output.log").read_text()
    assert "up to 2 trained at a time" in (tmp_path / "side" / "results.md").read_text()
