"""Gated recurrent unit (Cho et al. 2014), in PyTorch's form and gate order r, z, n:

    r = σ(W_ir x + b_ir + W_hr h + b_hr),   z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

Parameter names and shapes follow ``torch.nn.GRU`` so that weights copy over one to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnrhn import kernels
from bnrhn.kernels import batch_split, onednn
from bnrhn.cells.base import REFERENCE, LoopPlan, RecurrentCell, State, StepMode


class GRUCell(RecurrentCell):
    """GRU cell with PyTorch's equations (the reset gate multiplies W_hn h + b_hn)."""

    state_names = ("h",)
    torch_equivalent = nn.GRU
    # measured faster than nn.GRU's CPU training loop (docs/performance.md): Recurrent prefers recur_sequence
    # to PyTorch's kernel where it applies
    trains_faster_than_torch_equivalent = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__(input_size, hidden_size)
        H = self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, self.input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H))
        self.bias_ih = nn.Parameter(torch.empty(3 * H)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(3 * H)) if bias else None
        self._uniform_([p for p in self.parameters()], H)

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        return F.linear(x, self.weight_ih, self.bias_ih)

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None, mode: StepMode = REFERENCE) -> State:
        h = state[0]
        h_in = h if h_mask is None else h * h_mask
        hp = self.recurrent_mm(mode, "hh", None, h_in, self.weight_hh, self.bias_hh)
        x_r, x_z, x_n = xp.chunk(3, dim=1)
        h_r, h_z, h_n = hp.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (torch.lerp(n, h, z),)  # (1 − z) n + z h

    def recur_sequence(self, xp: Tensor, state: State, step: int = 0, h_mask: Tensor | None = None,
                       mode: StepMode = REFERENCE, active: list[int] | None = None):
        """All T steps of ``xp`` ``[T, B, 3H]`` in the C++ loop (:class:`GRUSequence`) when gradients are recorded
        for a whole sequence (``mode.taps``) and the fused CPU kernels serve the tensors; else None."""
        ops = self.loop_ops(xp, state[0], mode)
        if ops is None:
            return None
        out, h = GRUSequence.apply(LoopPlan(ops=ops, active=active), xp, state[0], h_mask, self.weight_hh, self.bias_hh)
        return out, (h,)

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        return 2 * batch_size * steps * 3 * self.hidden_size * (self.input_size + self.hidden_size)


class GRUSequence(Function):
    """A whole sequence of GRU steps as one autograd node, its time loop in C++ (``bnrhn/kernels/gru_sequence.cpp``):

        forward, t = 0..T−1:   hp = (h_{t−1} ⊙ m) W_hhᵀ + b_hh,   h_t = GRU(xp_t, hp, h_{t−1})  (the module docstring)
        backward, in reverse:  dh_{t−1} = dh_t ⊙ z + (dhp W_hh) ⊙ m,   dW_hh, db_hh once over the sequence

    ``GRUSequence.apply(plan, xp, h0, h_mask, W_hh, b_hh)`` → ``(outputs [T, B, H], h_T)`` with the runner's packed
    rows (``plan.active``) and recurrent-dropout mask m. Why: PyTorch's GRU trains at ~0.6–0.7× nn.LSTM's GFLOP/s on
    the CPUs measured, and cannot apply a mask on h_{t−1} (docs/performance.md)."""

    @staticmethod
    def forward(ctx, plan: LoopPlan, xp, h0, h_mask, weight, bias):
        if xp.stride(2) != 1:
            xp = xp.contiguous()
        h_mask = kernels.loop_mask(h_mask, h0)
        packed = onednn.packed_recurrent_weights([weight], xp.shape[1])
        parts = batch_split.forward_parts(plan.active, xp.shape[1], h0.shape[1], packed)
        out, h, *records = plan.ops.gru_sequence_forward(xp, h0.contiguous(), h_mask, weight.contiguous(),
                                                         bias.contiguous() if bias is not None else None,
                                                         list(plan.active or []), packed=packed, parts=parts)
        ctx.plan, ctx.size, ctx.parts = plan, (xp.shape[0], xp.shape[1]), parts
        ctx.save_for_backward(h_mask, weight, *records)
        return out, h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h):
        h_mask, weight, *records = ctx.saved_tensors
        need = ctx.needs_input_grad  # (plan, xp, h0, h_mask, W_hh, b_hh)
        packed_t = onednn.packed_transposed_weights([weight], ctx.size[1])
        dxp, dh0, dweight, dbias = ctx.plan.ops.gru_sequence_backward(
            grad_out, grad_h, ctx.size[0], ctx.size[1], h_mask, weight.contiguous(), records,
            list(ctx.plan.active or []), need[1], packed_t=packed_t,
            parts=batch_split.backward_parts(ctx.parts, packed_t))
        return (None, dxp, dh0 if need[2] else None, None, dweight if need[4] else None, dbias if need[5] else None)
