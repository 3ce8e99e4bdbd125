"""The C++ loops' batch split (``bnrhn/kernels/batch_split.py``, ``team.h``): every step's rows shared by threads,
which meet where batch norm combines its column sums and where the rows move between them. Against the
autograd composition (float64, to 1e-12), float64 again in float32, finite differences, and the team's own
mechanics (a thread's error, no team to be had)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from bnrhn.kernels import batch_split
from bnrhn.nn import Recurrent, SequenceBatchNorm

from test_fused_paths import FUSED_CASES, _run, check_fused_equals_composition

# the cases a C++ loop runs (steps sharing statistics stay in Python: max_steps, per_step=False), and MUT1–3
LOOP_CASES = [(n, o) for n, o in FUSED_CASES if "max_steps" not in o and o.get("per_step", True)] + [
    ("mut1", {}), ("mut2", {}), ("mut3", {})]


@pytest.fixture
def parts_used(monkeypatch):
    """The parts the C++ loops were given, call by call."""
    seen: list[int] = []
    original = batch_split.parts
    monkeypatch.setattr(batch_split, "parts", lambda *a: seen.append(original(*a)) or seen[-1])
    return seen


@pytest.mark.parametrize("name,opts", LOOP_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LOOP_CASES)])
@pytest.mark.parametrize("lengths", [None, (7, 4, 6, 7), (7, 4, 6, 2)], ids=["full", "packed", "one-row-step"])
@pytest.mark.parametrize("parts", [2, 3])
def test_split_loop_equals_the_autograd_composition(name, opts, lengths, parts, loop_ops, parts_used, monkeypatch):
    """Four rows in 2 or 3 parts (3: one thread has one row, and none once the rows drop to 2), with packed
    rows, recurrent dropout, two layers; outputs, final states, every gradient and the population statistics."""
    monkeypatch.setenv("BNRHN_BATCH_SPLIT", str(parts))
    inputs = 6 if name in ("mut1", "mut2") else 5  # MUT1 and MUT2 add x_t to hidden-sized vectors
    check_fused_equals_composition(name, opts, lengths, inputs)
    batch_normed = name == "bn_lstm" or (name == "bn_rhn" and opts.get("normalize", "h") != "")
    one_row_step = lengths is not None and any(sum(n > t for n in lengths) == 1 for t in range(7))
    if not (batch_normed and one_row_step):  # no batch statistics of one row: these cells leave the loop for it
        assert parts_used and set(parts_used) == {parts}
        assert loop_ops.last_team_size() == parts  # and the C++ loop ran on that many threads


@pytest.mark.parametrize("name,opts,steps", [
    ("rhn", {}, 5), ("bn_rhn", {"stats": "momentum", "normalize": "h,t"}, 5),
    ("bn_rhn", {"stats": "renorm", "renorm_rmax": 1.05, "renorm_dmax": 0.01, "renorm_warmup": 0, "normalize": "h,c"}, 5),
    ("bn_rhn_tf", {"normalize": "h,c"}, 4), ("gru", {}, 5), ("rnn", {}, 4), ("mut2", {}, 5), ("mut3", {}, 4),
    ("bn_lstm", {"stats": "momentum"}, 5), ("bn_lstm", {"stats": "momentum", "carry_norm": "recurrence"}, 4)])
def test_split_loop_gradcheck(name, opts, steps, loop_ops, parts_used, monkeypatch):
    """The split loops against finite differences: lengths (steps, steps, 2, 3) in two parts (the rows move at
    the third and fourth steps), recurrent dropout, an initial state (h0, and c0 for BN-LSTM: their gradients
    are the loops' last swap, at an odd and an even number of steps), two layers (RHN depth 2); every input and
    parameter."""
    monkeypatch.setenv("BNRHN_BATCH_SPLIT", "2")
    torch.manual_seed(0)
    extra = {"depth": 2} if "rhn" in name else {}
    rnn = Recurrent(name, 4, 4, num_layers=2, recurrent_dropout=0.3, **extra, **opts).double()
    names = [n for n, _ in rnn.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]
    x = torch.randn(steps, 4, 4, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    norms = [m for m in rnn.modules() if isinstance(m, SequenceBatchNorm)]

    def f(x, s0, *ps):
        torch.manual_seed(1)
        for bn in norms:  # the same population statistics at every evaluation
            bn.running_mean.fill_(50.0)
            bn.running_var.fill_(100.0)
            bn.num_batches_tracked.fill_(1)
        state = [(s0, s0.flip(0)), (s0.flip(1), s0)] if name == "bn_lstm" else [(s0,), (s0,)]
        out, final = torch.func.functional_call(rnn, dict(zip(names, ps)), (x,),
                                                {"lengths": torch.tensor([steps, steps, 2, 3]), "state": state})
        return out, *(a for layer in final for a in layer)

    assert torch.autograd.gradcheck(f, (x, s0, *params), fast_mode=True)
    assert parts_used and set(parts_used) == {2}
    assert loop_ops.last_team_size() == 2


@pytest.mark.parametrize("name", ["rhn", "bn_rhn", "bn_rhn_tf"])
def test_auto_split_in_float32_is_float64s_to_float32_precision(name, loop_ops, parts_used, monkeypatch):
    """``auto`` at 64 rows with two threads splits in two; the float32 result against the float64 composition."""
    monkeypatch.setenv("BNRHN_BATCH_SPLIT", "auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        fast = Recurrent(name, 8, 16, depth=3)
        reference = Recurrent(name, 8, 16, depth=3, fused=False).double()
        reference.load_state_dict(fast.state_dict())
        x = torch.randn(6, 64, 8)
        lengths = torch.randint(2, 7, (64,))
        lengths[0] = 6
        parts_used.clear()
        out32, final32, grads32 = _run(fast, x.clone().requires_grad_(), lengths, seed=3)
    finally:
        torch.set_num_threads(threads)
    out64, final64, grads64 = _run(reference, x.double().requires_grad_(), lengths, seed=3)
    assert parts_used and set(parts_used) == {2}
    assert loop_ops.last_team_size() == 2
    assert torch.allclose(out32.double(), out64, atol=5e-5, rtol=0)
    assert torch.allclose(final32[-1][0].double(), final64[-1][0], atol=2e-5, rtol=0)
    for g32, g64, (pname, _) in zip(grads32, grads64, [("x", None), *fast.named_parameters()]):
        assert torch.allclose(g32.double(), g64, atol=1e-4, rtol=1e-4), pname


@pytest.mark.parametrize("name,opts", [("bn_rhn", {}), ("rhn", {}), ("bn_rhn_tf", {}), ("bn_lstm", {}),
                                       ("bn_lstm", {"carry_norm": "recurrence", "stats": "momentum"}), ("gru", {}),
                                       ("rnn", {}), ("mut1", {}), ("mut3", {})])
def test_a_larger_batch_in_three_parts_repeatedly(name, opts, loop_ops, parts_used, monkeypatch):
    """Races show more on more rows: 48 rows of 32 units in 3 parts (more threads than this machine's cores),
    lengths 1–12 (rows leave at nearly every step), five runs, each against the composition in float64."""
    monkeypatch.setenv("BNRHN_BATCH_SPLIT", "3")
    torch.manual_seed(0)
    kw = dict(recurrent_dropout=0.2, **({"depth": 3} if "rhn" in name else {}), **opts)
    inputs = 32 if name == "mut1" else 8  # MUT1 adds x_t to hidden-sized vectors
    fused = Recurrent(name, inputs, 32, **kw).double()
    reference = Recurrent(name, inputs, 32, fused=False, **kw).double()
    reference.load_state_dict(fused.state_dict())
    for run in range(5):
        x = torch.randn(12, 48, inputs, dtype=torch.float64, requires_grad=True)
        lengths = torch.randint(2, 13, (48,))
        lengths[:2] = 12
        out_f, final_f, grads_f = _run(fused, x, lengths, seed=run)
        assert loop_ops.last_team_size() == 3
        out_r, final_r, grads_r = _run(reference, x, lengths, seed=run)
        assert torch.allclose(out_f, out_r, atol=1e-12, rtol=0), run
        for sf, sr in zip(final_f, final_r):
            for a, b in zip(sf, sr):
                assert torch.allclose(a, b, atol=1e-12, rtol=0), run
        for gf, gr in zip(grads_f, grads_r):
            assert torch.allclose(gf, gr, atol=1e-10, rtol=0), run


def test_the_rule(monkeypatch):
    monkeypatch.setenv("BNRHN_BATCH_SPLIT", "auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert batch_split.parts(64, 128, onednn_products=False) == 2
        assert batch_split.parts(31, 128, onednn_products=False) == 1  # 16 rows a thread at least
        assert batch_split.parts(64, 128, onednn_products=True) == 1  # oneDNN's products on the whole batch
        assert batch_split.parts(64, batch_split.MAX_HIDDEN, onednn_products=False) == 1
        assert batch_split.parts(64, batch_split.MAX_HIDDEN - 1, onednn_products=False) == 2
        torch.set_num_threads(1)
        assert batch_split.parts(64, 128, onednn_products=False) == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("BNRHN_BATCH_SPLIT", "off")
    assert batch_split.parts(64, 128, onednn_products=False) == 1
    monkeypatch.setenv("BNRHN_BATCH_SPLIT", "3")
    assert batch_split.parts(64, 1024, onednn_products=True) == 3
    assert batch_split.parts(2, 128, onednn_products=False) == 2  # never more parts than rows
    for wrong in ("0", "two", "-1", "²", "257"):
        monkeypatch.setenv("BNRHN_BATCH_SPLIT", wrong)
        with pytest.raises(ValueError, match="BNRHN_BATCH_SPLIT"):
            batch_split.parts(64, 128, onednn_products=False)


def test_a_mistyped_setting_stops_training_before_it_starts(monkeypatch, tmp_path, capsys):
    from bnrhn.cli import main

    from bnrhn.training import Trainer

    monkeypatch.setenv("BNRHN_BATCH_SPLIT", "two")
    fits: list[int] = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(1) or original_fit(self, *a, **k))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    rc = main(["lm", "train", "--text", str(text), "--cell", "rnn", "--hidden", "8", "--embed", "4", "--batch-size", "4",
               "--seq-len", "10", "--max-steps", "2", "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "BNRHN_BATCH_SPLIT must be auto, off or a number of parts from 1 to 256, got 'two'" in err
    assert not fits  # said before training began
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_team_runs_its_parts_at_once(loop_ops):
    """Each thread of a team of three sees the team whole, and all pass three barriers."""
    assert sorted(loop_ops.team_check(3, -1, False)) == [0, 1, 2]


def test_a_failing_thread_releases_the_others_and_its_error_reaches_the_caller(loop_ops):
    with pytest.raises(RuntimeError, match="team_check: thread 1 fails"):
        loop_ops.team_check(3, 1, False)
    assert sorted(loop_ops.team_check(2, -1, False)) == [0, 1]  # the next team forms as usual


def test_no_team_inside_a_parallel_region_runs_one_part(loop_ops):
    """Asked for from inside another OpenMP parallel region, where OpenMP gives no more threads, the loop runs
    in one part instead of waiting for threads that never come."""
    assert loop_ops.team_check(2, -1, True) == [0]


_UNSPLIT = """
import os, torch
from bnrhn import kernels
from bnrhn.nn import Recurrent
ops = kernels.build()
os.environ["BNRHN_BATCH_SPLIT"] = "2"
torch.manual_seed(0)
rnn = Recurrent("bn_rhn", 5, 6, depth=2).double()
out, _ = rnn(torch.randn(4, 8, 5, dtype=torch.float64))
out.sum().backward()
print(ops.last_team_size())
"""


@pytest.mark.slow
def test_a_compiler_without_openmp_builds_the_kernels_unsplit(tmp_path):
    """A compiler that refuses -fopenmp (clang without its OpenMP library): the kernels are built without it,
    said in one line, and the loops run in one part; the next process finds that build and tries no other."""
    real = shutil.which(os.environ.get("CXX", "c++"))
    if real is None:
        pytest.skip("no C++ compiler here")
    cxx = tmp_path / "c++"
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do if [ "$a" = "-fopenmp" ]; then '
                   'echo "c++: error: unsupported option -fopenmp" >&2; exit 1; fi; done\n'
                   f'exec {real} "$@"\n')
    cxx.chmod(0o755)
    env = {**os.environ, "CXX": str(cxx), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "BNRHN_GATE_KERNELS": "on"}
    first = subprocess.run([sys.executable, "-c", _UNSPLIT], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[-1] == "1"  # one part: no OpenMP team
    said = [line for line in first.stderr.splitlines() if "could not build with OpenMP" in line]
    assert len(said) == 1 and "unsplit" in said[0], first.stderr
    again = subprocess.run([sys.executable, "-c", _UNSPLIT], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.split()[-1] == "1", again.stderr
    assert "building" not in again.stderr and "OpenMP" not in again.stderr, again.stderr
