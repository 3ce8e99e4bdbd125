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

Two options make training see what inference sees (see docs/cells.md, "The batch-composition leak"):

- ``min_rows = k``: a training step with fewer than k valid positions is normalised with the
  population statistics of its slot (as in eval mode) and updates nothing. Late steps of a padded
  batch hold few captions; their batch statistics say how many captions are still running, and a
  lone valid position normalises to exactly 0.
- ``stats="renorm"``: batch renormalization (Ioffe 2017). With σ_B = √(σ²_B + ε), σ = √(σ²_pop + ε),

      y = γ ⊙ ((x − μ_B)/σ_B ⊙ r + d) + β,   r = clip(σ_B/σ, 1/r_max, r_max),
                                              d = clip((μ_B − μ_pop)/σ, −d_max, d_max)

  with r and d treated as constants in the backward pass; unclipped, y equals the eval-mode output
  γ ⊙ (x − μ_pop)/σ + β, so the forward pass carries no batch cue. The population statistics are
  running averages (``momentum``). While a slot has received fewer than ``renorm_warmup`` updates
  (one per batch for a slot of its own; one per step for a shared slot) its limits grow linearly from
  (r_max, d_max) = (1, 0), plain batch norm, to their set values (Ioffe ramps them the same way,
  over training steps).

