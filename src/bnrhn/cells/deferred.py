"""Recurrent matrix products whose weight gradient is computed once per sequence.

Inside a time loop a = x_t + h_{t−1} W^T + b is computed T times with the same W. Plain autograd then
computes dW as T separate products dA_tᵀ h_{t−1} (inner dimension B, small and memory-bound) and
accumulates them one by one. Here each step's backward only records (h_{t−1}, dA_t) and returns
dh = dA_t W; the weight gradient of the whole sequence is one product

    dW = [dA_1; …; dA_T]ᵀ [h_0; …; h_{T−1}],   db = Σ_t Σ_b dA_t

computed when the backward pass reaches the weight itself — the same arithmetic with an inner
dimension T·B, as fused RNN kernels (cuDNN, oneDNN) do. Gradients are exact (only the order of the
floating-point summation differs).

Use: ``taps = WeightTaps(weight, bias)`` once per sequence, then ``taps.addmm(x_t, h)`` at each step. The
runner passes the cells an empty dict of taps for each layer's time loop when it records gradients
(``StepMode.taps``); :meth:`RecurrentCell.recurrent_mm` creates one ``WeightTaps`` per weight in it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnrhn.autodiff import autocast_backward, autocast_forward


# Records are kept per backward pass (graph task), so that repeated backward passes over a retained
# graph, or passes that only ask for input gradients, never mix their (h, dA) pairs.
def _graph_task_id() -> int:
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else 0


def _tap_will_run(tapped_weight: Tensor) -> bool:
    """Whether this backward pass will reach the weight's tap (False when only input gradients are asked for)."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    node = tapped_weight.grad_fn
    return True if will_run is None or node is None else bool(will_run(node))


class _Tap(Function):
    """Identity on (W, b) whose backward turns the recorded (h, dA) pairs into dW and db."""

    @staticmethod
    @autocast_forward(float32=False)
    def forward(ctx, records: dict, weight: Tensor, bias: Tensor | None):
        ctx.records = records
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        # Fresh tensors (not views of the inputs), so the outputs belong to this node.
        return weight.clone(), (bias.clone() if bias is not None else weight.new_empty(0))

    @staticmethod
    @once_differentiable
    @autocast_backward
    def backward(ctx, grad_weight, grad_bias):
        records = ctx.records.pop(_graph_task_id(), None)
        if not records:
            return None, grad_weight, grad_bias if ctx.has_bias else None
        hs = torch.cat([h for h, _ in records])
        das = torch.cat([d for _, d in records])
        dw = das.t() @ hs
        if grad_weight is not None:
            dw = dw + grad_weight
        db = None
        if ctx.has_bias:
            db = das.sum(0)
            if grad_bias is not None:
                db = db + grad_bias
        return None, dw, db


class _StepMM(Function):
    """a = base + h Wᵀ + b for one step; backward returns d base and dh, records (h, dA) for dW."""

    @staticmethod
    @autocast_forward(float32=False)
    def forward(ctx, records: dict, base: Tensor | None, h: Tensor, weight: Tensor, bias: Tensor):
        ctx.records = records
        ctx.has_base = base is not None
        ctx.save_for_backward(h, weight)
        out = h @ weight.t()
        if bias.numel():
            out += bias
        if base is not None:
            out += base
        return out

    @staticmethod
    @once_differentiable
    @autocast_backward
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if _tap_will_run(weight):
            ctx.records.setdefault(_graph_task_id(), []).append((h, grad_out))
        grad_h = grad_out @ weight if ctx.needs_input_grad[2] else None
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[1] else None
        return None, grad_base, grad_h, None, None


class WeightTaps:
    """The weight (and bias) of one recurrent product, tapped for one sequence."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.records: dict[int, list] = {}
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            self.weight, self.bias = _Tap.apply(self.records, weight, bias)
            self.deferred = True
        else:
            self.weight = weight
            self.bias = bias if bias is not None else weight.new_empty(0)
            self.deferred = False

    def addmm(self, base: Tensor | None, h: Tensor) -> Tensor:
        """base + h Wᵀ + b (base may be None)."""
        if self.deferred:
            return _StepMM.apply(self.records, base, h, self.weight, self.bias)
        out = h @ self.weight.t()
        if self.bias.numel():
            out = out + self.bias
        return out if base is None else out + base
