"""The interface every recurrent cell implements.

A cell knows only its own equations. Time belongs to the runner (:class:`bnrhn.nn.Recurrent`), which
calls, for a sequence x_1..x_T:

1. ``xp = cell.project_input(x, step=0, mask=mask)`` once: every state-independent term (W x_t + b for
   all t) in one matrix product over the whole ``[T, B, I]`` input;
2. ``state = cell.recur(xp[t], state, step=t, mask=mask[t], h_mask=..., mode=mode)`` for t = 0..T−1.

Decoding one token at a time calls the same two methods with a single step (``[B, I]`` input), so the
sequence path and the step path share every parameter and every batch-norm convention.

How a step may run is the caller's decision, passed as a :class:`StepMode`: whether the cell may take
its fast paths (hand-written autograd nodes, the fused CPU kernels), the weight-gradient taps of the
current time loop, and whether this is inference with ``xp`` as scratch space. A cell asks no global
grad mode and no transform state, and no attribute is set on it from outside to change its path
(besides its own modules' configuration and train/eval flags it reads only autocast and the
process-wide choice of :mod:`bnrhn.kernels`); called without a mode it computes the reference
composition of PyTorch operations. The runner builds the modes (:meth:`bnrhn.nn.Recurrent.step_mode`).

The state is a tuple of ``[B, H]`` tensors whose first element is the cell's output h_t (for the LSTM
family the second is the memory c_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnrhn import kernels
from bnrhn.cells.deferred import WeightTaps

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class StepMode:
    """How one call of :meth:`RecurrentCell.recur` may run — decided by the caller, read by the cell.

    Attributes:
        fused: the cell may take its fast paths where they serve the tensors — the single-node highway and
            BN-LSTM steps (:mod:`bnrhn.cells.highway`, :class:`bnrhn.cells.bn_lstm.BNLSTMStep`) and the fused
            CPU kernels (:mod:`bnrhn.kernels`). False: the reference composition of PyTorch operations, the
            only path that ``torch.func`` transforms can differentiate.
        taps: the deferred weight-gradient taps of the current time loop (:mod:`bnrhn.cells.deferred`): a
            dict the caller creates empty for one sequence of one layer and passes to each of its steps;
            None = every recurrent product is an ordinary operation.
        inference: no gradient will be taken through this step and ``xp`` is scratch space the cell may
            overwrite (the caller computed it for this one call) — it saves a copy per step.
    """

    fused: bool = False
    taps: dict | None = None
    inference: bool = False


#: The mode of a direct ``cell.recur(...)`` call: the reference equations, nothing written in place.
REFERENCE = StepMode()


@dataclass
class LoopPlan:
    """What one call of a cell's C++ time loop node (GRU, RNN) needs besides its tensors: the kernels' op
    namespace and the rows of each step (None: all)."""

    ops: object
    active: list[int] | None


def check_size(name: str, value: object) -> int:
    """A positive integer size, or a ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class RecurrentCell(nn.Module):
    """Base class of the recurrent cells.

    Subclasses set ``state_names`` (e.g. ``("h",)`` or ``("h", "c")``) and implement
    :meth:`project_input` and :meth:`recur`.
    """

    state_names: tuple[str, ...] = ("h",)
    #: The ``torch.nn`` recurrent module whose equations, parameter names and gate order this cell has
    #: (None for the cells that are ours alone); the runner then lets that module's kernel run whole
    #: sequences (:mod:`bnrhn.nn.vendor`).
    torch_equivalent: type[nn.RNNBase] | None = None

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = check_size("input_size", input_size)
        self.hidden_size = check_size("hidden_size", hidden_size)

    def recurrent_mm(self, mode: StepMode, key, base: Tensor | None, h: Tensor, weight: Tensor,
                     bias: Tensor | None = None) -> Tensor:
        """base + h Wᵀ + b, the state-dependent product of one step (``key`` names the weight among the
        step's products, for ``mode.taps``). Under ``torch.autocast`` the product runs in 16 bits and comes
        back in the state's dtype, so that the gates and the state update stay in float32 (mixed precision
        keeps the recurrence in full precision)."""
        if mode.taps is not None:
            taps = mode.taps.get(key)
            if taps is None:
                taps = mode.taps[key] = WeightTaps(weight, bias)
            return taps.addmm(base, h).to(h.dtype)
        if torch.is_autocast_enabled(h.device.type):
            out = h @ weight.t()
            out = out if bias is None else out + bias
            return (out if base is None else out + base).to(h.dtype)
        if base is not None and mode.inference:
            # Inference: base (this step's projected input, scratch by mode.inference) becomes the
            # output, which saves a copy of it per step.
            base = base.addmm_(h, weight.t())
            return base if bias is None else base.add_(bias)
        if bias is not None:
            base = bias if base is None else base + bias
        return h @ weight.t() if base is None else torch.addmm(base, h, weight.t())

    # -- the interface ----------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """The zero state for ``batch_size`` sequences."""
        return tuple(torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype) for _ in self.state_names)

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        """All state-independent terms for ``x`` of shape ``[T, B, I]`` or ``[B, I]``."""
        raise NotImplementedError

    def recur(
        self,
        xp: Tensor,
        state: State,
        step: int = 0,
        mask: Tensor | None = None,
        h_mask: Tensor | None = None,
        mode: StepMode = REFERENCE,
    ) -> State:
        """One time step: the new state from the projected input ``xp`` (``[B, P]``) and ``state``.

        ``step`` is the time index (batch-norm cells pick their statistics with it), ``mask`` (``[B]``,
        True at valid positions) keeps padded positions out of batch statistics, ``h_mask`` is a
        variational-dropout mask multiplied into h_{t−1} where it enters the recurrent matrix product, and
        ``mode`` (:class:`StepMode`) says which paths the step may take; only with ``mode.inference`` may
        the cell overwrite ``xp``.
        """
        raise NotImplementedError

    def recur_sequence(self, xp: Tensor, state: State, step: int = 0, h_mask: Tensor | None = None,
                       mode: StepMode = REFERENCE, active: list[int] | None = None):
        """All steps of ``xp`` ``[T, B, P]`` at once → (outputs ``[T, B, H]``, final state), for cells with a
        whole-sequence fast path that applies to this call; None (the default) = run :meth:`recur` per step.
        ``active``: for packed sequences, the rows computed at each step (see :class:`bnrhn.nn.Recurrent`)."""
        return None

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def loop_ops(xp: Tensor, state: Tensor, mode: StepMode):
        """The op namespace of the C++ time loops when this call trains a whole sequence through one: gradients
        recorded for it (``mode.taps``), no autocast, and the loops serving the tensors
        (:func:`bnrhn.kernels.loop_ops_for`); else None."""
        if mode.taps is None or torch.is_autocast_enabled(xp.device.type):
            return None
        return kernels.loop_ops_for(xp, state)

    def check_input(self, x: Tensor) -> None:
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects input of shape [T, B, {self.input_size}] or "
                f"[B, {self.input_size}] (input_size={self.input_size}), got {tuple(x.shape)}"
            )

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        """Floating-point operations of the forward matrix products for ``steps`` steps (2 per MAC)."""
        raise NotImplementedError

    @staticmethod
    def _uniform_(tensors, hidden_size: int) -> None:
        """PyTorch's RNN initialisation: U(−1/√H, 1/√H)."""
        bound = 1.0 / math.sqrt(hidden_size)
        for t in tensors:
            nn.init.uniform_(t, -bound, bound)
