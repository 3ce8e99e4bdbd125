"""The operations of the fused kernels composed from PyTorch's own: what the cells run where the extension is
not used (no compiler, CUDA, ``BNRHN_GATE_KERNELS=off``, slower here). Same names, arguments, results and
in-place effects as ``torch.ops.bnrhn_gates`` (``gates.cpp`` states the equations); H is the state's width."""

from __future__ import annotations

import torch
from torch import Tensor

_tanh_backward_ = torch.ops.aten.tanh_backward.grad_input
_sigmoid_backward_ = torch.ops.aten.sigmoid_backward.grad_input

tanh = torch.tanh
sigmoid = torch.sigmoid


def highway_forward(act: Tensor, s: Tensor, G: int) -> Tensor:
    H = s.shape[1]
    h = act[:, :H].tanh_()
    act[:, H:].sigmoid_()
    t = act[:, H : 2 * H]
    return torch.lerp(s, h, t) if G == 2 else torch.addcmul(h * t, s, act[:, 2 * H :])


def highway_backward(ds: Tensor, act: Tensor, s: Tensor, G: int) -> tuple[Tensor, Tensor]:
    H = s.shape[1]
    h, t = act[:, :H], act[:, H : 2 * H]
    da = torch.empty_like(act)
    # d(gate outputs) into da, then in place into d(pre-activations)
    torch.mul(ds, t, out=da[:, :H])
    if G == 2:
        torch.mul(ds, h - s, out=da[:, H:])
        ds_prev = ds - ds * t
    else:
        torch.mul(ds, h, out=da[:, H : 2 * H])
        torch.mul(ds, s, out=da[:, 2 * H :])
        ds_prev = ds * act[:, 2 * H :]
    _tanh_backward_(da[:, :H], h, grad_input=da[:, :H])
    _sigmoid_backward_(da[:, H:], act[:, H:], grad_input=da[:, H:])
    return da, ds_prev


def lstm_gates_forward(act: Tensor, c_prev: Tensor) -> Tensor:
    H = c_prev.shape[1]
    act[:, : 2 * H].sigmoid_()
    act[:, 2 * H : 3 * H].tanh_()
    act[:, 3 * H :].sigmoid_()
    i, f, g, _ = act.chunk(4, dim=1)
    return torch.addcmul(f * c_prev, i, g)


def lstm_output_forward(act: Tensor, c_hat: Tensor) -> tuple[Tensor, Tensor]:
    tc = torch.tanh(c_hat)
    return act[:, 3 * c_hat.shape[1] :] * tc, tc


def lstm_output_backward(dh: Tensor, act: Tensor, tc: Tensor) -> Tensor:
    return torch.ops.aten.tanh_backward(dh * act[:, 3 * tc.shape[1] :], tc)


def lstm_gates_backward(dc: Tensor, dh: Tensor, act: Tensor, c_prev: Tensor, tc: Tensor) -> tuple[Tensor, Tensor]:
    H = c_prev.shape[1]
    i, f, g, o = act.chunk(4, dim=1)
    dgates = torch.empty_like(act)
    di, df, dg, do = dgates.chunk(4, dim=1)
    torch.mul(dc, g, out=di)
    torch.mul(dc, c_prev, out=df)
    torch.mul(dc, i, out=dg)
    torch.mul(dh, tc, out=do)
    _sigmoid_backward_(dgates[:, : 2 * H], act[:, : 2 * H], grad_input=dgates[:, : 2 * H])
    _tanh_backward_(dg, g, grad_input=dg)
    _sigmoid_backward_(do, o, grad_input=do)
    return dgates, dc * f
