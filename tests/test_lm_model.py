"""Character LM: the model, evaluation (nats, BPC, perplexity), sampling, the TBPTT training task with
exact resume, and the `bnrhn lm` command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bnrhn.cli import main
from bnrhn.data.text import CharCorpus, CharVocab
from bnrhn.lm.evaluate import LMScore, bits_per_char, evaluate_ids, perplexity
from bnrhn.lm.sample import sample_text
from bnrhn.lm.task import CharLMTask, load_char_lm
from bnrhn.lm.train import LMTrainConfig, train_char_lm
from bnrhn.models.char_lm import CharLM
from bnrhn.training import Trainer, TrainerConfig, build_optimizer, read_log

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\n") * 12


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add synchronisation (and are very slow on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "austen.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def tiny_model(vocab_size, cell="lstm", hidden=16, seed=0, **kw):
    torch.manual_seed(seed)
    return CharLM(vocab_size, cell, hidden, embed_size=8, **kw)


# ---------------------------------------------------------------------------------------------- metrics
def test_bpc_and_perplexity_are_consistent_with_the_loss():
    for loss in (0.0, 0.7, 1.5, math.log(65)):
        s = LMScore.from_loss(loss, 10)
        assert s.bpc == pytest.approx(loss / math.log(2)) and s.perplexity == pytest.approx(math.exp(loss))
        assert 2 ** s.bpc == pytest.approx(s.perplexity)  # bits and nats describe the same quantity
    assert bits_per_char(math.log(2)) == pytest.approx(1.0) and perplexity(1e6) == math.inf


@pytest.mark.parametrize("cell", ["lstm", "rhn"])
def test_evaluation_equals_the_loss_of_one_unbroken_pass(cell):
    """Carrying the state across windows must equal reading the whole text in one sequence."""
    vocab = CharVocab.from_texts(TEXT)
    ids = vocab.encode(TEXT[:300])
    model = tiny_model(len(vocab), cell).eval()
    with torch.no_grad():
        logits, _ = model(ids[:-1].unsqueeze(1))
        ref = F.cross_entropy(logits.squeeze(1).double(), ids[1:]).item()
    s = evaluate_ids(model, ids, batch_size=1, seq_len=7)
    assert s.chars == 299 and s.loss == pytest.approx(ref, rel=1e-5)
    assert s.bpc == pytest.approx(ref / math.log(2), rel=1e-5) and s.perplexity == pytest.approx(math.exp(ref), rel=1e-5)
    # Several streams score the same N − 1 characters (with less context at the stream starts).
    s4 = evaluate_ids(model, ids, batch_size=4, seq_len=7)
    assert s4.chars == 299 and abs(s4.loss - ref) < 0.05


def test_reset_state_evaluation_scores_each_window_from_zero():
    vocab = CharVocab.from_texts(TEXT)
    ids = vocab.encode(TEXT[:141])  # 140 predictions = 20 windows of 7
    model = tiny_model(len(vocab), "gru").eval()
    with torch.no_grad():
        x, y = ids[:-1].reshape(20, 7).t(), ids[1:].reshape(20, 7).t()  # [7, 20]: the windows side by side
        logits, _ = model(x)
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1)).item()
    s = evaluate_ids(model, ids, batch_size=1, seq_len=7, carry_state=False)
    assert s.loss == pytest.approx(ref, rel=1e-6)
    assert evaluate_ids(model, ids, batch_size=1, seq_len=7).loss != pytest.approx(ref, rel=1e-6)


def test_task_without_carried_state_starts_every_window_from_zero():
    task = make_task()
    w = list(task.batches(0))
    with torch.no_grad():  # train_step does not update the weights (the trainer does): losses can be compared
        from_zero = float(task.train_step(w[1])[0])  # no state carried yet
        task.train_step(w[0])
        carried = float(task.train_step(w[1])[0])  # from window 0's final state
        task.carry_state = False
        task.train_step(w[0])
        assert task.carried is None  # nothing to carry, nothing saved in a checkpoint
        reset = float(task.train_step(w[1])[0])
    assert reset == pytest.approx(from_zero, abs=1e-6)
    assert abs(carried - from_zero) > 1e-4  # the carried state does change the loss: the check above can fail


def test_weight_tying_needs_equal_sizes():
    m = CharLM(10, "gru", 12, tie_weights=True)
    assert m.decoder.weight is m.embedding.weight
    with pytest.raises(ValueError, match="embedding size \\(8\\) must equal the hidden size \\(12\\)"):
        CharLM(10, "gru", 12, embed_size=8, tie_weights=True)


# ---------------------------------------------------------------------------------------------- sampling
def test_greedy_sampling_is_deterministic_and_starts_with_the_prime():
    vocab = CharVocab.from_texts(TEXT)
    model = tiny_model(len(vocab), "bn_lstm", max_steps=10)
    a = sample_text(model, vocab, "It is", 40, temperature=0.0, seed=1, window=10)
    b = sample_text(model, vocab, "It is", 40, temperature=0.0, seed=2, window=10)
    assert a == b and a.startswith("It is") and len(a) == 45
    c = sample_text(model, vocab, "a", 30, temperature=1.0, seed=3)
    d = sample_text(model, vocab, "a", 30, temperature=1.0, seed=3)
    e = sample_text(model, vocab, "a", 30, temperature=1.0, seed=4)
    assert c == d and c != e and set(c) <= set(vocab.chars)


def test_sampling_bad_input():
    vocab = CharVocab.from_texts(TEXT)
    model = tiny_model(len(vocab))
    with pytest.raises(ValueError, match=r"--prime: character 'Z' \(U\+005A.*\) at position 2"):
        sample_text(model, vocab, "ItZ", 5)
    with pytest.raises(ValueError, match="temperature must be a finite number ≥ 0"):
        sample_text(model, vocab, "It", 5, temperature=-0.5)
    with pytest.raises(ValueError, match="prime text is empty"):
        sample_text(model, vocab, "", 5)
    with pytest.raises(ValueError, match="length must be an integer ≥ 0"):
        sample_text(model, vocab, "It", -1)


# ---------------------------------------------------------------------------------------------- TBPTT task
def make_task(cell="lstm", seed=0, **model_kw):
    corpus = CharCorpus.from_text(TEXT, valid_fraction=0.1, test_fraction=0.1)
    model = tiny_model(len(corpus.vocab), cell, seed=seed, **model_kw)
    return CharLMTask(model, corpus, batch_size=4, seq_len=8)


def test_state_is_carried_across_windows_and_reset_each_epoch():
    task = make_task()
    windows = list(task.batches(0))
    task.train_step(windows[0])
    after0 = [t.clone() for t in task.carried[0]]
    assert all(not t.requires_grad for t in task.carried[0])  # detached: the gradient is truncated
    # Window 1 continues from the carried state: equal to running windows 0 and 1 as one sequence.
    task.model.eval()
    with torch.no_grad():
        joint, _ = task.model(torch.cat([windows[0].inputs, windows[1].inputs]))
        split, _ = task.model(windows[1].inputs, state=[tuple(after0)])
    assert torch.allclose(joint[8:], split, atol=1e-6)
    task.model.train()
    task.train_step(windows[1])
    task.train_step(windows[0])  # index 0 = a new epoch: state reset to zero
    again = task.carried[0][0]
    task.carried = None
    task.train_step(windows[0])
    assert torch.allclose(task.carried[0][0], again)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    def run(run_dir, max_steps, resume=False):
        task = make_task("bn_lstm", max_steps=8, dropout=0.2)
        opt = build_optimizer(task.model.parameters(), "adam", 1e-2)
        cfg = TrainerConfig(str(run_dir), max_epochs=2, max_steps=max_steps, grad_clip=1.0, select_metric="loss",
                            select_mode="min", validate_every=5, progress=False)
        Trainer(task, opt, None, cfg).fit(resume=resume)
        return [r["loss"] for r in read_log(run_dir / "log.jsonl") if r["kind"] == "train"]

    full = run(tmp_path / "a", 14)
    run(tmp_path / "b", 9)  # stops mid-epoch, with a carried state in the checkpoint
    resumed = run(tmp_path / "b", 14, resume=True)
    assert len(full) == 14 and resumed == full


# ---------------------------------------------------------------------------------------------- end to end
def test_train_sample_evaluate_cli(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["lm", "train", "--text", str(text_file), "--cell", "gru", "--hidden", "16", "--embed", "8",
               "--batch-size", "4", "--seq-len", "10", "--max-steps", "12", "--validate-every", "6",
               "--valid-fraction", "0.1", "--test-fraction", "0.1", "--run-dir", str(run), "--quiet", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best validation: loss" in out and "BPC" in out
    res = json.loads((run / "results.json").read_text())
    v = res["valid"]
    assert v["bpc"] == pytest.approx(v["loss"] / math.log(2)) and v["perplexity"] == pytest.approx(math.exp(v["loss"]))
    lm = load_char_lm(run / "best.pt")
    assert lm.vocab == CharVocab.from_texts(TEXT) and lm.seq_len == 10  # the vocabulary travels with the model

    assert main(["lm", "sample", str(run / "best.pt"), "--prime", "It is", "--temperature", "0", "--length", "30"]) == 0
    s1 = capsys.readouterr().out
    assert main(["lm", "sample", str(run / "best.pt"), "--prime", "It is", "--temperature", "0", "--length", "30"]) == 0
    assert capsys.readouterr().out == s1 and s1.startswith("It is")

    assert main(["lm", "evaluate", str(run / "best.pt"), "--text", str(text_file), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["chars"] == len(TEXT) - 1 and ev["bpc"] == pytest.approx(ev["loss"] / math.log(2))
    assert main(["lm", "evaluate", str(run), "--split", "valid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(v["loss"], rel=1e-6)

    # Resume with a larger budget continues the same run.
    assert main(["lm", "train", "--run-dir", str(run), "--resume", "--max-steps", "15", "--quiet"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 15


def test_cli_bad_input_gives_clear_errors(text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    base = ["lm", "train", "--hidden", "8", "--run-dir", str(tmp_path / "r"), "--quiet"]
    assert main(base + ["--text", str(empty)]) == 2
    assert "empty.txt: the text file is empty" in capsys.readouterr().err
    assert main(base + ["--text", str(binary)]) == 2
    assert "data.bin: NUL byte at byte offset 8" in capsys.readouterr().err
    assert main(base + ["--text", str(text_file), "--seq-len", "1"]) == 2
    assert "must be an integer ≥ 2, got 1" in capsys.readouterr().err
    assert main(base + ["--text", str(text_file), "--cell-option", "depth=3"]) == 2
    assert "not an option of cell 'lstm'" in capsys.readouterr().err

    run = tmp_path / "ok"
    assert main(["lm", "train", "--text", str(text_file), "--hidden", "8", "--batch-size", "4", "--seq-len", "5",
                 "--max-steps", "2", "--run-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["lm", "sample", str(run / "best.pt"), "--prime", "ROMEO:"]) == 2
    assert "character 'R' (U+0052 LATIN CAPITAL LETTER R) at position 0 is not in the model's vocabulary" in capsys.readouterr().err
    assert main(["lm", "sample", str(run / "best.pt"), "--temperature", "-1"]) == 2
    assert "temperature must be a finite number ≥ 0" in capsys.readouterr().err
    assert main(["lm", "evaluate", str(run / "best.pt"), "--text", str(binary)]) == 2
    assert "NUL byte" in capsys.readouterr().err
    # A second train into the same folder must not clobber the run.
    assert main(["lm", "train", "--text", str(text_file), "--hidden", "8", "--run-dir", str(run), "--quiet"]) == 2
    assert "already holds a training run" in capsys.readouterr().err


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_stacked_sgd_with_schedule_and_dropout_trains_and_analyses_from_its_checkpoint(text_file, tmp_path, capsys):
    """lm train with SGD, a step schedule, 2 stacked BN-RHN layers and all three dropouts lowers the
    loss; the schedule's lr is logged; the analysis commands read the checkpoint (and its own text)."""
    run = tmp_path / "run"
    rc = main(["lm", "train", "--text", str(text_file), "--cell", "bn_rhn", "--layers", "2", "--hidden", "16",
               "--embed", "8", "--cell-option", "depth=2", "--input-dropout", "0.1", "--dropout", "0.1",
               "--recurrent-dropout", "0.1", "--optimizer", "sgd", "--lr", "1.0", "--schedule", "step",
               "--step-size", "20", "--batch-size", "4", "--seq-len", "10", "--max-steps", "40",
               "--validate-every", "20", "--valid-fraction", "0.1", "--test-fraction", "0.1",
               "--run-dir", str(run), "--quiet", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rows = [r for r in (json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(rows) == 40
    assert [r["lr"] for r in rows] == pytest.approx([1.0] * 20 + [0.5] * 20)  # step schedule, factor 0.5
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])
    lm = load_char_lm(run / "best.pt")
    assert lm.model.config["num_layers"] == 2 and lm.model.config["cell"] == "bn_rhn"

    out = tmp_path / "fig"
    assert main(["analyze", "gradients", "--checkpoint", str(run / "best.pt"), "--length", "8", "--batch", "3",
                 "--out", str(out / "g"), "--quiet"]) == 0
    rep = json.loads((out / "g" / "gradients.json").read_text())
    assert list(rep["results"]) == ["BN-RHN (trained)"]
    assert main(["analyze", "jacobian", "--checkpoint", str(run / "best.pt"), "--text", str(text_file),
                 "--cells", "rnn", "--length", "8", "--hidden", "8", "--out", str(out / "j"), "--quiet"]) == 0
    rep = json.loads((out / "j" / "jacobian.json").read_text())
    assert set(rep["results"]) == {"vanilla RNN", "BN-RHN (trained)"}
    assert main(["analyze", "gates", "--checkpoint", str(run / "best.pt"), "--length", "8", "--batch", "2",
                 "--out", str(out / "a"), "--quiet"]) == 0
    gates = json.loads((out / "a" / "gates.json").read_text())["results"]["BN-RHN (trained)"]
    assert len(gates["transform_mean"]) == 2  # two stacked layers, each with its highway depths


def test_batchnorm_diagnostic_on_a_language_model(text_file, tmp_path, capsys):
    """``bnrhn analyze batchnorm`` on an LM checkpoint: batch vs population statistics on its validation
    text; the population loss is the one ``bnrhn lm evaluate`` reports."""
    run = tmp_path / "run"
    assert main(["lm", "train", "--text", str(text_file), "--cell", "bn_lstm", "--hidden", "16", "--embed", "8",
                 "--batch-size", "4", "--seq-len", "10", "--max-steps", "8", "--validate-every", "8",
                 "--valid-fraction", "0.2", "--test-fraction", "0.1", "--run-dir", str(run), "--quiet",
                 "--threads", "1"]) == 0
    assert load_char_lm(run / "best.pt").model.cells[0].bn_h.stats == "renorm"  # the cell's default, recorded
    capsys.readouterr()
    assert main(["analyze", "batchnorm", str(run / "best.pt"), "--out", str(tmp_path / "diag"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "population statistics (inference)" in printed and "language-model batches" in printed
    data = json.loads((tmp_path / "diag" / "batchnorm.json").read_text())
    assert set(data["modes"]) == {"batch", "population"} and data["kind"] == "lm"
    assert main(["lm", "evaluate", str(run / "best.pt"), "--split", "valid", "--batch-size", "4", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert data["modes"]["population"]["loss"] == pytest.approx(ev["loss"], rel=1e-6)