Synchronised statistics (data-parallel training, :meth:`SequenceBatchNorm.synchronize`): with N processes
each holding B/N rows of a global batch, step t's statistics are those of the *global* batch — the valid
count n_t, Σ_b w (x − K_t) and Σ_b w (x − K_t)² about the slot's running mean K_t, which every rank holds
alike (one all-reduce, summed in float64, so that the one-pass variance keeps the data's precision) — and
the backward all-reduces Σ_b dy and
Σ_b dy ⊙ x̂, so N ranks × B/N rows give one process's normalisation, gradients and running statistics
(identical on every rank). Batch renormalization takes the same sums through a differentiable all-reduce. ``torch.nn.SyncBatchNorm`` does this for the plain BatchNorm (on CUDA only);
it knows neither time steps nor masks.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from bnrhn.autodiff import autocast_backward, autocast_forward, plain_autograd

__all__ = ["SequenceBatchNorm", "check_statistics_options", "synchronize_batch_norm", "uses_batch_statistics",
           "uses_synchronized_statistics", "estimating_population_statistics", "batch_norm_rows",
           "renorm_parameter_grads"]

_STATS = ("momentum", "cumulative", "renorm")


def check_statistics_options(max_steps: object, stats: object, momentum: object, min_rows: object = 0,
                             renorm_rmax: object = 3.0, renorm_dmax: object = 5.0,
                             renorm_warmup: object = 100) -> None:
    """``ValueError`` naming the argument for a bad T_max, estimator, momentum, row minimum or batch
    renormalization limit. Cells that take these options call it even when they build no batch norm,
    so a typo never passes silently."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps (T_max) must be an integer ≥ 1, got {max_steps!r}")
    if stats not in _STATS:
        raise ValueError(f"stats must be one of {_STATS}, got {stats!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 0:
        raise ValueError(f"min_rows must be an integer ≥ 0 (0 = off), got {min_rows!r}")
    if isinstance(renorm_rmax, bool) or not isinstance(renorm_rmax, (int, float)) or not renorm_rmax >= 1.0:
        raise ValueError(f"renorm_rmax must be a number ≥ 1, got {renorm_rmax!r}")
    if isinstance(renorm_dmax, bool) or not isinstance(renorm_dmax, (int, float)) or not renorm_dmax >= 0.0:
        raise ValueError(f"renorm_dmax must be a number ≥ 0, got {renorm_dmax!r}")
    if isinstance(renorm_warmup, bool) or not isinstance(renorm_warmup, int) or renorm_warmup < 0:
        raise ValueError(f"renorm_warmup must be an integer ≥ 0 (batches per slot), got {renorm_warmup!r}")


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`SequenceBatchNorm` (its training outputs depend on the batch)."""
    return any(isinstance(m, SequenceBatchNorm) for m in model.modules())


def uses_synchronized_statistics(model: nn.Module) -> bool:
    """Whether a :class:`SequenceBatchNorm` of ``model`` was asked to synchronise its statistics
    (:func:`synchronize_batch_norm`)."""
    return any(isinstance(m, SequenceBatchNorm) and m.sync_statistics for m in model.modules())


def synchronize_batch_norm(model: nn.Module, group=None) -> int:
    """Make every :class:`SequenceBatchNorm` of ``model`` compute its training statistics over the processes
    of ``group`` (None: the default group) — the recurrent analogue of
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Returns the number of modules changed."""
    found = [m for m in model.modules() if isinstance(m, SequenceBatchNorm)]
    for m in found:
        m.synchronize(group)
    return len(found)


def batch_norm_rows(x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, corrections=None):
    """Training-mode batch norm of the rows of ``x`` ``[N, F]`` with PyTorch's kernel, for hand-written autograd
    nodes → (y, batch mean, 1/√(σ²+ε), effective scale, r, d).

    Plain (``corrections`` None): y = γ x̂ + β, effective scale γ, r = d = None. Batch renormalization
    (Ioffe 2017): ``corrections(mean, biased var)`` → (r, d), and y = γ(x̂ r + d) + β = (γ r) x̂ + (γ d + β)
    with r, d constants of the backward pass — so ``native_batch_norm_backward`` with the effective scale γ r
    gives dx, and :func:`renorm_parameter_grads` dγ. The statistics come from the kernel's own pass (the
    normalisation without affine, then one in-place affine pass): ``torch.var_mean`` over the rows is 6–12×
    slower than the whole batch-norm kernel on [64, 128–512] float32 (measured on an AVX-512 AMD EPYC)."""
    if corrections is None:
        y, mean, invstd = torch.native_batch_norm(x, gamma, beta, None, None, True, 0.0, eps)
        return y, mean, invstd, gamma, None, None
    y, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    r, d = corrections(mean, invstd.pow(-2).sub_(eps).clamp_min_(0.0))
    scale = gamma * r
    shift = gamma * d if beta is None else torch.addcmul(beta, gamma, d)
    return y.mul_(scale).add_(shift), mean, invstd, scale, r, d


def renorm_parameter_grads(dscale: Tensor | None, dshift: Tensor | None, r: Tensor | None, d: Tensor | None):
    """(dγ, dβ) from the gradients of :func:`batch_norm_rows`'s effective scale and shift (Σ dy ⊙ x̂ and Σ dy):
    dγ = r Σ dy ⊙ x̂ + d Σ dy and dβ = Σ dy with batch renormalization, unchanged without."""
    if r is None or dscale is None:
        return dscale, dshift
    return torch.addcmul(dscale * r, dshift, d), dshift


class SequenceStatistics:
    """The batch-norm bookkeeping of a node that runs the steps ``step``, ``step`` + 1, … of a whole sequence
    (``rows[t]`` rows at step t) with :class:`SequenceBatchNorm` s ``norms`` in training mode, each step
    normalised with its batch statistics: batch renormalization's r and d of each step (:meth:`corrections`)
    and the folding of each step's statistics into the population statistics (:meth:`track`, then
    :meth:`finish`), with the results the step-by-step path gives. When every step has a slot of its own,
    nothing a step writes is read by a later step, so renormalization's population terms are read once, before
    the loop, and the statistics are folded in once, after it; when steps share a slot, renormalization reads
    and tracks step by step, in time order (plain statistics are still folded in after the loop, in order)."""

    def __init__(self, norms, step: int, rows: list[int], like: Tensor) -> None:
        self.norms, self.step, self.rows, self.device = tuple(norms), step, rows, like.device
        self.renorm = self.norms[0].stats == "renorm"
        own_slots = len({self.norms[0].slot(step + t) for t in range(len(rows))}) == len(rows)
        self.deferred = own_slots or not self.renorm
        self.bound_tensors = self._bounds = None  # read once: (μ, √(σ² + ε), 1/rmax, rmax, dmax) [T, F] or [T, 1]
        if self.renorm and own_slots:
            steps = torch.arange(step, step + len(rows), device=like.device)
            dtype = torch.promote_types(like.dtype, torch.float32)  # that of the batch statistics
            self.bound_tensors = [bn.renorm_bounds(steps, dtype) for bn in self.norms]
        self.kept = [([], []) for _ in self.norms]

    def corrections(self, t: int):
        """Step t's (mean, biased var) → (r, d) function per norm, or None without renormalization."""
        if not self.renorm:
            return None
        if self.bound_tensors is not None:
            if self._bounds is None:  # per step, split once
                self._bounds = [list(zip(*(b.unbind(0) for b in bounds))) for bounds in self.bound_tensors]
            return tuple(partial(bn.renorm_from_bounds, b[t]) for bn, b in zip(self.norms, self._bounds))
        return tuple(partial(bn.renorm_corrections, self.step + t) for bn in self.norms)

    def track(self, t: int, stats, n: int) -> None:
        """Step t's batch statistics (mean, biased var) per norm, flattened, over ``n`` rows."""
        for k, bn in enumerate(self.norms):
            if self.deferred:
                self.kept[k][0].append(stats[2 * k])
                self.kept[k][1].append(stats[2 * k + 1])
            else:
                bn.track(self.step + t, stats[2 * k], stats[2 * k + 1], n)

    def finish(self) -> None:
        """Fold the statistics kept by :meth:`track` into the population statistics."""
        if not self.kept[0][0]:
            return
        self.track_all([torch.stack(m) for m, _ in self.kept], [torch.stack(v) for _, v in self.kept])

    def track_all(self, means, variances) -> None:
        """Fold every step's batch statistics into the population statistics at once: per norm, the means and
        biased variances ``[T, F]`` of all the steps (plain statistics, or renormalization with a slot per step)."""
        assert self.deferred, "steps sharing a renormalised slot are tracked one by one (track)"
        counts = torch.tensor(self.rows, dtype=torch.float64, device=self.device)
        for bn, mean, var in zip(self.norms, means, variances):
            bn.track_steps(self.step, mean, var, counts)


@contextmanager
def estimating_population_statistics(model: nn.Module):
    """"Precise BN" for every :class:`SequenceBatchNorm` of ``model``: within the block each starts from empty
    population statistics and, on every forward pass it makes in training mode, adds that batch's plain
    statistics to an average with equal weights (``stats="cumulative"``, Ioffe & Szegedy 2015, Alg. 2; no
    ``min_rows`` fallback). On leaving, each has its own estimator back and keeps the statistics estimated.
    Which modules run in training mode, and with which batches, is the caller's choice (as with
    ``torch.optim.swa_utils.update_bn``, which does the same for ``torch.nn`` batch norms). Yields the
    modules."""
    norms = [m for m in model.modules() if isinstance(m, SequenceBatchNorm)]
    saved = [(bn.stats, bn.min_rows) for bn in norms]
    with torch.no_grad():
        for bn in norms:
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.num_batches_tracked.zero_()
            bn.stats, bn.min_rows = "cumulative", 0
    try:
        yield norms
    finally:
        for bn, (stats, min_rows) in zip(norms, saved):
            bn.stats, bn.min_rows = stats, min_rows


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
        min_rows: training steps with fewer valid positions use the population statistics (0 = off).
        renorm_rmax, renorm_dmax, renorm_warmup: the limits of ``stats="renorm"`` and the number of
            batches per slot over which they grow from plain batch norm to their values.

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
        min_rows: int = 0,
        renorm_rmax: float = 3.0,
        renorm_dmax: float = 5.0,
        renorm_warmup: int = 100,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        check_statistics_options(max_steps, stats, momentum, min_rows, renorm_rmax, renorm_dmax, renorm_warmup)
        self.min_rows = int(min_rows)
        self.renorm_rmax = float(renorm_rmax)
        self.renorm_dmax = float(renorm_dmax)
        self.renorm_warmup = int(renorm_warmup)
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
        self.sync_statistics = False  # set by synchronize()
        self.process_group = None

    def synchronize(self, group=None, enabled: bool = True) -> None:
        """Training statistics over the processes of ``group`` (None: the default process group) from now on
        (module docstring); ``enabled=False`` returns to per-process statistics."""
        self.sync_statistics = bool(enabled)
        self.process_group = group if enabled else None

    @property
    def synchronized(self) -> bool:
        """Whether training statistics are computed over several processes right now (synchronised, and a
        process group of more than one process is running)."""
        return (self.sync_statistics and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def extra_repr(self) -> str:
        extra = f", min_rows={self.min_rows}" if self.min_rows else ""
        if self.stats == "renorm":
            extra += f", rmax={self.renorm_rmax}, dmax={self.renorm_dmax}, warmup={self.renorm_warmup}"
        return (
            f"{self.num_features}, max_steps={self.max_steps}, per_step={self.per_step}, "
            f"stats={self.stats!r}, momentum={self.momentum}, eps={self.eps}, center={self.center}{extra}"
        )

    def plain_batch_statistics(self, rows: int) -> bool:
        """Whether a training step over ``rows`` valid positions is normalised with its own plain batch
        statistics — what the fused kernels of the cells compute (no renormalization, enough rows)."""
        return self.stats != "renorm" and self.batch_statistics_apply(rows)

    def batch_statistics_apply(self, rows: int) -> bool:
        """Whether a training step over ``rows`` valid positions is normalised with its batch statistics,
        plain or renormalised (not with the population fallback of ``min_rows``)."""
        return rows >= max(2, self.min_rows)

    @torch.no_grad()
    def renorm_corrections(self, step: int | Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Batch renormalization's r and d (module docstring) for batch statistics ``mean`` and *biased*
        ``var`` of time step(s) ``step`` (an int, or a ``[T]`` tensor of steps for ``[T, F]`` statistics),
        with the limits of each step's own slot (a slot that has seen no batch is in its warm-up: r = 1,
        d = 0). Constants of the backward pass."""
        return self.renorm_from_bounds(self.renorm_bounds(step, mean.dtype), mean, var)

    @torch.no_grad()
    def renorm_bounds(self, step: int | Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """What r and d of step(s) ``step`` take from the population, read now: (μ, √(σ² + ε), 1/rmax, rmax,
        dmax) of the slot(s), ``[F]`` / ``[1]`` for an int step, ``[T, F]`` / ``[T, 1]`` for a ``[T]`` tensor.
        A whole sequence reads them once when no two of its steps share a slot (a slot changes only when its
        own step is tracked)."""
        if isinstance(step, int):
            idx = self.slot(step)  # a view of the slot's statistics (no index tensor: this runs every step)
        else:
            idx = step.clamp(max=self.max_steps - 1) if self.per_step else torch.zeros_like(step)
        pop_mean = self.running_mean[idx].to(dtype)
        pop_std = torch.sqrt(self.running_var[idx].to(dtype) + self.eps)
        seen = self.num_batches_tracked[idx].to(dtype)
        ramp = (seen / self.renorm_warmup).clamp(max=1.0) if self.renorm_warmup else (seen > 0).to(dtype)
        rmax = (1.0 + (self.renorm_rmax - 1.0) * ramp).unsqueeze(-1)
        dmax = (self.renorm_dmax * ramp).unsqueeze(-1)
        return pop_mean, pop_std, rmax.reciprocal(), rmax, dmax

    def renorm_from_bounds(self, bounds, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """r = clip(√(σ²_B + ε) / √(σ² + ε), 1/rmax, rmax),  d = clip((μ_B − μ) / √(σ² + ε), −dmax, dmax)."""
        pop_mean, pop_std, rmin, rmax, dmax = bounds
        r = torch.clamp(torch.sqrt(var + self.eps).div_(pop_std), rmin, rmax)
        d = torch.clamp((mean - pop_mean).div_(pop_std), -dmax, dmax)
        return r, d

    # ----------------------------------------------------------------------------------------------
    def slot(self, step: int) -> int:
        """The statistics slot used for time step ``step`` (training view: clamp at T_max − 1)."""
        return min(int(step), self.max_steps - 1) if self.per_step else 0

    def _eval_slot(self, step: int) -> int:
        """The slot eval mode reads for ``step``: its own once it has received statistics, else the last
        earlier slot that did (its own when none did)."""
        return self._eval_slots()[self.slot(step)]

    def _eval_slots(self) -> list[int]:
        """:meth:`_eval_slot` of every slot, kept on the host until ``num_batches_tracked`` changes (a new
        tensor or an in-place update moves its version counter), so that a decoding step reads nothing back
        from the device."""
        tracked = self.num_batches_tracked
        key = (tracked.data_ptr(), tracked.device, tracked._version)
        cached = getattr(self, "_eval_slot_cache", None)
        if cached is None or cached[0] != key:
            table, last = [], None
            for s, seen in enumerate((tracked > 0).tolist()):
                last = s if seen else last
                table.append(last if last is not None else s)
            cached = self._eval_slot_cache = (key, table)
        return cached[1]

    def forward(self, x: Tensor, step: int = 0, mask: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """BN(x) at time step ``step`` (``[B, F]``) or steps ``step``, ``step`` + 1, … (``[T, B, F]``), plus
        ``shift`` ``[F]`` when given — BN-LSTM's bias after its input norm — which the full-batch path folds into
        the batch-norm kernel's own shift instead of adding it in another pass."""
        if step < 0:
            raise ValueError(f"step (the time index) must be ≥ 0, got {step!r}")
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            x = x.float()  # mixed precision: the statistics and the normalisation in float32
        if shift is not None and shift.shape != (self.num_features,):
            raise ValueError(f"shift must have shape ({self.num_features},), got {tuple(shift.shape)}")
        if self.training and self.synchronized:
            if x.dim() not in (2, 3):
                raise ValueError(f"SequenceBatchNorm expects [T, B, F] or [B, F] input, got shape {tuple(x.shape)}")
            if x.shape[-1] != self.num_features:
                raise ValueError(f"expected {self.num_features} features, got {x.shape[-1]}")
            if x.dim() == 2:
                m = mask.reshape(1, -1) if mask is not None else None
                y = self._forward_synchronized(x.unsqueeze(0), int(step), m).squeeze(0)
            else:
                y = self._forward_synchronized(x, int(step), mask)
        elif x.dim() == 2:
            y = self._forward_step(x, int(step), mask)
        elif x.dim() == 3:
            return self._forward_sequence(x, int(step), mask, shift)
        else:
            raise ValueError(f"SequenceBatchNorm expects [T, B, F] or [B, F] input, got shape {tuple(x.shape)}")
        return y if shift is None else y + shift

    # ----------------------------------------------------------------------------------------------
    def _forward_step(self, x: Tensor, step: int, mask: Tensor | None) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {x.shape[-1]}")
        if not self.training:
            s = self._eval_slot(step)
            return F.batch_norm(
                x, self.running_mean[s], self.running_var[s], self.weight, self.bias, False, 0.0, self.eps
            )
        if self._needs_general_path(x.shape[0], mask):
            m = mask.reshape(1, -1) if mask is not None else None
            return self._forward_masked(x.unsqueeze(0), step, m).squeeze(0)
        if x.shape[0] < 2:  # a lone sample has no variance: normalise with what we have, keep population stats
            return self._affine((x - x.mean(0)) * torch.rsqrt(x.new_tensor(self.eps)))
        y, mean, var = self._fused_batch_norm(x, self.weight, self.bias)
        self._update_running(self.slot(step), mean, var * (x.shape[0] / (x.shape[0] - 1)))
        return y

    def _forward_sequence(self, x: Tensor, step0: int, mask: Tensor | None, shift: Tensor | None) -> Tensor:
        """[T, B, F] (+ ``shift``, folded into the kernel's affine pass on :meth:`_forward_full_batch`)."""
        T, B, Fdim = x.shape
        if Fdim != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {Fdim}")
        if not self.training:
            y = self._population(x, step0)
        elif mask is None and self.stats == "renorm" and B >= max(2, self.min_rows) and plain_autograd():
            return self._forward_full_batch(x, step0, shift)
        elif self._needs_general_path(B, mask):
            y = self._forward_masked(x, step0, mask)
        elif B >= 2:
            return self._forward_full_batch(x, step0, shift)
        else:  # a lone sequence has no batch variance
            y = self._affine((x - x) * torch.rsqrt(x.new_tensor(self.eps)))
        return y if shift is None else y + shift

    def _forward_full_batch(self, x: Tensor, step0: int, shift: Tensor | None = None) -> Tensor:
        """Every position of [T, B, F] valid, B ≥ 2: one pass of PyTorch's batch-norm kernel with the (step,
        feature) pairs as channels. The [B, T·F] matrix is a view (no copy) when x is stored batch-major, i.e.
        x = z.transpose(0, 1) of a contiguous [B, T, F] z, as the BN-LSTM's input projection is. With batch
        renormalization r and d per pair come from each step's slot as it was before this call (as
        :meth:`_forward_renorm`, whose composition of autograd operations is several times slower)."""
        T, B, Fdim = x.shape
        flat = x.transpose(0, 1).reshape(B, T * Fdim)
        weight = self.weight.repeat(T) if self.weight is not None else None
        bias = self.bias if shift is None else (shift if self.bias is None else self.bias + shift)
        bias = bias.repeat(T) if bias is not None else None
        if self.stats == "renorm":
            steps = torch.arange(step0, step0 + T, device=x.device)

            def corrections(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
                r, d = self.renorm_corrections(steps, mean.view(T, Fdim), var.view(T, Fdim))
                return r.reshape(-1), d.reshape(-1)

            scale = weight if weight is not None else flat.new_ones(T * Fdim)
            y, mean, var = _RenormalisedRows.apply(flat, scale, bias, self.eps, corrections)
        else:
            y, mean, var = self._fused_batch_norm(flat, weight, bias)
        self._update_running_steps(step0, mean.view(T, Fdim), var.view(T, Fdim) * (B / (B - 1)))
        return y.view(B, T, Fdim).transpose(0, 1)

    def _needs_general_path(self, rows: int, mask: Tensor | None) -> bool:
        """Padded positions, renormalization or too few rows: not the fused full-batch kernel."""
        few = bool(self.min_rows) and rows < max(2, self.min_rows)
        return self.stats == "renorm" or few or (mask is not None and not bool(mask.all()))

    def _forward_masked(self, x: Tensor, step0: int, mask: Tensor | None) -> Tensor:
        """Training with padded positions (statistics of step t over its valid positions only), batch
        renormalization, or the population fallback of steps with fewer than ``min_rows`` positions."""
        w = mask.to(x.dtype) if mask is not None else x.new_ones(x.shape[:2])  # [T, B]
        known = [x.shape[1]] * x.shape[0] if mask is None else None  # valid positions per step, on the host
        if self.stats == "renorm":
            return self._forward_renorm(x, step0, w, known_counts=known)
        if plain_autograd():
            y, mean, var = _MaskedBatchNorm.apply(x, w, self.weight, self.bias, self.eps)
        else:  # torch.func transforms: the same arithmetic from differentiable operations
            wn = (w / w.sum(1, keepdim=True).clamp_min(1)).unsqueeze(-1)  # [T, B, 1]
            mean = (x * wn).sum(1)
            var = ((x - mean.unsqueeze(1)).square() * wn).sum(1)
            y = self._affine((x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps))
            mean, var = mean.detach(), var.detach()
        return self._finish_training_steps(y, x, step0, w.sum(1), mean, var, known)

    def _forward_synchronized(self, x: Tensor, step0: int, mask: Tensor | None) -> Tensor:
        """Training with statistics over every process's valid positions (module docstring). A process may
        hold no row at all at a step (its captions ended) and still takes part in the reductions."""
        w = mask.to(x.dtype) if mask is not None else x.new_ones(x.shape[:2])  # [T, B]
        if self.stats == "renorm":
            return self._forward_renorm(x, step0, w, synchronized=True)
        y, mean, var, counts = _SynchronizedBatchNorm.apply(x, w, self.weight, self.bias, self.eps, self.process_group,
                                                            self._shift(step0, x.shape[0]))
        return self._finish_training_steps(y, x, step0, counts, mean, var)

    def _finish_training_steps(self, y: Tensor, x: Tensor, step0: int, counts: Tensor, mean: Tensor,
                               var: Tensor, known_counts: list[int] | None = None) -> Tensor:
        """The common end of the masked and renormalised paths, from their output ``y``, the valid positions
        per step ``counts`` [T] and the batch statistics (mean, *biased* variance, [T, F], no gradient):
        steps with fewer than ``min_rows`` positions take the population statistics instead (slots that
        never received statistics fall back as in eval mode; with none at all, ``y`` is kept), and steps
        with at least max(2, ``min_rows``) positions update the running statistics. ``known_counts``: the
        counts as host integers when the caller knows them (no mask), so that no tensor is read on the host
        (a GPU would wait for it at every time step)."""
        least = max(2, self.min_rows)  # fewer positions: no variance estimate, or too few to trust
        few = counts < least
        any_few = any(k < least for k in known_counts) if known_counts is not None else bool(few.any())
        if self.min_rows and any_few and bool(self.num_batches_tracked.any()):
            y = torch.where(few.view(-1, 1, 1), self._population(x, step0), y)
        if not any_few:
            self._update_running_steps(step0, mean, var * (counts / (counts - 1)).unsqueeze(1))
        else:  # steps with too few valid positions update nothing
            for t, k in enumerate(known_counts if known_counts is not None else counts.tolist()):
                if k >= least:
                    self._update_running(self.slot(step0 + t), mean[t], var[t] * (k / (k - 1)))
        return y

    def _population(self, x: Tensor, step0: int) -> Tensor:
        """Eval-mode normalisation of ``x`` [T, B, F]: population statistics of each step's slot."""
        idx = torch.tensor([self._eval_slot(step0 + t) for t in range(x.shape[0])], device=x.device)
        mean, var = self.running_mean[idx].unsqueeze(1), self.running_var[idx].unsqueeze(1)  # [T, 1, F]
        return self._affine((x - mean) * torch.rsqrt(var + self.eps))

    def _forward_renorm(self, x: Tensor, step0: int, w: Tensor, synchronized: bool = False,
                        known_counts: list[int] | None = None) -> Tensor:
        """Batch renormalization (module docstring) with statistics over the positions where w [T, B] is 1
        (of every process when ``synchronized``: :meth:`_synchronized_moments`). Composed from autograd
        operations; r and d are constants of the backward pass."""
        T = x.shape[0]
        if synchronized:
            counts, mean, var = self._synchronized_moments(x, w, step0)
        else:
            counts = w.sum(1)  # [T]
            wn = (w / counts.clamp_min(1).unsqueeze(1)).unsqueeze(-1)  # [T, B, 1]
            mean = (x * wn).sum(1, keepdim=True)  # [T, 1, F]
            var = ((x - mean).square() * wn).sum(1, keepdim=True)
        std = torch.sqrt(var + self.eps)
        # each step's own slot: one that has seen no batch yet is in its warm-up (plain batch norm), so with a
        # slot per step the result does not depend on which other slots were updated before it (sequence vs
        # step path). Steps that share a slot (per_step=False, t ≥ T_max − 1) read it as it was before this
        # call here, while the step path sees the updates of the earlier steps of the same batch.
        steps = torch.arange(step0, step0 + T, device=x.device)
        r, d = self.renorm_corrections(steps, mean.detach().squeeze(1), var.detach().squeeze(1))
        y = self._affine((x - mean) / std * r.unsqueeze(1) + d.unsqueeze(1))
        return self._finish_training_steps(y, x, step0, counts, mean.detach().squeeze(1), var.detach().squeeze(1),
                                           known_counts)

    def _synchronized_moments(self, x: Tensor, w: Tensor, step0: int) -> tuple[Tensor, Tensor, Tensor]:
        """(n ``[T]``, μ ``[T, 1, F]``, biased σ² ``[T, 1, F]``) over every process's positions where w is 1,
        differentiable in x: one all-reduce of the shifted moments (:func:`_shifted_moments`) forward, and
        one of their gradients backward."""
        shift = self._shift(step0, x.shape[0])
        part = _shifted_moments(x, w, shift)
        sums = _AllReduceSum.apply(part, self.process_group)
        counts, mean, var = _moments_from_sums(sums, shift)
        return counts.detach().to(x.dtype), mean.to(x.dtype).unsqueeze(1), var.to(x.dtype).unsqueeze(1)

    def _shift(self, step0: int, T: int) -> Tensor:
        """The running mean of each step's slot ``[T, F]``: a constant every synchronised rank holds alike,
        close to the batch mean once the slot has seen a few batches (see :func:`_shifted_moments`)."""
        idx = torch.tensor([self.slot(step0 + t) for t in range(T)], device=self.running_mean.device)
        return self.running_mean[idx].detach()

    def _fused_batch_norm(self, x2d: Tensor, weight: Tensor | None, bias: Tensor | None):
        """PyTorch's fused training-mode batch norm over the rows of ``x2d`` → (y, batch mean, biased
        batch variance). The statistics come from the kernel's own saved mean and 1/√(σ² + ε), so they
        cost no second pass over the data; the running statistics are updated by the caller."""
        y, mean, invstd = torch.native_batch_norm(x2d, weight, bias, None, None, True, 0.0, self.eps)
        return y, mean.detach(), invstd.detach().pow(-2).sub_(self.eps).clamp_min_(0.0)

    @torch.no_grad()
    def eval_affine(self, step: int) -> tuple[Tensor, Tensor]:
        """Eval mode as one affine map per feature: BN(x) = x ⊙ scale + shift at time step ``step``, with
        scale = γ/√(σ²_t + ε) and shift = β − μ_t ⊙ scale (population statistics of the step's slot,
        T_max fallback included). For callers that fold the normalisation into a pass of their own."""
        s = self._eval_slot(step)
        scale = torch.rsqrt(self.running_var[s] + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean[s] * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    # ----------------------------------------------------------------------------------------------
    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def _update_weight(self, slot: int) -> float | Tensor:
        """Weight of the new batch in the running average (called after the count was incremented); a tensor
        for the cumulative average, read by lerp_ on the device."""
        if self.stats == "cumulative":
            return self.num_batches_tracked[slot].reciprocal().to(self.running_mean.dtype)
        return self.momentum

    def track(self, step: int, mean: Tensor, var: Tensor, count: int) -> None:
        """Fold the batch statistics of time step ``step`` (mean and *biased* variance over ``count``
        positions), computed elsewhere with this module's γ and ε, into the population statistics —
        for callers that fuse the normalisation into a kernel of their own (the RHN's highway layers)."""
        if count >= 2:
            self._update_running(self.slot(step), mean, var * (count / (count - 1)))

    def track_steps(self, step0: int, mean: Tensor, var: Tensor, counts: Tensor) -> None:
        """:meth:`track` for the consecutive steps step0, step0 + 1, … at once: ``mean`` and biased ``var``
        ``[T, F]``, ``counts`` ``[T]`` (each ≥ 2); the same result as tracking them one by one in order."""
        factor = (counts.double() / (counts.double() - 1)).to(var.dtype).unsqueeze(1)  # n/(n−1) exact, as track's
        self._update_running_steps(step0, mean, var * factor)

    @torch.no_grad()
    def _update_running(self, slot: int, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked[slot] += 1
        m = self._update_weight(slot)
        self.running_mean[slot].lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var[slot].lerp_(unbiased_var.to(self.running_var.dtype), m)

    @torch.no_grad()
    def _update_running_steps(self, step0: int, mean: Tensor, unbiased_var: Tensor) -> None:
        """The running statistics of steps step0, step0 + 1, … from per-step batch statistics ``[T, F]``:
        one vectorised update when every step has a slot of its own, else step by step in time order
        (several steps sharing a slot update it one after the other, as separate batches would)."""
        T = mean.shape[0]
        slots = [self.slot(step0 + t) for t in range(T)]
        if len(set(slots)) < T:
            for t, s in enumerate(slots):
                self._update_running(s, mean[t], unbiased_var[t])
            return
        idx = slice(slots[0], slots[-1] + 1)  # distinct slots of consecutive steps are consecutive
        self.num_batches_tracked[idx] += 1
        if self.stats == "cumulative":
            m = self.num_batches_tracked[idx].reciprocal().unsqueeze(1).to(self.running_mean.dtype)
        else:
            m = self.momentum
        self.running_mean[idx].lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var[idx].lerp_(unbiased_var.to(self.running_var.dtype), m)


class _RenormalisedRows(torch.autograd.Function):
    """Batch renormalization (Ioffe 2017) of the rows of x ``[N, C]``, per column: y = γ(x̂ r + d) + β with x̂ the
    batch-normalised x, r and d = ``corrections(μ_B, σ²_B)`` constants of the backward pass. Forward
    :func:`batch_norm_rows` (PyTorch's kernel), backward PyTorch's batch-norm backward with the effective scale
    γ r and :func:`renorm_parameter_grads`. Returns (y, μ_B, biased σ²_B); the statistics carry no gradient."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, corrections):
        y, mean, invstd, scale, r, d = batch_norm_rows(x, gamma, beta, eps, corrections)
        ctx.save_for_backward(x, mean, invstd, scale, r, d)
        ctx.eps, ctx.has_beta = eps, beta is not None
        var = invstd.pow(-2).sub_(eps).clamp_min_(0.0)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        x, mean, invstd, scale, r, d = ctx.saved_tensors
        dx, dscale, dshift = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), x, scale, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        dgamma, dbeta = renorm_parameter_grads(dscale, dshift, r, d)
        return dx, dgamma, dbeta if ctx.has_beta else None, None, None


class _MaskedBatchNorm(torch.autograd.Function):
    """Batch norm of x ``[T, B, F]`` with statistics per step t over the positions where w ``[T, B]`` is 1:

        μ_t = Σ_b w̃_tb x_tb,  σ²_t = Σ_b w̃_tb (x_tb − μ_t)²,  w̃_tb = w_tb / Σ_b w_tb,
        y_tb = γ (x_tb − μ_t) / √(σ²_t + ε) + β      (padded positions normalised too, never counted)

    Hand-written because autograd's backward of the masked formula (reductions over the middle
    dimension, broadcast gradients) is several times slower than these few passes. With
    x̂ = (x − μ)/√(σ² + ε), S₁ = Σ_b dy and S₂ = Σ_b dy ⊙ x̂ (over *all* positions: padded outputs
    depend on μ and σ² too):

        dx_tb = γ/√(σ²_t + ε) ⊙ (dy_tb − w̃_tb (S₁ + x̂_tb ⊙ S₂)),  dγ = Σ dy ⊙ x̂,  dβ = Σ dy.

    Returns (y, μ ``[T, F]``, biased σ² ``[T, F]``); the statistics carry no gradient.
    """

    @staticmethod
    @autocast_forward(float32=True)
    def forward(ctx, x, w, weight, bias, eps):
        wn = (w / w.sum(1, keepdim=True).clamp_min(1)).unsqueeze(1)  # [T, 1, B]
        mean = torch.bmm(wn, x)  # [T, 1, F]: batched weighted sums, BLAS instead of strided reductions
        xhat = x - mean
        var = torch.bmm(wn, xhat * xhat)
        invstd = torch.rsqrt(var + eps)
        xhat.mul_(invstd)
        y = xhat * weight if weight is not None else xhat.clone()
        if bias is not None:
            y += bias
        ctx.save_for_backward(xhat, invstd, wn, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean.squeeze(1), var.squeeze(1)

    @staticmethod
    @once_differentiable
    @autocast_backward
    def backward(ctx, dy, _dmean, _dvar):
        xhat, invstd, wn, weight = ctx.saved_tensors
        dyx = dy * xhat
        dweight = dyx.sum((0, 1)) if weight is not None and ctx.needs_input_grad[2] else None
        dbias = dy.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        dx = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight  # [T, 1, F]
            s1 = dy.sum(1, keepdim=True)
            s2 = dyx.sum(1, keepdim=True)
            dx = torch.addcmul(s1, xhat, s2).mul_(wn.transpose(1, 2))
            dx = torch.sub(dy, dx).mul_(scale)
        return dx, None, dweight, dbias, None


class _SynchronizedBatchNorm(torch.autograd.Function):
    """:class:`_MaskedBatchNorm` with the sums over the batch taken over every process of ``group``:

        n_t = Σ_{r,b} w_tb,  μ_t = K_t + Σ_{r,b} w_tb d_tb / n_t,  σ²_t = Σ_{r,b} w_tb d_tb² / n_t − (μ_t − K_t)²

    with d = x − K_t and K_t the slot's running mean (:func:`_shifted_moments`: one all-reduce, float64 sums),
    and in backward
    S₁ = Σ_{r,b} dy, S₂ = Σ_{r,b} dy ⊙ x̂ (one all-reduce); dx as in _MaskedBatchNorm with the global n_t.
    dγ and dβ are this process's own sums: data-parallel training averages parameter gradients itself.
    Returns (y, μ ``[T, F]``, biased σ² ``[T, F]``, n ``[T]``); the statistics carry no gradient.
    """

    @staticmethod
    @autocast_forward(float32=True)
    def forward(ctx, x, w, weight, bias, eps, group, shift):
        sums = _shifted_moments(x, w, shift)
        dist.all_reduce(sums, group=group)
        counts, mean, var = (v.to(x.dtype) for v in _moments_from_sums(sums, shift))
        xhat = x - mean.unsqueeze(1)
        invstd = torch.rsqrt(var + eps).unsqueeze(1)  # [T, 1, F]
        xhat.mul_(invstd)
        y = xhat * weight if weight is not None else xhat.clone()
        if bias is not None:
            y += bias
        ctx.save_for_backward(xhat, invstd, w, counts, weight)
        ctx.has_bias = bias is not None
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, counts)
        return y, mean, var, counts

    @staticmethod
    @once_differentiable
    @autocast_backward
    def backward(ctx, dy, _dmean, _dvar, _dcounts):
        xhat, invstd, w, counts, weight = ctx.saved_tensors
        dyx = dy * xhat
        dweight = dyx.sum((0, 1)) if weight is not None and ctx.needs_input_grad[2] else None
        dbias = dy.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        # every process runs this reduction, whether or not its input needs a gradient (collectives must match)
        sums = torch.cat([dy.sum(1), dyx.sum(1)], dim=1)  # [T, 2F]
        dist.all_reduce(sums, group=ctx.group)
        dx = None
        if ctx.needs_input_grad[0]:
            s1, s2 = sums.unsqueeze(1).chunk(2, dim=2)  # [T, 1, F] each
            scale = invstd if weight is None else invstd * weight
            wn = (w / counts.clamp_min(1).unsqueeze(1)).unsqueeze(2)  # [T, B, 1]
            dx = torch.sub(dy, torch.addcmul(s1, xhat, s2).mul_(wn)).mul_(scale)
        return dx, None, dweight, dbias, None, None, None


def _shifted_moments(x: Tensor, w: Tensor, shift: Tensor) -> Tensor:
    """[Σ_b w, Σ_b w (x − K), Σ_b w (x − K)²] per step, ``[T, 1 + 2F]`` in float64, for x ``[T, B, F]``, w
    ``[T, B]`` and a shift K ``[T, F]`` that every process holds alike: the synchronised statistics take
    all three in one all-reduce (each collective is a latency-bound round trip per time step). The one-pass
    variance from these sums loses about log₂((μ − K)² / σ²) bits; float64 sums and K = the slot's running
    mean keep that far below the data's own precision."""
    w64, d64 = w.double(), x.double() - shift.double().unsqueeze(1)
    return torch.cat([w64.sum(1, keepdim=True), torch.einsum("tb,tbf->tf", w64, d64),
                      torch.einsum("tb,tbf->tf", w64, d64 * d64)], dim=1)


def _moments_from_sums(sums: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n ``[T]``, μ ``[T, F]``, biased σ² ``[T, F]``) from the summed :func:`_shifted_moments`."""
    F_ = shift.shape[-1]
    n = sums[:, :1].clamp_min(1)
    centred = sums[:, 1 : 1 + F_] / n
    var = (sums[:, 1 + F_ :] / n - centred * centred).clamp_min(0)
    return sums[:, 0], centred + shift, var


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_r x_r on every rank; dx_r = Σ_r dy_r (every rank's loss depends on the same sum).
    ``torch.distributed.nn.functional.all_reduce`` does this but is deprecated in torch 2.13, and the
    replacement it names is a private module."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        dx = dy.clone()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None
