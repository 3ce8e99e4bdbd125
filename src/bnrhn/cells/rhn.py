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

import torch
from torch import Tensor, nn

from bnrhn import kernels
from bnrhn.cells.base import RecurrentCell, State, check_size
from bnrhn.cells.highway import HighwayStep
from bnrhn.autodiff import plain_autograd
from bnrhn.layers.seq_batchnorm import SequenceBatchNorm, check_statistics_options

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
        # When a list, recur() appends (layer, mean t_l, mean c_l) for analysis; None = off.
        self.gate_log: list | None = None
        # False: always compose the highway layers from autograd operations (the reference path).
        self.fused = True

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

    def _can_fuse(self, state: Tensor, mask) -> bool:
        """Whether :meth:`recur` may use the one-node highway layers of :mod:`bnrhn.cells.highway`: ordinary
        autograd, no gate log, and either batch norm with the plain batch statistics of a full (unpadded)
        batch in training, or no normaliser where the fused CPU kernels serve the state (without them the
        composition is as fast there: measured 73 vs 78 ms per training step)."""
        if not self.fused or self.gate_log is not None or not plain_autograd():
            return False
        if self.norm == "none" or not self.normalize:
            return torch.is_grad_enabled() and kernels.ops_for(state) is not None
        if not (self.norm == "batch" and self.training and mask is None):
            return False
        # synchronised statistics (data-parallel training) need the reductions over processes of SequenceBatchNorm
        return all(bn.batch_statistics_apply(state.shape[0]) and not bn.synchronized for bn in self.norms.values())

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None) -> State:
        if self._can_fuse(state[0], mask):
            return self._recur_fused(xp, state, step, h_mask)
        return self._recur_reference(xp, state, step, mask, h_mask)

    def _recur_fused(self, xp, state: State, step: int, h_mask) -> State:
        s = state[0]
        every = self.input_at == "every"
        xs = xp.chunk(self.depth, dim=1) if every else (xp,)
        norms = [self.norms[f"{g}{l}"] for l in range(self.depth) for g in self.normalize]
        normed = tuple(self.gate_names.index(g) for g in self.normalize)
        eps = norms[0].eps if norms else 0.0
        spec = (self.hidden_size, len(self.gate_names), normed, eps)
        n = s.shape[0]
        for l in range(self.depth):
            s_in = s if h_mask is None else s * h_mask
            if not normed:  # no normaliser: the bias is in xp (layers that read x_t) or joins the product
                a = self.recurrent_mm(l, xs[l] if l == 0 or every else None, s_in, self.weight_hh[l],
                                      None if l == 0 or every else self.bias[l])
                s, = HighwayStep.apply(spec, a, s, None)
                continue
            a = self.recurrent_mm(l, xs[l] if l == 0 or every else None, s_in, self.weight_hh[l])
            layer_norms = norms[l * len(normed) : (l + 1) * len(normed)]
            bias, gammas = self.bias[l], [bn.weight for bn in layer_norms]
            if layer_norms and layer_norms[0].stats == "renorm":
                bias, gammas = self._renorm_affine(l, a, step, layer_norms)
            s, *stats = HighwayStep.apply(spec, a, s, bias, *gammas)
            for k, bn in enumerate(layer_norms):
                bn.track(step, stats[2 * k], stats[2 * k + 1], n)
        return (s,)

    def _renorm_affine(self, l: int, a: Tensor, step: int, layer_norms) -> tuple[Tensor, list[Tensor]]:
        """Batch renormalization through the plain batch-norm kernel: γ(x̂ r + d) + b = (γ r) x̂ + (γ d + b),
        with r, d from this batch's statistics of the normalised gates (computed here, constants)."""
        H = self.hidden_size
        shifts, gammas = [], []
        for gi, g in enumerate(self.gate_names):
            if g not in self.normalize:
                shifts.append(self.bias[l].new_zeros(H))
                continue
            bn = layer_norms[len(gammas)]
            var, mean = torch.var_mean(a[:, gi * H : (gi + 1) * H].detach(), dim=0, unbiased=False)
            r, d = bn.renorm_corrections(step, mean, var)
            gammas.append(bn.weight * r)
            shifts.append(bn.weight * d)
        return self.bias[l] + torch.cat(shifts), gammas

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

    def _recur_reference(self, xp, state: State, step: int, mask, h_mask) -> State:
        """The highway layers composed from autograd operations (every configuration; see recur)."""
        s = state[0]
        H = self.hidden_size
        every = self.input_at == "every"
        xs = xp.chunk(self.depth, dim=1) if every else (xp,)  # one split: its backward is one cat
        for l in range(self.depth):
            s_in = s if h_mask is None else s * h_mask
            if l == 0 or every:  # x_l holds b_l already when there is no normaliser
                a = self.recurrent_mm(l, xs[l], s_in, self.weight_hh[l])
            else:
                bias = None if self.normalize else self.bias[l]
                a = self.recurrent_mm(l, None, s_in, self.weight_hh[l], bias)
            if self.normalize and self.norm == "batch" and not self.training and not torch.is_grad_enabled():
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
            inference = self.fused and not torch.is_grad_enabled() and self.gate_log is None and plain_autograd()
            ops = kernels.ops_for(a, s) if inference and a.is_contiguous() else None
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
            if self.gate_log is not None:
                self.gate_log.append((l, t.detach().mean().item(), (1 - t if c is None else c).detach().mean().item()))
        return (s,)

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        H, G, L = self.hidden_size, len(self.gate_names), self.depth
        K = 1 if self.input_at == "first" else L
        return 2 * batch_size * steps * G * H * (K * self.input_size + L * H)
