"""The benchmark scripts run (tiny sizes): they must not rot between the times someone measures with them.
Slow-marked (about 35 s together on a 2-core AVX2 machine): CI runs them with the other slow tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_cells_benchmark_with_products_ceiling(tmp_path):
    out = tmp_path / "cells.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cells.py"), "--batch", "4", "--steps", "3", "--size", "16",
           "--depth", "2", "--rounds", "3", "--warmup", "0", "--threads", "1", "--products", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {r["cell"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch.nn.LSTM", "rnn", "lstm", "gru", "mut1", "mut2", "mut3", "rhn", "bn_rhn", "bn_rhn_tf", "bn_lstm"}
    for name, r in rows.items():
        assert r["ms_per_step"] > 0 and r["products_ms"] > 0, name
        assert r["products_ratio"] > 0 and r["gflops_ratio"] > 0, name
    lstm = rows["torch.nn.LSTM"]
    for name, r in rows.items():  # ratios are to nn.LSTM's step in the same round: the median over the rounds
        per_round = [a / b for a, b in zip(lstm["round_ms"], r["round_ms"], strict=True)]
        assert len(per_round) == 3
        assert r["tokens_ratio"] == pytest.approx(sorted(per_round)[1], rel=1e-12), name
        work = r["gflops"] * r["ms_per_step"] / (lstm["gflops"] * lstm["ms_per_step"])  # FLOPs per step, relative
        assert r["gflops_ratio"] == pytest.approx(work * r["tokens_ratio"], rel=1e-9), name
        assert r["gflops_ratio_range"] == pytest.approx([work * min(per_round), work * max(per_round)], rel=1e-9)
        assert r["ms_per_step"] == pytest.approx(sorted(r["round_ms"])[1], rel=1e-12), name
    assert lstm["gflops_ratio"] == 1.0 and lstm["gflops_ratio_range"] == [1.0, 1.0]
    assert "ceiling × nn.LSTM" in run.stdout and run.stdout.count("\n| ") >= 12


def test_ratios_are_paired_by_round():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from cells import paired_ratios
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # the reference's rounds [10, 20, 30] ms, the cell's [5, 40, 30]: per round 2, 0.5, 1 — median 1.0, where the
    # ratio of the medians (20 / 30) would say 0.67
    assert paired_ratios([10.0, 20.0, 30.0], [5.0, 40.0, 30.0]) == (1.0, 0.5, 2.0)
    with pytest.raises(ValueError):  # rounds must pair up
        paired_ratios([1.0, 2.0], [1.0])


def test_cells_benchmark_times_cells_with_the_gate_kernels_bypassed(tmp_path):
    out = tmp_path / "cells.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cells.py"), "--batch", "4", "--steps", "3", "--size", "16",
           "--depth", "2", "--rounds", "1", "--warmup", "0", "--threads", "1", "--json", str(out),
           "--cells", "bn_rhn", "--composed", "bn_rhn"]
    env = {k: v for k, v in os.environ.items() if k != "BNRHN_RECURRENT_PRODUCTS"}  # the default, auto
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    table = json.loads(out.read_text())
    assert {r["cell"] for r in table["rows"]} == {"torch.nn.LSTM", "bn_rhn", "bn_rhn, composed"}
    assert "fused CPU gate kernels" in run.stdout
    # hidden size 16 is below oneDNN's threshold: nothing timed, and the table says so
    assert table["recurrent_products"] == "recurrent products: BNRHN_RECURRENT_PRODUCTS=auto, nothing timed yet"
    assert table["recurrent_products"] in run.stdout


def test_gates_benchmark_prints_both_paths():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gates.py"), "--batch", "3", "--sizes", "5", "--rounds", "1",
           "--reps", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "×" in line and "work" not in line]
    assert len(rows) == 4 and all(line.count("|") == 5 for line in rows), run.stdout


def test_decode_benchmark_checks_its_captions():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--images", "6", "--beam", "2", "--vocab", "50",
           "--max-len", "6", "--reference", "3", "--threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "per-image beam search loop (beam 2) | 6 |" in run.stdout
    assert "identical captions (batched vs loop): 6/6; (batched vs the independent reference search): 3/3" in run.stdout


def test_cells_benchmark_takes_cells_with_options(tmp_path):
    out = tmp_path / "cells.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cells.py"), "--batch", "4", "--steps", "3", "--size", "16",
           "--depth", "2", "--rounds", "1", "--warmup", "0", "--threads", "1", "--json", str(out),
           "--cells", "bn_rhn", "bn_rhn:stats=momentum,min_rows=2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {r["cell"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch.nn.LSTM", "bn_rhn", "bn_rhn:stats=momentum,min_rows=2"}
    bad = subprocess.run(cmd[:-2] + ["bn_rhn:stats"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "NAME:KEY=VALUE" in bad.stderr


def test_lm_benchmark_trains_both_and_prints_the_table(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
    out = tmp_path / "lm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lm.py"), "--text", str(text), "--hidden", "8", "--layers", "1",
           "--embed", "8", "--batch", "4", "--seq-len", "10", "--windows", "5", "--rounds", "1", "--threads", "1",
           "--ablations", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 4 and rows["char-rnn (nn.LSTM, plain loop)"]["speed_vs_char_rnn"] == 1.0
    for name, r in rows.items():
        assert r["chars_per_s"] > 0 and 0 < r["valid_loss"] < 10, name
    assert run.stdout.count("\n| ") >= 5


def test_features_benchmark_times_every_row(tmp_path):
    from PIL import Image

    try:
        from bnrhn.encoders import find_mobilenet_weights

        find_mobilenet_weights()
    except FileNotFoundError as exc:
        import pytest

        pytest.skip(str(exc))
    for i in range(4):
        Image.new("RGB", (40 + i, 30), (60 * i, 20, 90)).save(tmp_path / f"{i}.jpg")
    out = tmp_path / "features.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "features.py"), "--folder", str(tmp_path), "--images", "4",
           "--batch", "2", "--rounds", "1", "--threads", "1", "--no-compile", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"][:2] for r in rows[:4]] == ["1.", "2.", "3.", "4."] and "end to end, eager CNN" in rows[4]["what"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert all(r["max_abs_diff"] < 1e-3 for r in rows[:4])  # folding, layout, chunks change no number beyond rounding


def test_scst_benchmark_prints_its_parts():
    data = ROOT.parent / "shared" / "data" / "flickr8k" / "Flickr8k.token.txt"
    if not data.is_file():
        pytest.skip(f"benchmarks/scst.py rewards against Flickr8k's captions; not found at {data}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scst.py"), "--steps", "1", "--images", "2", "--samples", "2",
           "--max-len", "5", "--threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    for part in ("sampling (no gradient)", "reward: tokenize + CIDEr-D", "teacher-forced log p + backward",
                 "**SCST step** | ", "cross-entropy step, 4 reference captions"):
        assert part in run.stdout, part


def test_train_step_benchmark():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--models", "show_tell", "show_attend_tell",
           "--cells", "lstm", "bn_rhn", "--batch", "4", "--hidden", "8", "--grid", "4", "--features", "6",
           "--vocab", "20", "--steps", "1", "--rounds", "1", "--threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| show")]
    assert [r.split("|")[1].strip() for r in rows] == ["show_tell lstm", "show_tell bn_rhn", "show_attend_tell lstm",
                                                       "show_attend_tell bn_rhn"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)
