"""Recurrent Highway Network cell (Zilly et al. 2016) and its batch-normalised variant (Zhang et al. 2017).

One time step runs L highway layers, l = 1..L, starting from s_0 = s_{t−1} (the state at the previous
time step) and ending at s_t = s_L:

    h_l = tanh(N_h(W_H x_t·[l ∈ I] + R_{H,l} s_{l−1}) + b_{H,l})        (candidate)
    t_l = σ(N_t(W_T x_t·[l ∈ I] + R_{T,l} s_{l−1}) + b_{T,l})           (transform gate)
    c_l = 1 − t_l                                       carry="coupled"   (Zilly et al.)
    c_l = σ(N_c(W_C x_t·[l ∈ I] + R_{C,l} s_{l−1}) + b_{C,l})  carry="free" (the relaxed carry gate)
    s_l = h_l ⊙ t_l + s_{l−1} ⊙ c_l

I = {1} (``input_at="first"``, the paper) or {1..L} (``input_at="every"``, the public TF code).
N_g is the identity (``norm="none"``), a :class:`~bnrhn.nn.SequenceBatchNorm` with statistics per
highway layer l and time step t (``norm="batch"``, BN-RHN), or a layer norm (``norm="layer"``), applied
to the pre-activations named in ``normalize`` (any of "h", "t", "c"). Normalisers have no shift of
their own: the bias b_{g,l} is added after them, so that the negative transform bias (which starts
the cell near the identity map: with t = 0 and c = 1 every eigenvalue of ∂s_t/∂s_{t−1} is 1) keeps
its meaning with and without normalisation.

Named presets (see :mod:`bnrhn.cells`):

- ``rhn``: no normalisation, coupled carry, input at the first layer, transform bias −2;
- ``bn_rhn``: the BN-RHN paper: batch norm on the h pre-activation of every highway layer, per time
  step, relaxed (free) carry gate, input at the first layer;
- ``bn_rhn_tf``: the authors' public TensorFlow code: layer norm on h only, free carry with bias −3,
  transform bias −3, input at every layer.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnrhn import kernels
from bnrhn.cells.base import REFERENCE, RecurrentCell, State, StepMode, check_size
from bnrhn.cells.highway import HighwayStep
from bnrhn.cells.highway_sequence import HighwaySequence, NativeHighwaySequence, NativePlan, SequencePlan
from bnrhn.layers.seq_batchnorm import SequenceBatchNorm, SequenceStatistics, check_statistics_options

_NORMS = ("none", "batch", "layer")
_CARRIES = ("coupled", "free")
_INPUT_AT = ("first", "every")


class RHNCell(RecurrentCell):
    """Recurrent highway cell of recurrence depth ``depth`` (see the module docstring for the equations).

    Args:
        input_size, hidden_size: sizes of x_t and s_t.
        depth: recurrence depth L ≥ 1.
        norm: "none", "batch" (BN-RHN) or "layer".
        normalize: which pre-activations the norm applies to: a subset of ("h", "t", "c"), or a
            comma-separated string such as "h,t".
        carry: "coupled" (c = 1 − t) or "free" (c = σ(·), its own gate).
        input_at: "first" (x_t enters the first highway layer only) or "every".
        transform_bias: initial b_T (negative: start near the identity; −2 in Zilly's PTB configs).
        carry_bias: initial b_C of the free carry gate (default: −transform_bias, so c ≈ 1 − t at init).
        max_steps, per_step, stats, momentum, min_rows, renorm_rmax, renorm_dmax, renorm_warmup:
            batch-norm statistics (see SequenceBatchNorm; ``stats="renorm"`` is batch renormalization).
        gamma_init: initial scale of the normalisers (default 0.1 for batch norm as in Cooijmans et
            al., 1.0 for layer norm).
    """

    state_names = ("s",)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        depth: int = 3,
        norm: str = "none",
        normalize: str | tuple[str, ...] = ("h",),
        carry: str = "coupled",
        input_at: str = "first",
        transform_bias: float = -2.0,
        carry_bias: float | None = None,
        max_steps: int = 100,
        per_step: bool = True,
        stats: str = "momentum",
        momentum: float = 0.1,
        gamma_init: float | None = None,
        min_rows: int = 0,
        renorm_rmax: float = 3.0,
        renorm_dmax: float = 5.0,
        renorm_warmup: int = 100,
    ) -> None:
        super().__init__(input_size, hidden_size)
        self.depth = check_size("depth", depth)
        statistics = dict(max_steps=max_steps, per_step=per_step, stats=stats, momentum=momentum, min_rows=min_rows,
                          renorm_rmax=renorm_rmax, renorm_dmax=renorm_dmax, renorm_warmup=renorm_warmup)
        check_statistics_options(max_steps, stats, momentum, min_rows, renorm_rmax, renorm_dmax, renorm_warmup)
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if carry not in _CARRIES:
            raise ValueError(f"carry must be one of {_CARRIES}, got {carry!r}")
        if input_at not in _INPUT_AT:
            raise ValueError(f"input_at must be one of {_INPUT_AT}, got {input_at!r}")
        self.gate_names = ("h", "t") if carry == "coupled" else ("h", "t", "c")
        if isinstance(normalize, str):
            normalize = tuple(g.strip() for g in normalize.split(",") if g.strip())
        bad = [g for g in normalize if g not in self.gate_names]
        if bad:
            raise ValueError(
                f"normalize names pre-activations {bad!r} that this cell does not have; "
                f"choose from {self.gate_names} (carry={carry!r})"
            )
        self.norm = norm
        self.normalize = tuple(g for g in self.gate_names if g in normalize) if norm != "none" else ()
        self.carry = carry
        self.input_at = input_at
        H, G, L = self.hidden_size, len(self.gate_names), self.depth
        K = 1 if input_at == "first" else L
        self.weight_ih = nn.Parameter(torch.empty(K * G * H, self.input_size))  # W_{H,T,C} (per layer if every)
        # One parameter per highway layer rather than one stacked tensor: indexing a stacked tensor inside
        # the time loop makes every backward step materialise a zero gradient of the whole stack.
        self.weight_hh = nn.ParameterList(nn.Parameter(torch.empty(G * H, H)) for _ in range(L))  # R_{H,T,C; l}
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(G * H)) for _ in range(L))  # b_{H,T,C; l}
        self._uniform_([self.weight_ih, *self.weight_hh], H)
        self.transform_bias = float(transform_bias)
        self.carry_bias = -self.transform_bias if carry_bias is None else float(carry_bias)
        with torch.no_grad():
            for b in self.bias:
                b[H : 2 * H] = self.transform_bias
                if carry == "free":
                    b[2 * H : 3 * H] = self.carry_bias
        if gamma_init is None:
            gamma_init = 0.1 if norm == "batch" else 1.0
        self.norms = nn.ModuleDict()
        for l in range(L):
            for g in self.normalize:
                self.norms[f"{g}{l}"] = self._make_norm(norm, H, statistics, gamma_init)
        self._gate_hooks: OrderedDict[int, Callable] = OrderedDict()  # RemovableHandle keeps a weak reference

    def register_gate_hook(self, hook: Callable[[int, Tensor, Tensor], None]) -> RemovableHandle:
        """Call ``hook(l, t_l, c_l)`` with the transform and carry gates (``[B, H]``, c = 1 − t when coupled)
        of highway layer l at every step from now on, until ``handle.remove()`` (as ``torch.nn.Module``'s
        hooks). While a hook is registered the steps take the reference composition: the fast paths never
        hold the gates as tensors. Hooks also run inside ``torch.func`` transforms (e.g.
        :func:`bnrhn.analysis.jacobian.step_jacobian`), where ``.item()`` is not allowed."""
        handle = RemovableHandle(self._gate_hooks)
        self._gate_hooks[handle.id] = hook
        return handle

    @staticmethod
    def _make_norm(norm, H, statistics: dict, gamma_init) -> nn.Module:
        if norm == "batch":
            return SequenceBatchNorm(H, center=False, gamma_init=gamma_init, **statistics)
        ln = nn.LayerNorm(H, bias=False)
        nn.init.constant_(ln.weight, gamma_init)
        return ln

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        if self.normalize:  # the bias comes after the normaliser, inside recur()
            return torch.nn.functional.linear(x, self.weight_ih)
        # Without a normaliser the biases of the layers that read x_t join the input projection, so
        # they are added (and their gradients summed) once for all steps instead of once per step.
        layers = range(self.depth) if self.input_at == "every" else range(1)
        return torch.nn.functional.linear(x, self.weight_ih, torch.cat([self.bias[l] for l in layers]))

    def _can_fuse(self, state: Tensor, mask, mode: StepMode) -> bool:
        """Whether :meth:`recur` may use the one-node highway layers of :mod:`bnrhn.cells.highway`: a fused
        mode, no gate hook, and either batch norm with the plain batch statistics of a full (unpadded) batch
        in training, or no normaliser where the fused CPU kernels serve the state and gradients are wanted
        (without the kernels the composition is as fast there: measured 73 vs 78 ms per training step)."""
        if not mode.fused or self._gate_hooks:
            return False
        if self.norm == "none" or not self.normalize:
            return not mode.inference and kernels.ops_for(state) is not None
        if not (self.norm == "batch" and self.training and mask is None):
            return False
        # synchronised statistics (data-parallel training) need the reductions over processes of SequenceBatchNorm
        return all(bn.batch_statistics_apply(state.shape[0]) and not bn.synchronized for bn in self.norms.values())

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None, mode: StepMode = REFERENCE) -> State:
        if self._can_fuse(state[0], mask, mode):
            return self._recur_fused(xp, state, step, h_mask, mode)
        return self._recur_reference(xp, state, step, mask, h_mask, mode)

    def _recur_fused(self, xp, state: State, step: int, h_mask, mode: StepMode) -> State:
        s = state[0]
        every = self.input_at == "every"
        xs = xp.chunk(self.depth, dim=1) if every else (xp,)
        norms = [self.norms[f"{g}{l}"] for l in range(self.depth) for g in self.normalize]
        normed = tuple(self.gate_names.index(g) for g in self.normalize)
        eps = norms[0].eps if norms else 0.0
        plain_spec = (self.hidden_size, len(self.gate_names), normed, eps, None)
        n = s.shape[0]
        for l in range(self.depth):
            s_in = s if h_mask is None else s * h_mask
            if not normed:  # no normaliser: the bias is in xp (layers that read x_t) or joins the product
                a = self.recurrent_mm(mode, l, xs[l] if l == 0 or every else None, s_in, self.weight_hh[l],
                                      None if l == 0 or every else self.bias[l])
                s, = HighwayStep.apply(plain_spec, a, s, None)
                continue
            a = self.recurrent_mm(mode, l, xs[l] if l == 0 or every else None, s_in, self.weight_hh[l])
            layer_norms = norms[l * len(normed) : (l + 1) * len(normed)]
            spec = plain_spec
            if layer_norms[0].stats == "renorm":  # r, d of this step's slots, from statistics the node computes
                spec = plain_spec[:4] + (tuple(partial(bn.renorm_corrections, step) for bn in layer_norms),)
            s, *stats = HighwayStep.apply(spec, a, s, self.bias[l], *[bn.weight for bn in layer_norms])
            for k, bn in enumerate(layer_norms):
                bn.track(step, stats[2 * k], stats[2 * k + 1], n)
        return (s,)

    def recur_sequence(self, xp: Tensor, state: State, step: int = 0, h_mask: Tensor | None = None,
                       mode: StepMode = REFERENCE, active: list[int] | None = None):
        """All T steps of ``xp`` ``[T, B, P]`` as one autograd node (:mod:`bnrhn.cells.highway_sequence`) when
        gradients are recorded for a whole sequence (``mode.taps``) and either the step path would fuse every
        step or, with no normaliser or a layer norm, the C++ loop can run (:func:`bnrhn.kernels.loop_ops_for`);
        else None (the caller runs :meth:`recur` step by step). The C++ loop (:class:`NativeHighwaySequence`)
        runs where it can, the Python one (:class:`HighwaySequence`) otherwise. ``active``: rows computed at
        each step (packed sequences, non-increasing). Returns the outputs ``[T, B, H]`` and the final state."""
        if mode.taps is None or torch.is_autocast_enabled(xp.device.type):
            return None
        T, B = xp.shape[0], xp.shape[1]
        L, G = self.depth, len(self.gate_names)
        every = self.input_at == "every"
        normed = tuple(self.gate_names.index(g) for g in self.normalize)
        if self.norm == "layer" and normed:  # the C++ loop only (the Python node has no layer norm)
            return self._recur_sequence_layer_norm(xp, state, h_mask, mode, active, normed)
        rows = active if active is not None else [B]
        ops = kernels.loop_ops_for(xp, state[0])
        # no normaliser: the C++ loop whatever the per-step kernels' timing chose; else as the step path would fuse
        unnormalised_loop = not normed and ops is not None and mode.fused and not self._gate_hooks
        if not unnormalised_loop and not all(self._can_fuse(state[0][:n], None, mode) for n in sorted(set(rows))):
            return None
        norms = [[self.norms[f"{g}{l}"] for g in self.normalize] for l in range(L)]
        eps = norms[0][0].eps if normed else 0.0
        plain_spec = (self.hidden_size, G, normed, eps, None)
        stats = [SequenceStatistics(layer, step, active or [B] * T, xp) for layer in norms] if normed else None
        reads_input = tuple(l == 0 or every for l in range(L))
        bias_in_product = tuple(not normed and not (l == 0 or every) for l in range(L))
        gammas = [bn.weight for layer in norms for bn in layer]
        if ops is not None and not (stats and stats[0].renorm and stats[0].bound_tensors is None):  # loop in C++
            def track(means: Tensor, variances: Tensor) -> None:  # [L, K, T, H]
                for layer_stats, m, v in zip(stats, means, variances):
                    layer_stats.track_all(m, v)

            renorm = None
            if stats and stats[0].renorm:  # [L, K, 5, T, H]: (μ, √(σ² + ε), 1/rmax, rmax, dmax) per gate and step
                renorm = torch.stack([torch.stack([b.expand(T, self.hidden_size) for b in bounds])
                                      for layer_stats in stats for bounds in layer_stats.bound_tensors])
                renorm = renorm.view(L, len(normed), 5, T, self.hidden_size)
            native = NativePlan(depth=L, reads_input=reads_input, bias_in_product=bias_in_product, normed=normed,
                                eps=eps, layer_norm=False, renorm=renorm, active=active, ops=ops, track=track)
            out, final = NativeHighwaySequence.apply(native, xp, state[0], h_mask, *self.weight_hh, *self.bias,
                                                     *gammas)
            return out, (final,)

        def spec(l: int, t: int) -> tuple:
            corrections = stats[l].corrections(t) if stats is not None else None
            return plain_spec if corrections is None else plain_spec[:4] + (corrections,)

        plan = SequencePlan(
            depth=L, hidden=self.hidden_size, reads_input=reads_input, bias_in_product=bias_in_product, spec=spec,
            track=lambda l, t, batch, n: stats[l].track(t, batch, n), active=active, n_gammas=len(normed),
        )
        out, final = HighwaySequence.apply(plan, xp, state[0], h_mask, *self.weight_hh, *self.bias, *gammas)
        for layer_stats in stats or ():
            layer_stats.finish()
        return out, (final,)

    def _recur_sequence_layer_norm(self, xp: Tensor, state: State, h_mask: Tensor | None, mode: StepMode,
                                   active: list[int] | None, normed: tuple[int, ...]):
        """:meth:`recur_sequence` with layer norm (``norm="layer"``): the C++ loop where the fused kernels serve the
        tensors (layer norm has no batch statistics, so any rows and any mode qualify), else None."""
        ops = kernels.loop_ops_for(xp, state[0])
        if ops is None or not mode.fused or self._gate_hooks:
            return None
        L, every = self.depth, self.input_at == "every"
        norms = [self.norms[f"{g}{l}"] for l in range(L) for g in self.normalize]
        plan = NativePlan(depth=L, reads_input=tuple(l == 0 or every for l in range(L)),
                          bias_in_product=(False,) * L, normed=normed, eps=norms[0].eps, layer_norm=True,
                          renorm=None, active=active, ops=ops, track=lambda means, variances: None)
        out, final = NativeHighwaySequence.apply(plan, xp, state[0], h_mask, *self.weight_hh, *self.bias,
                                                 *[ln.weight for ln in norms])
        return out, (final,)

    def _eval_affine(self, l: int, step: int) -> tuple[Tensor, Tensor]:
        """Highway layer l's batch norms (population statistics) and bias as one affine map of a."""
        H = self.hidden_size
        scale = self.bias[l].new_ones(len(self.gate_names) * H)
        shift = self.bias[l].detach().clone()
        for gi, g in enumerate(self.gate_names):
            if g in self.normalize:
                sc, sh = self.norms[f"{g}{l}"].eval_affine(step)
                scale[gi * H : (gi + 1) * H] = sc
                shift[gi * H : (gi + 1) * H] += sh
        return scale, shift

    def _recur_reference(self, xp, state: State, step: int, mask, h_mask, mode: StepMode) -> State:
        """The highway layers composed from autograd operations (every configuration; see recur); in a fused
        inference mode the state update of each layer is the fused kernel's where it serves the tensors."""
        s = state[0]
        H = self.hidden_size
        every = self.input_at == "every"
        xs = xp.chunk(self.depth, dim=1) if every else (xp,)  # one split: its backward is one cat
        for l in range(self.depth):
            s_in = s if h_mask is None else s * h_mask
            if l == 0 or every:  # x_l holds b_l already when there is no normaliser
                a = self.recurrent_mm(mode, l, xs[l], s_in, self.weight_hh[l])
            else:
                bias = None if self.normalize else self.bias[l]
                a = self.recurrent_mm(mode, l, None, s_in, self.weight_hh[l], bias)
            if self.normalize and self.norm == "batch" and not self.training and mode.inference:
                # Inference: the population-statistics batch norm is affine, so it and the bias are one
                # in-place pass over a (a is this step's scratch product), not a split, a cat and an add
                scale, shift = self._eval_affine(l, step)
                a = torch.addcmul(shift, a, scale, out=a)
            elif self.normalize:
                parts = list(a.split(H, dim=1))
                for gi, g in enumerate(self.gate_names):
                    if g in self.normalize:
                        norm = self.norms[f"{g}{l}"]
                        parts[gi] = norm(parts[gi], step, mask) if self.norm == "batch" else norm(parts[gi])
                a = torch.cat(parts, dim=1) + self.bias[l]
            # the kernel writes into a outside autograd: never on a tensor that needs a gradient
            fused_update = (mode.fused and mode.inference and not self._gate_hooks and a.is_contiguous()
                            and not a.requires_grad)
            ops = kernels.ops_for(a, s) if fused_update else None
            if ops is not None:
                s = ops.highway_forward(a, s.contiguous(), len(self.gate_names))  # inference: a is scratch
                torch.autograd.graph.increment_version(a)  # written in place (the op does not count it)
            elif self.carry == "coupled":
                a_h, a_t = a.chunk(2, dim=1)
                h, t = torch.tanh(a_h), torch.sigmoid(a_t)
                c = None
                s = torch.lerp(s, h, t)  # h ⊙ t + s ⊙ (1 − t)
            else:
                a_h, a_t, a_c = a.chunk(3, dim=1)
                h, t, c = torch.tanh(a_h), torch.sigmoid(a_t), torch.sigmoid(a_c)
                s = torch.addcmul(h * t, s, c)  # h ⊙ t + s ⊙ c
            for hook in self._gate_hooks.values():
                hook(l, t, 1 - t if c is None else c)
        return (s,)

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        H, G, L = self.hidden_size, len(self.gate_names), self.depth
        K = 1 if self.input_at == "first" else L
        return 2 * batch_size * steps * G * H * (K * self.input_size + L * H)
