"""‖∂L_T/∂h_t‖ over t, highway gate activity, and the `bnrhn analyze` commands' outputs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bnrhn.analysis.common import fresh_model, text_windows
from bnrhn.analysis.gates import gate_activity
from bnrhn.analysis.gradients import gradient_norms
from bnrhn.analysis.jacobian import step_jacobian
from bnrhn.cli import main
from bnrhn.data.text import CharVocab
from figure_support import assert_readable, saved_figures  # noqa: F401  (fixture)

TEXT = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n") * 10


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add synchronisation (and are very slow on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text():
    vocab = CharVocab.from_texts(TEXT)
    return vocab, vocab.encode(TEXT)


def test_small_rnn_gradients_vanish_while_lstm_with_forget_bias_keeps_them(text):
    vocab, ids = text
    windows = text_windows(ids, 40, 16, seed=0)
    rnn = fresh_model("rnn", vocab, 32, 40, seed=0).model.double()
    with torch.no_grad():
        rnn.cells[0].weight_hh.mul_(0.5)  # small recurrent weights: ‖W_hh‖ < 1
    lstm = fresh_model("lstm:forget_bias=1", vocab, 32, 40, seed=0).model.double()
    g_rnn = gradient_norms(rnn, windows).summary()["geomean"]  # index = distance T − t
    g_lstm = gradient_norms(lstm, windows).summary()["geomean"]
    rel_rnn = [v / g_rnn[0] for v in g_rnn]
    rel_lstm = [v / g_lstm[0] for v in g_lstm]
    # The RNN's gradient shrinks with distance, by orders of magnitude.
    assert all(b < a for a, b in zip(rel_rnn[1:30], rel_rnn[2:31]))
    assert rel_rnn[10] < 1e-3 and rel_rnn[30] < 1e-12
    # The LSTM keeps it larger from two steps back on, by orders of magnitude beyond a few steps: its
    # memory path c_t = σ(f) ⊙ c_(t−1) + … shrinks by only about σ(f) ≈ σ(1) per step. (One step back
    # its h-gradient drops more than the RNN's: the output gate and tanh lie between h and the memory.)
    assert all(l > r for l, r in zip(rel_lstm[2:], rel_rnn[2:]))
    assert all(l > 100 * r for l, r in zip(rel_lstm[8:], rel_rnn[8:]))
    # 10 steps back the LSTM keeps ~1e-2 of the gradient (0.0100 with a U(−0.1, 0.1) embedding, 0.0099 with
    # nn.Embedding's N(0, 1)), where the RNN keeps < 1e-3
    assert rel_lstm[10] > 5e-3 and rel_lstm[39] > 1e-5


def test_gradient_norms_equal_the_product_of_step_jacobians(text):
    """∂L_T/∂h_t = ∂L_T/∂h_T · A_T ⋯ A_(t+1): the two analyses agree."""
    vocab, ids = text
    model = fresh_model("gru", vocab, 10, 12, seed=1).model.double().eval()
    win = text_windows(ids, 12, 1, seed=3)
    flow = gradient_norms(model, win)
    cell = model.cells[0]
    with torch.no_grad():
        x = model.embedding(win[:-1])
        states, s = [], model.init_state(1)[0]
        for t in range(12):
            states.append(s)
            s = cell.recur(cell.project_input(x[t], t), s, t)
    h_T = s[0].detach().requires_grad_(True)
    loss = F.cross_entropy(model.decoder(h_T), win[-1])
    (g,) = torch.autograd.grad(loss, h_T)
    expected = [None] * 12
    expected[11] = g.norm().item()
    for t in range(11, 0, -1):  # g ← g · A_(t+1), A from the Jacobian analysis
        A = step_jacobian(cell, cell.project_input(x[t], t), states[t], t)
        g = g @ A
        expected[t - 1] = g.norm().item()
    assert flow.h[:, 0].tolist() == pytest.approx(expected, rel=1e-9)


def test_gradient_norms_leave_parameters_alone(text):
    vocab, ids = text
    model = fresh_model("lstm", vocab, 8, 10).model
    gradient_norms(model, text_windows(ids, 10, 2))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_gate_activity_per_depth(text):
    vocab, ids = text
    carry = fresh_model("rhn:depth=3,transform_bias=-50", vocab, 16, 20).model
    g = gate_activity(carry, text_windows(ids, 20, 4)[:-1])
    assert len(g.transform_mean[0]) == 3
    assert max(g.transform_mean[0]) < 1e-6 and min(g.carry_mean[0]) > 1 - 1e-6
    free = fresh_model("bn_rhn:depth=2", vocab, 16, 20).model
    g2 = gate_activity(free, text_windows(ids, 20, 4)[:-1], window=20)
    assert g2.carry_kind == ["free"] and all(0 < v < 1 for v in g2.transform_mean[0] + g2.carry_mean[0])
    assert g2.per_step[0].shape == (20, 2, 2)
    with pytest.raises(ValueError, match="needs highway cells"):
        gate_activity(fresh_model("lstm", vocab, 8, 10).model, text_windows(ids, 10, 2)[:-1])


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_analyze_commands_write_figures_and_numbers(tmp_path, capsys, saved_figures):
    path = tmp_path / "richard.txt"
    path.write_text(TEXT, encoding="utf-8")
    common = ["--text", str(path), "--hidden", "8", "--length", "12", "--quiet"]
    assert main(["analyze", "gradients", *common, "--cells", "rnn,lstm,bn_rhn", "--batch", "4",
                 "--out", str(tmp_path / "g")]) == 0
    rep = json.loads((tmp_path / "g" / "gradients.json").read_text())
    assert set(rep["results"]) == {"vanilla RNN", "LSTM", "BN-RHN"}
    assert len(rep["results"]["LSTM"]["h"]["geomean"]) == 12
    rows = list(csv.DictReader((tmp_path / "g" / "gradients.csv").open()))
    assert len(rows) == 36 and float(rows[0]["h_geomean"]) > 0
    assert (tmp_path / "g" / "gradients.png").stat().st_size > 10_000

    assert main(["analyze", "jacobian", *common, "--cells", "rnn,lstm,rhn,bn_rhn", "--out", str(tmp_path / "j")]) == 0
    rep = json.loads((tmp_path / "j" / "jacobian.json").read_text())
    lstm = rep["results"]["LSTM"]
    assert lstm["size"] == 16 and lstm["state"] == "s = [h, c]" and len(lstm["spectral_radius"]) == 12
    for label, r in rep["results"].items():  # the discs and eigenvalues reported are those of one matrix A_t
        centres, radii = r["discs"]["centres"], r["discs"]["radii"]
        re_, im = r["eigenvalues"]["real"], r["eigenvalues"]["imag"]
        assert len(centres) == len(radii) == len(re_) == len(im) == r["size"] and min(radii) >= 0, label
        # tr A = Σ_i a_ii (the centres) = Σ λ_i, and the λ_i of a real matrix come in conjugate pairs
        assert sum(centres) == pytest.approx(sum(re_), abs=1e-8) and sum(im) == pytest.approx(0, abs=1e-8), label
        rho = max(math.hypot(a, b) for a, b in zip(re_, im))
        assert rho == pytest.approx(r["spectral_radius"][r["disc_step"] - 1]), label
    for f in ("jacobian_spectrum.png", "gershgorin.png", "jacobian.csv", "gershgorin.csv", "eigenvalues.csv"):
        assert (tmp_path / "j" / f).stat().st_size > 100
    assert "mean ρ(A)" in capsys.readouterr().out

    assert main(["analyze", "gates", *common, "--batch", "2", "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "gates.json").read_text())
    assert set(rep["results"]) == {"RHN", "BN-RHN", "BN-RHN (TF code)"}
    assert (tmp_path / "a" / "gates.png").exists()
    assert len(saved_figures) == 4  # gradients, spectrum, Geršgorin, gates
    for fig in saved_figures:
        assert_readable(fig)

    # Bad input: a sequence length below 2, an unknown cell, a binary file.
    assert main(["analyze", "gradients", "--text", str(path), "--length", "1", "--out", str(tmp_path / "x")]) == 2
    assert "≥ 2" in capsys.readouterr().err
    assert main(["analyze", "jacobian", *common, "--cells", "transformer", "--out", str(tmp_path / "x")]) == 2
    assert "unknown cell 'transformer'" in capsys.readouterr().err
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"ab\x00cd")
    assert main(["analyze", "gates", "--text", str(blob), "--out", str(tmp_path / "x")]) == 2
    assert "NUL byte at byte offset 2" in capsys.readouterr().err
