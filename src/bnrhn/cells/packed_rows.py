"""The rows of a packed batch inside the whole-sequence nodes (:mod:`bnrhn.cells.highway_sequence`,
:class:`bnrhn.cells.bn_lstm.BNLSTMSequence`), as :meth:`bnrhn.nn.Recurrent.forward` packs them: the batch is
sorted by length (:func:`pack_order`), step t computes its first n_t rows (non-increasing in t), and a row
that drops out keeps its state as its final state. Forward: :func:`drop_finished` at each step, :func:`final_state` at the end.
Backward (reverse time): :func:`final_grads` starts the state gradients from the final state's, and
:func:`grow_grads` adds the rows whose last step is the current one."""

from __future__ import annotations

import torch
from torch import Tensor


def pack_order(valid: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """For a ``[B, T]`` mask of each sequence's valid steps (a prefix of each row): the order that sorts the
    sequences by length, longest first (stable), its inverse, and n_t, the number of sequences valid at step t."""
    order = torch.argsort(valid.sum(1), descending=True, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, valid.sum(0).tolist()


def drop_finished(state: tuple[Tensor, ...], n: int, finished: list) -> tuple[Tensor, ...]:
    """The first ``n`` rows of every state tensor; the rows past them, if any, are appended to ``finished``."""
    if n >= state[0].shape[0]:
        return state
    finished.append(tuple(a[n:] for a in state))
    return tuple(a[:n] for a in state)


def final_state(state: tuple[Tensor, ...], finished: list) -> tuple[Tensor, ...]:
    """Every row's state at its own last step, in row order (rows that dropped out later come first)."""
    if not finished:
        return state
    parts = [state, *finished[::-1]]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(state)))


def final_grads(grads: tuple[Tensor | None, ...], n: int, like: tuple[Tensor, ...]) -> list[Tensor]:
    """The gradients of the rows still running at the last step (``n`` of them), zeros where none came."""
    return [g[:n] if g is not None else x.new_zeros(n, x.shape[1]) for g, x in zip(grads, like)]


def grow_grads(dstate: list[Tensor], grads: tuple[Tensor | None, ...], n: int) -> list[Tensor]:
    """``dstate`` extended to ``n`` rows with the final-state gradients of the rows whose last step this is."""
    m = dstate[0].shape[0]
    if n <= m:
        return dstate
    return [torch.cat([d, g[m:n] if g is not None else d.new_zeros(n - m, d.shape[1])]) for d, g in zip(dstate, grads)]

