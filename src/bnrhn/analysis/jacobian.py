"""The temporal Jacobian A_t = ∂s_t/∂s_{t−1} of a recurrent cell along a real sequence.

Backpropagation through time multiplies these matrices (∂L_T/∂s_t = ∂L_T/∂s_T · A_T ⋯ A_{t+1}), so
their spectra decide whether gradients vanish or explode: the spectral radius ρ(A) = max |λ_i| governs
the long-run growth of powers of a fixed matrix, the largest singular value σ_max(A) = ‖A‖₂ bounds how
much one step can stretch a gradient (‖vA‖ ≤ σ_max ‖v‖).

Geršgorin circle theorem (the argument of Zilly et al. for RHNs): every eigenvalue of A lies in the
union of the discs with centre a_ii and radius r_i = Σ_{j≠i} |a_ij|. For an RHN layer with a carry
gate c = 1 and transform gate t = 0, s_t = s_{t−1}, so A = I: every disc is the point 1 and every
eigenvalue is 1, whatever the weights. Trained highway layers move a_ii and r_i away from there only
as far as the gates open.

The state s is the cell's whole state: h for the vanilla RNN, GRU and RHN family, the concatenation
[h, c] (2H × 2H) for the LSTM family; ``part="h"`` takes the block ∂h_t/∂h_{t−1} (c_{t−1} held fixed).
The Jacobian is computed with reverse-mode autodiff over one call of ``cell.recur`` (``torch.func.jacrev``)
in eval mode, with the true time index so that batch-norm cells use that step's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["step_jacobian", "gershgorin_discs", "JacobianTrace", "jacobian_along_sequence", "spectrum"]


def _split(flat: Tensor, sizes: list[int], batch_shape) -> tuple[Tensor, ...]:
    return tuple(p.reshape(*batch_shape, -1) for p in flat.split(sizes, dim=-1))


def step_jacobian(cell, xp_t: Tensor, state: tuple[Tensor, ...], step: int = 0, part: str = "full") -> Tensor:
    """A = ∂s_t/∂s_{t−1} of one step ``state_t = cell.recur(xp_t, state, step)`` for ONE sequence.

    Args:
        cell: a :class:`bnrhn.cells.RecurrentCell` (in eval mode for batch-norm cells).
        xp_t: the projected input of this step, ``[P]`` or ``[1, P]``.
        state: the state before the step, tuple of ``[H]`` or ``[1, H]`` tensors.
        step: the time index passed to the cell.
        part: "full" (the whole state, e.g. [h, c]) or "h" (the block ∂h_t/∂h_{t−1}).

    Returns:
        A, ``[S, S]`` with A[i, j] = ∂s_t[i] / ∂s_{t−1}[j].
    """
    if part not in ("full", "h"):
        raise ValueError(f"part must be 'full' or 'h', got {part!r}")
    xp_t = xp_t.reshape(1, -1).detach()
    parts = [s.reshape(1, -1).detach() for s in state]
    sizes = [p.shape[1] for p in parts]
    s0 = torch.cat(parts, dim=1).reshape(-1)

    def f(s_flat: Tensor) -> Tensor:  # the reference step (cell.recur's default mode): what jacrev can trace
        new = cell.recur(xp_t, _split(s_flat.reshape(1, -1), sizes, (1,)), step)
        return torch.cat([x.reshape(1, -1) for x in new], dim=1).reshape(-1)

    with torch.enable_grad():
        A = torch.func.jacrev(f)(s0)
    if part == "h":
        H = sizes[0]
        A = A[:H, :H]
    return A.detach()


def spectrum(A: Tensor) -> dict[str, Tensor | float]:
    """Eigenvalues (complex), singular values, spectral radius and largest singular value of A."""
    A64 = A.double()
    eig = torch.linalg.eigvals(A64)
    sv = torch.linalg.svdvals(A64)
    return {"eigvals": eig, "svdvals": sv, "spectral_radius": float(eig.abs().max()), "sigma_max": float(sv[0])}


def gershgorin_discs(A: Tensor) -> tuple[Tensor, Tensor]:
    """(centres a_ii, radii Σ_{j≠i} |a_ij|) of the row Geršgorin discs of A."""
    centres = torch.diagonal(A)
    radii = A.abs().sum(dim=1) - centres.abs()
    return centres, radii


@dataclass
class JacobianTrace:
    """A_t along one sequence: per-step spectral radius and σ_max, and the matrices themselves."""

    spectral_radius: list[float]
    sigma_max: list[float]
    matrices: list[Tensor]
    part: str
    layer: int

    def __len__(self) -> int:
        return len(self.matrices)


@torch.no_grad()
def jacobian_along_sequence(model, inputs: Tensor, window: int | None = None, layer: int = 0,
                            part: str = "full", keep: str = "all") -> JacobianTrace:
    """A_t = ∂s_t/∂s_{t−1} of layer ``layer`` of a CharLM for t = 1..T along ``inputs`` (``[T]`` ids, one sequence).

    The state follows the real sequence (s_t from the model itself); the batch-norm time index is
    ``t mod window`` (None = t). ``keep="all"`` keeps every A_t in the trace.
    """
    if inputs.dim() != 1:
        raise ValueError(f"expected one sequence of ids [T], got shape {tuple(inputs.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_layers = len(model.cells)
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range: the model has {num_layers} layer(s)")
    k = layer % num_layers
    try:
        x = model.embedding(inputs.to(device).reshape(-1, 1))  # [T, 1, D]
        state = model.init_state(1)
        rho, smax, mats = [], [], []
        for t in range(inputs.numel()):
            step = t if window is None else t % window
            h = x[t]
            new_state = []
            for i, cell in enumerate(model.cells[: k + 1]):  # layers above k do not affect layer k
                xp = cell.project_input(h, step)
                if i == k:
                    A = step_jacobian(cell, xp, state[i], step, part)
                    sp = spectrum(A)
                    rho.append(sp["spectral_radius"])
                    smax.append(sp["sigma_max"])
                    if keep == "all":
                        mats.append(A.cpu())
                s = cell.recur(xp, state[i], step)
                new_state.append(s)
                h = s[0]
            state = new_state
    finally:
        model.train(was_training)
    return JacobianTrace(rho, smax, mats, part, k)
