"""Batch-normalised LSTM (Cooijmans et al. 2016, "Recurrent Batch Normalization"):

    [i, f, g, o] = BN(W_h h_{t−1}; γ_h) + BN(W_x x_t; γ_x) + b        (no shift β_h, β_x: b provides it)
    c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g)
    h_t = σ(o) ⊙ tanh(BN(c_t; γ_c, β_c))

Every BN keeps statistics per time step up to T_max (``max_steps``; later steps reuse the last) and
γ starts at 0.1. The two normalisations of the gate pre-activations are separate so that the input
and recurrent terms keep their own scales.

``carry_norm="recurrence"`` normalises the memory *inside* the recurrence instead
(c_t = BN(σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g)) is what is carried to the next step). That destroys the
additive gradient path of the LSTM and diverges (Glinskis 2017, the seed report); it is kept as a
reproducible negative result, not a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnrhn import kernels
from bnrhn.kernels import batch_split, onednn
from bnrhn.cells.base import REFERENCE, RecurrentCell, State, StepMode
from bnrhn.cells.packed_rows import drop_finished, final_grads, final_state, grow_grads
from bnrhn.autodiff import autocast_backward, autocast_forward
from bnrhn.layers.seq_batchnorm import SequenceBatchNorm, SequenceStatistics, batch_norm_rows, renorm_parameter_grads

_CARRY_NORM = ("output", "recurrence")


class BNLSTMCell(RecurrentCell):
    """LSTM with recurrent batch normalisation (see the module docstring for the equations)."""

    state_names = ("h", "c")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int = 100,
        per_step: bool = True,
        stats: str = "momentum",
        momentum: float = 0.1,
        gamma_init: float = 0.1,
        forget_bias: float = 1.0,
        carry_norm: str = "output",
        min_rows: int = 0,
        renorm_rmax: float = 3.0,
        renorm_dmax: float = 5.0,
        renorm_warmup: int = 100,
    ) -> None:
        super().__init__(input_size, hidden_size)
        if carry_norm not in _CARRY_NORM:
            raise ValueError(f"carry_norm must be one of {_CARRY_NORM}, got {carry_norm!r}")
        H = self.hidden_size
        self.carry_norm = carry_norm
        self.weight_ih = nn.Parameter(torch.empty(4 * H, self.input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias = nn.Parameter(torch.zeros(4 * H))
        for block in self.weight_hh.data.view(4, H, H):  # orthogonal recurrent blocks (Cooijmans et al.)
            nn.init.orthogonal_(block)
        nn.init.xavier_uniform_(self.weight_ih)
        with torch.no_grad():
            self.bias[H : 2 * H] = forget_bias
        bn = dict(max_steps=max_steps, per_step=per_step, stats=stats, momentum=momentum, min_rows=min_rows,
                  renorm_rmax=renorm_rmax, renorm_dmax=renorm_dmax, renorm_warmup=renorm_warmup)
        self.bn_x = SequenceBatchNorm(4 * H, center=False, gamma_init=gamma_init, **bn)
        self.bn_h = SequenceBatchNorm(4 * H, center=False, gamma_init=gamma_init, **bn)
        self.bn_c = SequenceBatchNorm(H, center=True, gamma_init=gamma_init, **bn)

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        if x.dim() == 2:
            return self.bn_x(F.linear(x, self.weight_ih), step, mask, shift=self.bias)
        # The product is computed batch-major ([B, T, 4H] in memory, returned as a [T, B, 4H] view), so
        # that the sequence batch norm sees its (step, feature) channels as columns without a copy; the bias
        # is the norm's shift (folded into its kernel's affine pass on full batches).
        z = F.linear(x.transpose(0, 1), self.weight_ih).transpose(0, 1)
        return self.bn_x(z, step, mask, shift=self.bias)

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None, mode: StepMode = REFERENCE) -> State:
        """With ``mode.fused``, a training step of a full batch normalised with its batch statistics (plain or
        renormalised) runs as one autograd node (:class:`BNLSTMStep`); every other step is the composition of
        autograd operations."""
        h, c = state
        h_in = h if h_mask is None else h * h_mask
        rec = self.recurrent_mm(mode, "hh", None, h_in, self.weight_hh)
        if self._can_fuse(h.shape[0], mask, mode):
            renorm = None
            if self.bn_h.stats == "renorm":  # r, d of this step's slots, from statistics the node computes
                renorm = (partial(self.bn_h.renorm_corrections, step), partial(self.bn_c.renorm_corrections, step))
            spec = (self.hidden_size, self.bn_h.eps, self.carry_norm == "recurrence", renorm)
            h, c, *stats = BNLSTMStep.apply(spec, rec, xp, c, self.bn_h.weight, self.bn_c.weight, self.bn_c.bias)
            self.bn_h.track(step, stats[0], stats[1], h.shape[0])
            self.bn_c.track(step, stats[2], stats[3], h.shape[0])
            return h, c
        gates = self.bn_h(rec, step, mask) + xp
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_n = self.bn_c(c, step, mask)
        if self.carry_norm == "recurrence":
            c = c_n
        return torch.sigmoid(o) * torch.tanh(c_n), c

    def recur_sequence(self, xp: Tensor, state: State, step: int = 0, h_mask: Tensor | None = None,
                       mode: StepMode = REFERENCE, active: list[int] | None = None):
        """All T steps of ``xp`` ``[T, B, 4H]`` as one autograd node when every step would be a
        :class:`BNLSTMStep` and gradients are recorded for a whole sequence (``mode.taps``); else None: the C++
        loop (:class:`NativeBNLSTMSequence`) where :func:`bnrhn.kernels.loop_ops_for` serves the tensors and no
        step reads population statistics an earlier one updates, else :class:`BNLSTMSequence`. Returns the
        outputs ``[T, B, H]`` and the final (h, c)."""
        if mode.taps is None or torch.is_autocast_enabled(xp.device.type):
            return None
        T, B = xp.shape[0], xp.shape[1]
        rows = active if active is not None else [B] * T
        if not all(self._can_fuse(n, None, mode) for n in set(rows)):
            return None
        stats = SequenceStatistics((self.bn_h, self.bn_c), step, rows, xp)
        carry = self.carry_norm == "recurrence"
        h, c = state
        ops = kernels.loop_ops_for(xp, h, c)
        if ops is not None and not (stats.renorm and stats.bound_tensors is None):  # the loop in C++
            renorm = None
            if stats.renorm:  # per norm [5, T, F]: (μ, √(σ² + ε), 1/rmax, rmax, dmax) of every step
                renorm = [torch.stack([b.expand_as(bounds[0]) for b in bounds]) for bounds in stats.bound_tensors]
            plan = NativeLSTMPlan(ops=ops, eps=self.bn_h.eps, carry_normed=carry, active=active, renorm=renorm,
                                  track=stats.track_all)
            out, h, c = NativeBNLSTMSequence.apply(plan, xp, h, c, h_mask, self.weight_hh, self.bn_h.weight,
                                                   self.bn_c.weight, self.bn_c.bias)
            return out, (h, c)
        spec = lambda t: (self.hidden_size, self.bn_h.eps, carry, stats.corrections(t))  # noqa: E731
        out, h, c = BNLSTMSequence.apply((spec, stats.track, active), xp, h, c, h_mask, self.weight_hh,
                                         self.bn_h.weight, self.bn_c.weight, self.bn_c.bias)
        stats.finish()
        return out, (h, c)

    def _can_fuse(self, rows: int, mask, mode: StepMode) -> bool:
        """A fused mode, a training step of a full batch whose two recurrent norms use batch statistics of the
        same kind (both plain or both renormalised), not synchronised over processes (that needs
        SequenceBatchNorm's reductions)."""
        norms = (self.bn_h, self.bn_c)
        if not (mode.fused and self.training and mask is None) or any(bn.synchronized for bn in norms):
            return False
        return (all(bn.batch_statistics_apply(rows) for bn in norms)
                and len({bn.stats == "renorm" for bn in norms}) == 1)

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        return 2 * batch_size * steps * 4 * self.hidden_size * (self.input_size + self.hidden_size)


class BNLSTMStep(Function):
    """One BN-LSTM step in training mode (batch statistics of a full batch) as a single autograd node.

    ``BNLSTMStep.apply((H, ε, carry_in_recurrence, renorm), r, xp, c_{t−1}, γ_h, γ_c, β_c)`` with the recurrent
    product r = W_h h_{t−1} and the normalised input term xp = BN(W_x x_t) + b returns
    ``(h_t, c_t, μ_h, σ²_h, μ_c, σ²_c)`` (the batch statistics carry no gradient). ``renorm`` is None (plain
    batch statistics) or a pair of functions (mean, biased var) → (r, d) for the two norms: batch
    renormalization, each BN(x; γ, β) below then being γ(x̂ r + d) + β with r, d constants. Forward:

        [i, f, g, o] = BN(r; γ_h) + xp,   c = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g),
        ĉ = BN(c; γ_c, β_c),   h_t = σ(o) ⊙ tanh(ĉ),   c_t = c (or ĉ when the carry is normalised)

    Backward, by hand (dĉ = dh ⊙ σ(o) ⊙ (1 − tanh²ĉ), plus dc_t when c_t = ĉ):

        dc = BN-backward(dĉ) (+ dc_t when c_t = c),   dc_{t−1} = dc ⊙ σ(f)
        d[i, f, g, o] = [dc ⊙ tanh(g), dc ⊙ c_{t−1}, dc ⊙ σ(i), dh ⊙ tanh(ĉ)] ⊙ (activation derivatives)
        dr = BN-backward(d[i, f, g, o]),   dxp = d[i, f, g, o]

    Hand-written for the same reason as :mod:`bnrhn.cells.highway`: the autograd composition is some
    twenty small graph nodes per step plus a concatenation of the gate gradients. The composition in
    :meth:`BNLSTMCell.recur` remains for eval mode and padded steps; the tests compare the two.
    """

    @staticmethod
    @autocast_forward(float32=True)
    def forward(ctx, spec, r, xp, c_prev, gamma_h, gamma_c, beta_c):
        h, c_out, stats, saved = bn_lstm_step_forward(spec, r, xp, c_prev, gamma_h, gamma_c, beta_c)
        ops, corrections, tensors = saved
        ctx.spec, ctx.ops, ctx.renorm = spec, ops, corrections
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(*stats)
        return (h, c_out, *stats)

    @staticmethod
    @once_differentiable
    @autocast_backward
    def backward(ctx, dh, dc_out, *_):
        return (None, *bn_lstm_step_backward(ctx.spec, (ctx.ops, ctx.renorm, ctx.saved_tensors), dh, dc_out))


def bn_lstm_step_forward(spec, r, xp, c_prev, gamma_h, gamma_c, beta_c):
    """:class:`BNLSTMStep`'s forward outside autograd → ``(h_t, c_t, (μ_h, σ²_h, μ_c, σ²_c), saved)``."""
    H, eps, carry_normed, renorm = spec
    renorm_h, renorm_c = renorm if renorm is not None else (None, None)
    act, mean_h, invstd_h, scale_h, r_h, d_h = batch_norm_rows(r, gamma_h, None, eps, renorm_h)
    act += xp
    ops = kernels.step_ops(act, c_prev)
    c_prev = c_prev.contiguous()
    c = ops.lstm_gates_forward(act, c_prev)
    c_n, mean_c, invstd_c, scale_c, r_c, d_c = batch_norm_rows(c, gamma_c, beta_c, eps, renorm_c)
    h, tc = ops.lstm_output_forward(act, c_n)
    stats = (mean_h, invstd_h.pow(-2).sub_(eps).clamp_min_(0.0), mean_c, invstd_c.pow(-2).sub_(eps).clamp_min_(0.0))
    saved = (ops, (r_h, d_h, r_c, d_c), (r, act, c_prev, c, tc, mean_h, invstd_h, mean_c, invstd_c, scale_h, scale_c))
    return h, (c_n if carry_normed else c), stats, saved


def bn_lstm_step_backward(spec, saved, dh, dc_out):
    """The gradient of :func:`bn_lstm_step_forward` from dh = ∂L/∂h_t and dc_out = ∂L/∂c_t (either may be None)
    → ``(dr, dxp, dc_{t−1}, dγ_h, dγ_c, dβ_c)``."""
    H, eps, carry_normed, _ = spec
    ops, (r_h, d_h, r_c, d_c), tensors = saved
    r, act, c_prev, c, tc, mean_h, invstd_h, mean_c, invstd_c, scale_h, scale_c = tensors
    if dh is None:
        dh = torch.zeros_like(tc)
    dh = dh.contiguous()
    dc_n = ops.lstm_output_backward(dh, act, tc)
    if carry_normed and dc_out is not None:
        dc_n += dc_out
    dc, dscale_c, dbeta_c = torch.ops.aten.native_batch_norm_backward(
        dc_n, c, scale_c, None, None, mean_c, invstd_c, True, eps, [True, True, True]
    )
    dgamma_c, dbeta_c = renorm_parameter_grads(dscale_c, dbeta_c, r_c, d_c)
    if not carry_normed and dc_out is not None:
        dc += dc_out
    dgates, dc_prev = ops.lstm_gates_backward(dc.contiguous(), dh, act, c_prev, tc)
    dr, dscale_h, dshift_h = torch.ops.aten.native_batch_norm_backward(
        dgates, r, scale_h, None, None, mean_h, invstd_h, True, eps, [True, True, r_h is not None]
    )
    dgamma_h, _ = renorm_parameter_grads(dscale_h, dshift_h, r_h, d_h)
    return dr, dgates, dc_prev, dgamma_h, dgamma_c, dbeta_c


class BNLSTMSequence(Function):
    """A whole sequence of :class:`BNLSTMStep` s as one autograd node, for the reason and with the conventions
    of :mod:`bnrhn.cells.highway_sequence` (packed rows, recurrent dropout mask m, statistics tracked in step
    order, dW_h as one product over the sequence):

        forward, t = 0..T−1:   r_t = (h_{t−1} ⊙ m) W_hᵀ,   (h_t, c_t) = BNLSTMStep(r_t, xp_t, c_{t−1})
        backward, in reverse:  (dr_t, dxp_t, dc_{t−1}, …) = BNLSTMStep′(dh_t, dc_t),   dh_{t−1} += (dr_t W_h) ⊙ m

    ``BNLSTMSequence.apply(plan, xp, h0, c0, h_mask, W_h, γ_h, γ_c, β_c)`` → ``(outputs [T, B, H], h_T, c_T)``;
    ``plan`` = (spec(t) → the step's spec, track(t, stats, rows), active rows per step or None)."""

    @staticmethod
    def forward(ctx, plan, xp, h0, c0, h_mask, weight, gamma_h, gamma_c, beta_c):
        spec_of, track, active = plan
        T, B, H = xp.shape[0], xp.shape[1], h0.shape[1]
        active = active or [B] * T
        out = xp.new_zeros(T, B, H) if active[-1] < B else xp.new_empty(T, B, H)
        state, finished, steps = (h0, c0), [], []
        with torch.no_grad():
            for t in range(T):
                n = active[t]
                h, c = state = drop_finished(state, n, finished)
                h_in = h if h_mask is None else h * h_mask[:n]
                spec = spec_of(t)
                h, c, stats, saved = bn_lstm_step_forward(spec, h_in @ weight.t(), xp[t, :n], c,
                                                          gamma_h, gamma_c, beta_c)
                track(t, stats, n)
                state = (h, c)
                out[t, :n] = h
                steps.append((spec, saved, h_in))
        # copies: c_T (and h_T) may be tensors of the last step's record on ctx, and an output that ctx holds
        # would make a reference cycle through its grad_fn (the graph then waits for the garbage collector)
        h_final, c_final = (a.clone() for a in final_state(state, finished))
        ctx.steps, ctx.active = steps, active
        # inputs the records read go through save_for_backward (changing them in place before backward is an
        # error, as with the step nodes); the per-step intermediates stay on ctx
        ctx.save_for_backward(h_mask, weight, h0, c0, gamma_h, gamma_c, beta_c)
        return out, h_final, c_final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h, grad_c):
        steps, active = ctx.steps, ctx.active
        h_mask, weight = ctx.saved_tensors[:2]
        T = len(steps)
        like = steps[0][2]
        dxp = like.new_zeros(T, like.shape[0], 4 * like.shape[1]) if ctx.needs_input_grad[1] else None
        drs, h_ins, dparams = [], [], [None, None, None]
        dh, dc = final_grads((grad_h, grad_c), active[-1], (like, like))
        for t in range(T - 1, -1, -1):
            n = active[t]
            dh, dc = grow_grads([dh, dc], (grad_h, grad_c), n)
            if grad_out is not None:
                dh = dh + grad_out[t, :n]
            spec, saved, h_in = steps[t]
            dr, dgates, dc, *dp = bn_lstm_step_backward(spec, saved, dh, dc)
            if dxp is not None:
                dxp[t, :n] = dgates
            dparams = [g if acc is None else acc.add_(g) for acc, g in zip(dparams, dp)]
            drs.append(dr)
            h_ins.append(h_in)
            dh = dr @ weight if h_mask is None else (dr @ weight).mul_(h_mask[:n])
        dweight = torch.cat(drs).t() @ torch.cat(h_ins) if ctx.needs_input_grad[5] else None
        return (None, dxp, dh, dc, None, dweight, *dparams)


