"""A whole sequence of RHN steps as a single autograd node (the training fast path of the RHN family).

The step path (:mod:`bnrhn.cells.highway`) makes every highway layer of every time step two autograd nodes:
the recurrent product a = x_t·[l ∈ I] + s_{l−1} R_lᵀ (+ b_l) and the highway layer itself. At H = 128 the
arithmetic of one such layer is a few tens of microseconds, about what the graph costs around it
(recording the nodes, saving their tensors, the engine scheduling their backward calls): with L = 3 layers
and T = 20 steps that is 120 nodes forward and backward per sequence. Here the time loop runs inside one
node instead, forward and backward, calling the same layer functions (:func:`highway_layer_forward`,
:func:`highway_layer_backward`, i.e. the fused CPU kernels where they serve and batch norm through PyTorch's
kernel) with the same equations:

    forward, for t = 0..T−1 and l = 1..L:   a = base_{t,l} + (s_{l−1} ⊙ m) R_lᵀ,   s_l = highway(a, s_{l−1})
    backward, in reverse:                   da, ds_{l−1} = highway′(ds_l),   ds_{l−1} += (da R_l) ⊙ m

with m the recurrent-dropout mask (1 without it) and base_{t,l} the projected input of the layers that read
x_t (I = {1} or {1..L}), b_l for the others. The weight gradients are one product per layer over the
whole sequence, dR_l = [da_{0,l}; …; da_{T−1,l}]ᵀ [s_{0,l−1} ⊙ m; …] (as :mod:`bnrhn.cells.deferred`).

Packed sequences (padded batches sorted by length, :meth:`bnrhn.nn.Recurrent.forward`) are supported as the
step loop does them: step t computes the first n_t rows only, a row that drops out keeps its state as its
final state, and outputs past a sequence's end are zeros. Each step hands its batch statistics to the plan's
``track``; the cell folds them into the population statistics with the same result as the step path — once
after the node where every step has a slot of its own, else step by step in time order (batch
renormalization's r and d then see the same history).

Where the fused CPU kernels serve the tensors, :class:`NativeHighwaySequence` runs the same loop in C++
(``bnrhn/kernels/highway_sequence.cpp``); this Python node remains for CUDA, 16-bit tensors, machines without
the extension, and batch renormalization with steps sharing a slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnrhn import kernels
from bnrhn.kernels import batch_split, onednn
from bnrhn.cells.highway import highway_layer_backward, highway_layer_forward
from bnrhn.cells.packed_rows import drop_finished, final_grads, final_state, grow_grads


@dataclass
class SequencePlan:
    """What one call of :class:`HighwaySequence` computes (everything that is not a tensor input).

    ``depth`` highway layers of hidden size ``hidden``; ``reads_input[l]``: layer l adds the projected
    input (``xp`` holds one chunk per such layer, in order); ``bias_in_product[l]``: layer l has no
    normaliser and does not read x_t, so its bias is added to its product; ``spec(l, t)``: the
    :func:`highway_layer_forward` spec of layer l at time index t; ``track(l, t, stats, rows)``: receives the
    batch statistics of layer l at time index t (to fold into the population statistics, now or later); ``active``: rows computed
    at each step (non-increasing; None = all rows at every step).
    """

    depth: int
    hidden: int
    reads_input: tuple[bool, ...]
    bias_in_product: tuple[bool, ...]
    spec: Callable[[int, int], tuple]
    track: Callable[[int, int, list, int], None]
    active: list[int] | None
    n_gammas: int  # normalised gates per layer


class HighwaySequence(Function):
    """``HighwaySequence.apply(plan, xp, s0, h_mask, *weights, *biases, *gammas)`` → ``(out, s_T)``.

    ``xp`` ``[T, B, K·G·H]`` the projected inputs, ``s0`` ``[B, H]``, ``h_mask`` ``[B, H]`` or None,
    ``weights`` the L recurrent matrices R_l ``[G·H, H]``, ``biases`` the L biases b_l (those of layers whose
    bias is in ``xp`` get no gradient here), ``gammas`` the batch-norm scales, layer by layer. Returns the
    outputs ``[T, B, H]`` (zeros where a packed row has ended) and the final state ``[B, H]`` (each row's state
    at its own last step)."""

    @staticmethod
    def forward(ctx, plan: SequencePlan, xp: Tensor, s0: Tensor, h_mask: Tensor | None, *params: Tensor):
        L = plan.depth
        weights, biases, gammas = params[:L], params[L : 2 * L], params[2 * L :]
        T, B = xp.shape[0], xp.shape[1]
        chunks = xp.chunk(sum(plan.reads_input), dim=2)
        active = plan.active or [B] * T
        out = xp.new_zeros(T, B, plan.hidden) if active[-1] < B else xp.new_empty(T, B, plan.hidden)
        s = s0
        finished = []  # rows that dropped out, the latest last
        steps = []  # per t: per layer (spec, saved, s_in)
        with torch.no_grad():
            for t in range(T):
                n = active[t]
                s, = drop_finished((s,), n, finished)
                layers = []
                chunk = 0
                for l in range(L):
                    s_in = s if h_mask is None else s * h_mask[:n]
                    if plan.reads_input[l]:
                        a = torch.addmm(chunks[chunk][t, :n], s_in, weights[l].t())
                        chunk += 1
                    elif plan.bias_in_product[l]:
                        a = torch.addmm(biases[l], s_in, weights[l].t())
                    else:
                        a = s_in @ weights[l].t()
                    spec = plan.spec(l, t)
                    k = plan.n_gammas
                    bias = None if plan.bias_in_product[l] or not k else biases[l]
                    s, stats, saved = highway_layer_forward(spec, a, s, bias, gammas[l * k : (l + 1) * k],
                                                            a_is_scratch=True)
                    if stats:
                        plan.track(l, t, stats, n)
                    layers.append((spec, saved, s_in))
                out[t, :n] = s
                steps.append(layers)
        final, = final_state((s,), finished)
        ctx.plan, ctx.steps, ctx.active = plan, steps, active
        ctx.shapes = (T, B, xp.shape[2])
        # The per-step intermediates stay on ctx (nothing outside the node holds them); the inputs the backward
        # reads go through save_for_backward, so that changing them in place before backward is an error, as it is
        # with the step nodes (s0 and the γs are read inside the per-step records)
        ctx.save_for_backward(h_mask, s0, *weights, *gammas)
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_final: Tensor | None):
        plan, steps, active = ctx.plan, ctx.steps, ctx.active
        h_mask, _, *weights = ctx.saved_tensors[: 2 + plan.depth]
        L, k = plan.depth, plan.n_gammas
        T, B, P = ctx.shapes
        need = ctx.needs_input_grad  # (plan, xp, s0, h_mask, *weights, *biases, *gammas)
        need_w, need_b, need_g = need[4 : 4 + L], need[4 + L : 4 + 2 * L], need[4 + 2 * L :]
        ref = steps[0][0][1][2]  # a saved activation: dtype and device
        dxp = ref.new_zeros(T, B, P) if need[1] else None
        dchunks = dxp.chunk(sum(plan.reads_input), dim=2) if dxp is not None else None
        das = [[] for _ in range(L)]
        s_ins = [[] for _ in range(L)]
        db = [None] * L
        dgammas: list[Tensor | None] = [None] * (L * k)
        ds, = final_grads((grad_final,), active[-1], (ref[:, : plan.hidden],))
        for t in range(T - 1, -1, -1):
            n = active[t]
            ds, = grow_grads([ds], (grad_final,), n)  # rows whose last step is t: their final-state gradient
            if grad_out is not None:
                ds = ds + grad_out[t, :n]
            chunk = sum(plan.reads_input)
            for l in range(L - 1, -1, -1):
                spec, saved, s_in = steps[t][l]
                has_bias_grad = bool(k) and need_b[l]
                da, ds_prev, dbias, dg = highway_layer_backward(spec, saved, ds, has_bias_grad,
                                                                need_g[l * k : (l + 1) * k])
                if plan.reads_input[l]:
                    chunk -= 1
                    if dchunks is not None:
                        dchunks[chunk][t, :n] = da
                if dbias is not None:
                    db[l] = dbias if db[l] is None else db[l].add_(dbias)
                for j, g in enumerate(dg):
                    if g is not None:
                        dgammas[l * k + j] = g if dgammas[l * k + j] is None else dgammas[l * k + j].add_(g)
                if need_w[l] or (plan.bias_in_product[l] and need_b[l]):
                    das[l].append(da)
                    s_ins[l].append(s_in)
                if h_mask is None:  # ds_{l−1} = highway′ + da R_l (ds_prev is the kernel's fresh tensor)
                    ds = torch.addmm(ds_prev, da, weights[l])
                else:
                    ds = ds_prev.addcmul_(da @ weights[l], h_mask[:n])
        dweights = [None] * L
        for l in range(L):
            if not das[l]:
                continue
            da_all = torch.cat(das[l])
            if need_w[l]:
                dweights[l] = da_all.t() @ torch.cat(s_ins[l])
            if plan.bias_in_product[l] and need_b[l]:
                db[l] = da_all.sum(0)
        ds0 = ds if need[2] else None
        return (None, dxp, ds0, None, *dweights, *db, *dgammas)


@dataclass
class NativePlan:
    """What one call of :class:`NativeHighwaySequence` computes: the layer structure of :class:`SequencePlan`,
    the indices of the normalised gates, their ε, ``layer_norm`` (a layer norm of each row instead of batch
    norm: ``norm="layer"``, no statistics to track), ``renorm``: None (plain batch statistics) or, for batch
    renormalization, the population terms of every normalised gate and step ``[L, K, 5, T, H]`` (μ, √(σ² + ε),
    1/rmax, rmax, dmax, read once: no step shares a slot), the rows of each step, the fused kernels' op
    namespace, and ``track(means, variances)``, which receives the batch statistics of every step,
    ``[L, K, T, H]`` each (biased variances), once the loop has run."""

    depth: int
    reads_input: tuple[bool, ...]
    bias_in_product: tuple[bool, ...]
    normed: tuple[int, ...]
    eps: float
    layer_norm: bool
    renorm: Tensor | None
    active: list[int] | None
    ops: object
    track: Callable[[Tensor, Tensor], None]


class NativeHighwaySequence(Function):
    """:class:`HighwaySequence` with its time loop in C++ (``bnrhn/kernels/highway_sequence.cpp``), where the fused
    kernels serve the tensors and no step reads population statistics that an earlier step updates (batch
    renormalization with steps sharing a slot stays with :class:`HighwaySequence`). Same arguments and results:
    ``NativeHighwaySequence.apply(plan, xp, s0, h_mask, *weights, *biases, *gammas)`` → ``(out, s_T)``.

    Why: at hidden size 128 the Python loop body (a dozen tensor calls per highway layer and step, each through
    the dispatcher from Python) costs about as much as the layer's arithmetic."""

    @staticmethod
    def forward(ctx, plan: NativePlan, xp: Tensor, s0: Tensor, h_mask: Tensor | None, *params: Tensor):
        L = plan.depth
        weights, biases, gammas = params[:L], params[L : 2 * L], params[2 * L :]
        flags = dict(reads_input=[int(r) for r in plan.reads_input], bias_in_product=[int(b) for b in plan.bias_in_product],
                     normed=list(plan.normed), active=list(plan.active or []), layer_norm=plan.layer_norm)
        s0 = s0.contiguous()
        h_mask = kernels.loop_mask(h_mask, s0)
        dense = lambda ts: [t.contiguous() for t in ts]  # noqa: E731 (parameters are; a caller's tensors may not be)
        packed = onednn.packed_recurrent_weights(weights, xp.shape[1])
        flags["parts"] = batch_split.forward_parts(plan.active, xp.shape[1], s0.shape[1], packed)
        results = plan.ops.highway_sequence_forward(xp.contiguous(), s0, h_mask, dense(weights), dense(biases),
                                                    dense(gammas), eps=plan.eps, renorm=plan.renorm, packed=packed,
                                                    **flags)
        # a record the loop did not compute comes back as the 1-d placeholder empty([0]); an empty batch's
        # records are empty too, but keep their dimensions
        out, final, acts, s_prev, s_in, xhat, mean, var, invstd, r, d = (x if x.dim() > 1 else None for x in results)
        if plan.normed and not plan.layer_norm:
            plan.track(mean, var)
        ctx.plan, ctx.flags, ctx.xp_size = plan, flags, list(xp.shape)
        ctx.save_for_backward(s0, h_mask, acts, s_prev, s_in, xhat, invstd, r, d, *weights, *gammas)
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_final: Tensor | None):
        plan, L = ctx.plan, ctx.plan.depth
        s0, h_mask, acts, s_prev, s_in, xhat, invstd, r, d, *params = ctx.saved_tensors
        weights, gammas = params[:L], params[L:]
        need = ctx.needs_input_grad  # (plan, xp, s0, h_mask, *weights, *biases, *gammas)
        packed_t = onednn.packed_transposed_weights(weights, ctx.xp_size[1])
        flags = dict(ctx.flags, parts=batch_split.backward_parts(ctx.flags["parts"], packed_t))
        dxp, ds0, dweights, dbiases, dgammas = plan.ops.highway_sequence_backward(
            grad_out, grad_final, ctx.xp_size, s0, h_mask, acts, s_prev, s_in, xhat, invstd, r, d,
            [w.contiguous() for w in weights], [g.contiguous() for g in gammas],
            need_xp=need[1], packed_t=packed_t, **flags)
        need_w, need_b, need_g = need[4 : 4 + L], need[4 + L : 4 + 2 * L], need[4 + 2 * L :]
        dweights = [d if n else None for d, n in zip(dweights, need_w)]
        dbiases = [d if n and d.numel() else None for d, n in zip(dbiases, need_b)]
        dgammas = [d if n else None for d, n in zip(dgammas, need_g)]
        return (None, dxp, ds0 if need[2] else None, None, *dweights, *dbiases, *dgammas)
