"""One highway layer of the RHN family as a single autograd node (the training fast path).

Given the pre-activations a = [a_h, a_t(, a_c)] of one highway layer (input term plus recurrent product,
``[B, G·H]``) and the layer's input state s_{l−1}:

    p_g = BN(a_g; γ_g) + b_g   for the batch-normalised gates g (batch statistics, PyTorch's kernel)
    p_g = γ_g(â_g r_g + d_g) + b_g   the same with batch renormalization (r, d constants of the backward
                               pass, from this batch's statistics and the population's: Ioffe 2017)
    p_g = a_g + b_g            for the others
    h = tanh(p_h),  t = σ(p_t),  c = σ(p_c) (free carry) or 1 − t (coupled)
    s_l = h ⊙ t + s_{l−1} ⊙ c

and its gradient, written by hand:

    coupled:  dh = ds ⊙ t,  dt = ds ⊙ (h − s_{l−1}),  ds_{l−1} = ds ⊙ (1 − t)
    free:     dh = ds ⊙ t,  dt = ds ⊙ h,  dc = ds ⊙ s_{l−1},  ds_{l−1} = ds ⊙ c
    dp_h = dh ⊙ (1 − h²),  dp_{t,c} = d{t,c} ⊙ σ'(·),  da_g = BN-backward(dp_g) or dp_g,  db_g = Σ_b dp_g
    renormalised: da_g = BN-backward with scale γ_g r_g,  dγ_g = r_g Σ_b dp_g ⊙ â_g + d_g Σ_b dp_g

Where the fused CPU kernels of :mod:`bnrhn.kernels` serve the tensors, the activations and the state
update are one pass over memory (``highway_forward``) and so is everything before the batch-norm
backward (``highway_backward``); elsewhere (CUDA, 16-bit, no compiler) the same operations run as a few
in-place PyTorch kernels (:mod:`bnrhn.kernels.composed`).

Why by hand: composed from autograd operations, one highway layer is a dozen graph nodes, and the
split of a into gates costs a concatenation of their gradients in backward. Each of those passes
over a small ``[B, H]`` tensor costs about as much as its arithmetic, and an RHN step has L of these
layers. Here the forward is a handful of in-place kernels and the backward writes da into one buffer.
The reference composition stays in :meth:`bnrhn.cells.rhn.RHNCell.recur` (eval mode, no norm or layer
norm, padded steps, gate logging) and the tests check that both give the same values and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnrhn import kernels
from bnrhn.autodiff import autocast_backward, autocast_forward
from bnrhn.layers.seq_batchnorm import batch_norm_rows, renorm_parameter_grads


def highway_layer_forward(spec, a: Tensor, s: Tensor, bias: Tensor | None, gammas, a_is_scratch: bool = False):
    """One highway layer's forward (the module docstring's equations) outside autograd →
    ``(s_l, stats, saved)``: ``stats`` the batch mean and biased variance of each normalised gate (for the
    caller's running averages), ``saved`` what :func:`highway_layer_backward` needs. ``spec``, ``bias`` and
    ``gammas`` as in :class:`HighwayStep`; ``a_is_scratch``: ``a`` is the caller's own product and may be
    overwritten (no copy of it is made when ``bias`` is None)."""
    H, G, normed, eps, renorm = spec
    if bias is None:
        act = a if a_is_scratch and a.is_contiguous() else a.clone(memory_format=torch.contiguous_format)
    else:
        act = (a + bias).contiguous()
    bn_inputs, saved_stats, stats, scales, corrections = [], [], [], [], []
    for k, g in enumerate(normed):
        cols = slice(g * H, (g + 1) * H)
        x = a[:, cols].contiguous()
        y, mean, invstd, scale, r, d = batch_norm_rows(x, gammas[k], bias[cols], eps,
                                                       renorm[k] if renorm is not None else None)
        corrections.append((r, d))
        act[:, cols] = y
        bn_inputs.append(x)
        scales.append(scale)
        saved_stats += [mean, invstd]
        stats += [mean, invstd.pow(-2).sub_(eps).clamp_min_(0.0)]
    ops = kernels.step_ops(act, s)
    s = s.contiguous()
    s_new = ops.highway_forward(act, s, G)
    return s_new, stats, (ops, corrections, act, s, bn_inputs, saved_stats, scales)


def highway_layer_backward(spec, saved, ds: Tensor, need_bias: bool, need_gammas):
    """The gradient of :func:`highway_layer_forward` → ``(da, ds_{l−1}, db or None, [dγ or None, …])`` from
    ``ds`` = ∂L/∂s_l; ``need_gammas`` says, per normalised gate, whether its dγ is wanted."""
    H, G, normed, eps, _ = spec
    ops, corrections, act, s, bn_inputs, saved_stats, scales = saved
    da, ds_prev = ops.highway_backward(ds.contiguous(), act, s, G)
    db = da.sum(0) if need_bias else None  # before the normalised slices are replaced
    dgammas = []
    for k, g in enumerate(normed):
        cols = slice(g * H, (g + 1) * H)
        r, d = corrections[k]
        renormalised = r is not None and need_gammas[k]  # dγ needs Σ dp too (the kernel's dβ)
        dx, dscale, dshift = torch.ops.aten.native_batch_norm_backward(
            da[:, cols].contiguous(), bn_inputs[k], scales[k], None, None, saved_stats[2 * k],
            saved_stats[2 * k + 1], True, eps, [True, need_gammas[k], renormalised],
        )
        dscale, _ = renorm_parameter_grads(dscale, dshift, r, d)
        da[:, cols] = dx
        dgammas.append(dscale)
    return da, ds_prev, db, dgammas


class HighwayStep(Function):
    """``HighwayStep.apply(spec, a, s, bias, *gammas)`` → ``(s_l, mean_1, var_1, mean_2, var_2, …)``.

    ``spec`` = (hidden size H, number of gates G (2 coupled, 3 free), indices of the batch-normalised
    gates, ε, renorm): ``renorm`` is None (plain batch statistics) or one function (batch mean, biased
    variance) → (r, d) per normalised gate, for batch renormalization. ``bias`` is ``[G·H]`` (not yet in
    ``a``); ``gammas`` are the scales of the normalised gates, in order; ``bias=None`` when ``a`` has its
    bias already (no normalised gate). The returned means and biased variances (one pair per normalised
    gate, no gradient) are the batch statistics, for the caller's running averages.
    """

    @staticmethod
    @autocast_forward(float32=True)
    def forward(ctx, spec, a: Tensor, s: Tensor, bias: Tensor, *gammas: Tensor):
        s_new, stats, saved = highway_layer_forward(spec, a, s, bias, gammas)
        ops, corrections, act, s, bn_inputs, saved_stats, scales = saved
        ctx.spec, ctx.ops, ctx.corrections = spec, ops, corrections
        ctx.save_for_backward(act, s, *bn_inputs, *saved_stats, *scales)
        ctx.mark_non_differentiable(*stats)
        return (s_new, *stats)

    @staticmethod
    @once_differentiable
    @autocast_backward
    def backward(ctx, ds: Tensor, *_):
        n = len(ctx.spec[2])
        act, s, *rest = ctx.saved_tensors
        saved = (ctx.ops, ctx.corrections, act, s, list(rest[:n]), list(rest[n : 3 * n]), list(rest[3 * n :]))
        da, ds_prev, db, dgammas = highway_layer_backward(ctx.spec, saved, ds, ctx.needs_input_grad[3],
                                                          ctx.needs_input_grad[4:])
        return (None, da, ds_prev, db, *dgammas)