@dataclass
class NativeLSTMPlan:
    """What one call of :class:`NativeBNLSTMSequence` computes besides its tensor inputs: the kernels' op
    namespace, ε, whether the carry is normalised, the rows of each step (None: all), batch renormalization's
    population terms per norm (``[5, T, 4H]`` for the recurrent norm, ``[5, T, H]`` for the cell norm: μ,
    √(σ² + ε), 1/rmax, rmax, dmax, read once) or None, and ``track(means, variances)``, which receives every
    step's batch statistics of both norms once the loop has run."""

    ops: object
    eps: float
    carry_normed: bool
    active: list[int] | None
    renorm: list[Tensor] | None
    track: Callable[[list[Tensor], list[Tensor]], None]


class NativeBNLSTMSequence(Function):
    """:class:`BNLSTMSequence` with its time loop in C++ (``bnrhn/kernels/bn_lstm_sequence.cpp``), where the fused
    kernels serve the tensors and no step reads population statistics that an earlier step updates. Same
    equations and results: ``NativeBNLSTMSequence.apply(plan, xp, h0, c0, h_mask, W_h, γ_h, γ_c, β_c)`` →
    ``(outputs [T, B, H], h_T, c_T)``. Why: as :class:`bnrhn.cells.highway_sequence.NativeHighwaySequence`."""

    @staticmethod
    def forward(ctx, plan: NativeLSTMPlan, xp, h0, c0, h_mask, weight, gamma_h, gamma_c, beta_c):
        if xp.stride(2) != 1:
            xp = xp.contiguous()
        h0, c0 = h0.contiguous(), c0.contiguous()
        h_mask = kernels.loop_mask(h_mask, h0)
        renorm_h, renorm_c = plan.renorm if plan.renorm is not None else (None, None)
        packed = onednn.packed_recurrent_weights([weight], xp.shape[1])
        parts = batch_split.forward_parts(plan.active, xp.shape[1], h0.shape[1], packed)
        results = plan.ops.bn_lstm_sequence_forward(xp, h0, c0, h_mask, weight.contiguous(), gamma_h.contiguous(),
                                                    gamma_c.contiguous(), beta_c.contiguous(),
                                                    plan.carry_normed, plan.eps, list(plan.active or []),
                                                    renorm_h, renorm_c, packed=packed, parts=parts)
        out, h, c = results[:3]
        h_in, act, xhat_h, c_prev, xhat_c, tanh_c, mean_h, var_h, invstd_h, mean_c, var_c, invstd_c = results[3:15]
        plan.track([mean_h, mean_c], [var_h, var_c])
        ctx.plan, ctx.size, ctx.parts = plan, (xp.shape[0], xp.shape[1]), parts
        ctx.save_for_backward(h_mask, weight, gamma_h, gamma_c, h_in, act, xhat_h, c_prev, xhat_c, tanh_c, invstd_h,
                              invstd_c, *results[15:])
        return out, h, c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h, grad_c):
        plan = ctx.plan
        h_mask, weight, gamma_h, gamma_c, *records = ctx.saved_tensors
        need = ctx.needs_input_grad  # (plan, xp, h0, c0, h_mask, W_h, γ_h, γ_c, β_c)
        packed_t = onednn.packed_transposed_weights([weight], ctx.size[1])
        dxp, dh0, dc0, dweight, dgamma_h, dgamma_c, dbeta_c = plan.ops.bn_lstm_sequence_backward(
            grad_out, grad_h, grad_c, ctx.size[0], ctx.size[1], h_mask, weight.contiguous(), gamma_h, gamma_c,
            records, plan.carry_normed, list(plan.active or []), need[1], packed_t=packed_t,
            parts=batch_split.backward_parts(ctx.parts, packed_t))
        grads = (dh0, dc0, None, dweight, dgamma_h, dgamma_c, dbeta_c)
        return (None, dxp, *(g if n else None for g, n in zip(grads, need[2:])))
