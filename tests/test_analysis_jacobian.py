"""The temporal Jacobian A = ∂s_t/∂s_(t−1): equal to torch.autograd.functional.jacobian and to central finite
differences in float64 on the cell's step, the identity for an RHN whose gates carry everything, and the
Geršgorin discs of a matrix worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian as autograd_jacobian

from bnrhn.analysis.common import calibrate_batchnorm, fresh_model
from bnrhn.analysis.jacobian import gershgorin_discs, jacobian_along_sequence, spectrum, step_jacobian
from bnrhn.cells import build_cell
from bnrhn.data.text import CharVocab

CELLS = ["rnn", "lstm", "gru", "rhn", "bn_rhn", "bn_rhn_tf", "bn_lstm"]
TEXT = "the quick brown fox jumps over the lazy dog; " * 30


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add synchronisation (and are very slow on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_jacobian(cell, xp, state, step):
    """∂ vec(state_t) / ∂ vec(state_(t−1)) with torch.autograd.functional.jacobian (one input per state part)."""
    def f(*parts):
        return torch.cat(cell.recur(xp, tuple(parts), step), dim=1).reshape(-1)

    blocks = autograd_jacobian(f, tuple(state))  # one [S_out, 1, H] block per state part
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


@torch.no_grad()
def finite_difference_jacobian(cell, xp, state, step, eps=1e-6):
    """∂ vec(state_t) / ∂ vec(state_(t−1)) by central differences in float64, one column per state entry:
    (f(s + ε e_j) − f(s − ε e_j)) / 2ε, with f one call of ``cell.recur`` (no autograd involved; without
    autograd a step consumes its projected input in place, so every call gets a copy)."""
    sizes = [p.shape[1] for p in state]
    s0 = torch.cat(state, dim=1).double().reshape(-1)

    def f(s_flat):
        parts = tuple(p.reshape(1, -1) for p in s_flat.split(sizes))
        return torch.cat(cell.recur(xp.detach().clone(), parts, step), dim=1).reshape(-1)

    cols = []
    for j in range(s0.numel()):
        e = torch.zeros_like(s0)
        e[j] = eps
        cols.append((f(s0 + e) - f(s0 - e)) / (2 * eps))
    return torch.stack(cols, dim=1)


def trained_like_cell(name, H=6, I=5):
    torch.manual_seed(1)
    opts = {"depth": 2} if "rhn" in name else {}
    cell = build_cell(name, I, H, **opts).double()
    if any(k in name for k in ("bn_",)):
        # Give batch norm non-trivial population statistics, then evaluate with them.
        cell.train()
        x = torch.randn(3, 32, I, dtype=torch.double)
        state = cell.init_state(32, dtype=torch.double)
        xp = cell.project_input(x, 0)
        for t in range(3):
            state = cell.recur(xp[t], state, t)
    return cell.eval()


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("part", ["full", "h"])
def test_step_jacobian_equals_autograd_functional_jacobian(name, part):
    cell = trained_like_cell(name)
    H = cell.hidden_size
    g = torch.Generator().manual_seed(2)
    xp = cell.project_input(torch.randn(1, cell.input_size, generator=g, dtype=torch.double), 2)
    state = tuple(torch.randn(1, H, generator=g, dtype=torch.double) * 0.5 for _ in cell.state_names)
    A = step_jacobian(cell, xp, state, step=2, part=part)
    ref = reference_jacobian(cell, xp, state, 2)
    fd = finite_difference_jacobian(cell, xp, state, 2)  # independent of autograd
    if part == "h":
        ref, fd = ref[:H, :H], fd[:H, :H]
    S = H * (len(cell.state_names) if part == "full" else 1)
    assert A.shape == (S, S)
    torch.testing.assert_close(A, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A, fd, rtol=1e-6, atol=1e-8)


def test_rhn_that_carries_everything_has_identity_jacobian():
    """t = 0, c = 1 (transform bias −50, coupled carry): s_t = s_(t−1), so every eigenvalue is 1 and every
    Geršgorin disc is the point 1 — whatever the weights and the input (Zilly et al.'s argument)."""
    torch.manual_seed(0)
    cell = build_cell("rhn", 7, 16, depth=3, transform_bias=-50.0).eval()
    with torch.no_grad():
        for w in cell.weight_hh:  # one recurrent matrix per highway layer
            w.mul_(5.0)  # large recurrent weights do not matter when the gates carry
    xp = cell.project_input(torch.randn(1, 7) * 3, 0)
    A = step_jacobian(cell, xp, (torch.randn(1, 16),), step=0)
    torch.testing.assert_close(A, torch.eye(16), rtol=0, atol=1e-6)
    sp = spectrum(A)
    assert torch.allclose(sp["eigvals"], torch.ones(16, dtype=torch.complex128), atol=1e-6)
    assert sp["spectral_radius"] == pytest.approx(1.0, abs=1e-6) and sp["sigma_max"] == pytest.approx(1.0, abs=1e-6)
    centres, radii = gershgorin_discs(A)
    assert torch.allclose(centres, torch.ones(16), atol=1e-6) and float(radii.max()) < 1e-6


def test_gershgorin_discs_of_a_matrix_worked_out_by_hand():
    """Row discs: centre a_ii, radius Σ_(j≠i) |a_ij| — not the column sums (1, 2, 4.5 here), and the
    magnitude of a negative diagonal entry is not part of its radius."""
    A = torch.tensor([[2.0, -1.0, 0.5],
                      [0.0, -3.0, 4.0],
                      [1.0, -1.0, 1.0]], dtype=torch.double)
    centres, radii = gershgorin_discs(A)
    assert centres.tolist() == [2.0, -3.0, 1.0]
    assert radii.tolist() == [1.5, 4.0, 2.0]  # |−1| + |0.5|, |0| + |4|, |1| + |−1|


def test_gershgorin_discs_and_spectrum_against_numpy():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(12, 12, generator=g, dtype=torch.double)
    centres, radii = gershgorin_discs(A)
    a = A.numpy()
    assert np.allclose(centres.numpy(), np.diag(a))
    assert np.allclose(radii.numpy(), np.abs(a).sum(1) - np.abs(np.diag(a)))
    sp = spectrum(A)
    assert sp["spectral_radius"] == pytest.approx(np.abs(np.linalg.eigvals(a)).max())
    assert sp["sigma_max"] == pytest.approx(np.linalg.norm(a, 2))


@pytest.mark.parametrize("name", ["lstm", "bn_rhn"])
def test_jacobian_along_a_sequence_follows_the_model(name):
    vocab = CharVocab.from_texts(TEXT)
    ids = vocab.encode(TEXT)
    am = fresh_model(name, vocab, hidden_size=8, window=12, seed=0)
    calibrate_batchnorm(am.model, ids, 12, batches=3, batch_size=8)
    model = am.model.double()
    seq = ids[:12]
    tr = jacobian_along_sequence(model, seq, window=12)
    assert len(tr) == 12 and len(tr.spectral_radius) == 12
    # Step 5's matrix equals the reference Jacobian at the model's own state before step 5.
    cell = model.cells[0]
    with torch.no_grad():
        x = model.embedding(seq.unsqueeze(1))
        state = model.init_state(1)
        for t in range(5):
            state = [cell.recur(cell.project_input(x[t], t), state[0], t)]
    xp = cell.project_input(x[5], 5)
    ref = reference_jacobian(cell, xp, state[0], 5)
    torch.testing.assert_close(tr.matrices[5], ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tr.matrices[5], finite_difference_jacobian(cell, xp, state[0], 5), rtol=1e-6, atol=1e-8)
    sp = spectrum(tr.matrices[5])
    assert tr.spectral_radius[5] == pytest.approx(sp["spectral_radius"])
    assert tr.sigma_max[5] >= tr.spectral_radius[5] - 1e-9  # ρ(A) ≤ ‖A‖₂
