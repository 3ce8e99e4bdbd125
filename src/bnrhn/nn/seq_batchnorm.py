"""Batch normalization for recurrent networks, with statistics per time step.

    y = γ ⊙ (x − μ) / sqrt(σ² + ε) + β                                     (Ioffe & Szegedy 2015, Alg. 1)

While training, μ and σ² are the mini-batch statistics of the *current time step* t, computed over the
valid (unpadded) positions only. For inference the population statistics of step t are used
(Cooijmans et al. 2016, "Recurrent Batch Normalization"), kept in ``max_steps`` slots; a step
t ≥ ``max_steps`` uses the last slot. Two estimators of the population statistics:

- ``stats="momentum"``: running averages μ ← (1 − m) μ + m μ_B, σ² ← (1 − m) σ² + m σ²_B;
- ``stats="cumulative"``: the plain average over all batches seen, E[x] = E_B[μ_B] and
  Var[x] = m/(m−1) E_B[σ²_B] (Ioffe & Szegedy, Alg. 2).

In both, σ²_B entering the population estimate is the unbiased batch variance (n/(n−1) times the
biased one, n the number of valid positions), as in ``torch.nn.BatchNorm1d``; the normalisation
while training uses the biased variance, as in Alg. 1.

``per_step=False`` keeps a single slot shared by all time steps. Batch statistics while training are
still those of the current step: inside a recurrence the state at t+1 depends on the normalised
activations at t, so statistics pooled over time cannot exist when step t is computed, and keeping
the sequence path and the step-by-step path identical matters more than the pooling.

In eval mode, a slot that never received statistics (a step longer than any training sequence but
below ``max_steps``) falls back to the last slot that did, so "steps past T_max" and "steps past the
longest training caption" behave the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

__all__ = ["SequenceBatchNorm"]

_STATS = ("momentum", "cumulative")


class SequenceBatchNorm(nn.Module):
    """Batch norm over the feature dimension with per-time-step statistics.

    Args:
        num_features: size F of the normalised (last) dimension.
        max_steps: T_max, the number of per-step statistics slots (ignored when ``per_step=False``).
        per_step: statistics per time step (True) or one set shared by all steps (False).
        stats: ``"momentum"`` (running averages) or ``"cumulative"`` (Ioffe & Szegedy Alg. 2).
        momentum: m for ``stats="momentum"``.
        eps: ε added to the variance.
        affine: learn γ (and β when ``center``).
        center: learn a shift β; ``False`` for BN-LSTM's W_h h and W_x x terms, whose shift the
            cell's own bias provides (Cooijmans et al.).
        gamma_init: initial γ (0.1 in Cooijmans et al., to keep tanh/σ away from saturation).

    Call as ``bn(x, step=t, mask=m)`` with either

    - ``x`` of shape ``[T, B, F]`` (a whole sequence; ``step`` is the index of its first step) and
      ``mask`` of shape ``[T, B]``, or
    - ``x`` of shape ``[B, F]`` (one step; ``step`` is its index) and ``mask`` of shape ``[B]``.

    ``mask`` is True (or 1) at valid positions; padded positions are normalised like the others but
    never enter the statistics.
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int = 100,
        per_step: bool = True,
        stats: str = "momentum",
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        center: bool = True,
        gamma_init: float = 1.0,
    ) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps (T_max) must be ≥ 1, got {max_steps!r}")
        if stats not in _STATS:
            raise ValueError(f"stats must be one of {_STATS}, got {stats!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.num_features = num_features
        self.per_step = bool(per_step)
        self.max_steps = int(max_steps) if per_step else 1
        self.stats = stats
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.affine = affine
        self.center = center
        if affine:
            self.weight = nn.Parameter(torch.full((num_features,), float(gamma_init)))
        else:
            self.register_parameter("weight", None)
        if affine and center:
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(self.max_steps, num_features))
        self.register_buffer("running_var", torch.ones(self.max_steps, num_features))
        # Number of batches that updated each slot (the k of the cumulative average, and the record
        # of which slots hold real statistics).
        self.register_buffer("num_batches_tracked", torch.zeros(self.max_steps, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, per_step={self.per_step}, "
            f"stats={self.stats!r}, momentum={self.momentum}, eps={self.eps}, center={self.center}"
        )

    # ----------------------------------------------------------------------------------------------
    def slot(self, step: int) -> int:
        """The statistics slot used for time step ``step`` (training view: clamp at T_max − 1)."""
        return min(int(step), self.max_steps - 1) if self.per_step else 0

    def _eval_slot(self, step: int) -> int:
        slot = self.slot(step)
        if self.num_batches_tracked[slot] > 0:
            return slot
        seen = torch.nonzero(self.num_batches_tracked[: slot + 1]).flatten()
        return int(seen[-1]) if seen.numel() else slot

    def forward(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        if x.dim() == 2:
            return self._forward_step(x, int(step), mask)
        if x.dim() == 3:
            return self._forward_sequence(x, int(step), mask)
        raise ValueError(f"SequenceBatchNorm expects [T, B, F] or [B, F] input, got shape {tuple(x.shape)}")

    # ----------------------------------------------------------------------------------------------
    def _forward_step(self, x: Tensor, step: int, mask: Tensor | None) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {x.shape[-1]}")
        if not self.training:
            s = self._eval_slot(step)
            return F.batch_norm(
                x, self.running_mean[s], self.running_var[s], self.weight, self.bias, False, 0.0, self.eps
            )
        s = self.slot(step)
        if mask is None or bool(mask.all()):
            n = x.shape[0]
            if n < 2:  # a lone sample has no variance: normalise with what we have, keep population stats
                mean, var = x.mean(0), x.new_zeros(x.shape[-1])
                return self._affine((x - mean) * torch.rsqrt(var + self.eps))
            # Fast path: PyTorch's fused kernel. It updates the running statistics it is given in place
            # and autograd keeps them for backward, so it gets copies (all slots are views of one buffer,
            # sharing one version counter) and the slot is written afterwards.
            self.num_batches_tracked[s] += 1
            m = self._update_weight(s)
            rm, rv = self.running_mean[s].clone(), self.running_var[s].clone()
            y = F.batch_norm(x, rm, rv, self.weight, self.bias, True, m, self.eps)
            with torch.no_grad():
                self.running_mean[s] = rm
                self.running_var[s] = rv
            return y
        w = mask.to(x.dtype).unsqueeze(-1)  # [B, 1]
        n = w.sum(0)  # [1]
        mean = (x * w).sum(0) / n.clamp_min(1)
        var = ((x - mean).square() * w).sum(0) / n.clamp_min(1)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        n_int = int(n.item())
        if n_int >= 2:
            self._update_running(s, mean.detach(), var.detach() * (n_int / (n_int - 1)))
        return self._affine(y)

    def _forward_sequence(self, x: Tensor, step0: int, mask: Tensor | None) -> Tensor:
        T, B, Fdim = x.shape
        if Fdim != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {Fdim}")
        if not self.training:
            slots = [self._eval_slot(step0 + t) for t in range(T)]
            idx = torch.tensor(slots, device=x.device)
            mean, var = self.running_mean[idx], self.running_var[idx]  # [T, F]
            y = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)
            return self._affine(y)
        if mask is None or bool(mask.all()):
            return self._forward_sequence_full(x, step0)
        w = mask.to(x.dtype).reshape(T, B, 1)
        n = w.sum(1)  # [T, 1]
        mean = (x * w).sum(1) / n.clamp_min(1)  # [T, F]
        var = ((x - mean.unsqueeze(1)).square() * w).sum(1) / n.clamp_min(1)
        y = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)
        counts = n.squeeze(1).tolist()
        with torch.no_grad():
            for t in range(T):
                k = int(counts[t])
                if k >= 2:
                    self._update_running(self.slot(step0 + t), mean[t].detach(), var[t].detach() * (k / (k - 1)))
        return self._affine(y)

    def _forward_sequence_full(self, x: Tensor, step0: int) -> Tensor:
        """Every position valid: one fused batch-norm kernel with (step, feature) pairs as channels."""
        T, B, Fdim = x.shape
        if B < 2:  # a lone sequence has no batch variance
            return self._affine((x - x) * torch.rsqrt(x.new_tensor(self.eps)))
        flat = x.transpose(0, 1).reshape(B, T * Fdim)  # channel (t, f) ↔ column t·F + f
        weight = self.weight.repeat(T) if self.weight is not None else None
        bias = self.bias.repeat(T) if self.bias is not None else None
        y = F.batch_norm(flat, None, None, weight, bias, True, 0.0, self.eps)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=1, correction=1)  # unbiased, for the population
            for t in range(T):
                self._update_running(self.slot(step0 + t), mean[t], var[t])
        return y.reshape(B, T, Fdim).transpose(0, 1)

    # ----------------------------------------------------------------------------------------------
    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def _update_weight(self, slot: int) -> float:
        """Weight of the new batch in the running average (called after the count was incremented)."""
        if self.stats == "cumulative":
            return 1.0 / float(self.num_batches_tracked[slot])
        return self.momentum

    @torch.no_grad()
    def _update_running(self, slot: int, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked[slot] += 1
        m = self._update_weight(slot)
        self.running_mean[slot].lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var[slot].lerp_(unbiased_var.to(self.running_var.dtype), m)
