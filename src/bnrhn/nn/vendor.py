"""Whole-sequence layers of the cells whose equations are PyTorch's own, run by PyTorch's kernels.

:class:`~bnrhn.cells.LSTMCell`, :class:`~bnrhn.cells.GRUCell` and :class:`~bnrhn.cells.RNNCell` compute
exactly what ``torch.nn.LSTM``, ``torch.nn.GRU`` and ``torch.nn.RNN`` (tanh) compute, with the same
parameter names, shapes and gate order. When nothing per-step is in use (no recurrent dropout mask on
h_{t−1}), a layer of one of them is one call of the PyTorch module with our parameters, so that the
library's kernel does the time loop: oneDNN's fused LSTM on CPU, cuDNN on CUDA, ATen's C++ loop
otherwise. Padded batches go in as a ``PackedSequence``, which gives the same semantics as the
runner's packed path: padded positions output zeros, and each sequence's final state is the one at its
own last step.

Each cell keeps its own parameterless template of the PyTorch module on the ``meta`` device;
``torch.func.functional_call`` runs it with the cell's parameters, so gradients reach the cell's own
tensors and nothing is copied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnrhn.autodiff import plain_autograd
from bnrhn.cells.base import RecurrentCell, State


def has_vendor_kernel(cell: RecurrentCell) -> bool:
    """True when the cell's class names a PyTorch module with its equations (``torch_equivalent``)."""
    return type(cell).torch_equivalent is not None


def vendor_usable(cell: RecurrentCell, h_mask: Tensor | None, x: Tensor) -> bool:
    """Whether :func:`vendor_layer` computes what the cell's step loop would for this call.

    Not with a recurrent dropout mask (PyTorch's kernels have no mask on h_{t−1}) and not inside a
    ``torch.func`` transform (the step loop is written for those); float types only; not under float16
    autocast on the CPU (oneDNN has no float16 LSTM primitive: "could not create a primitive descriptor")."""
    cpu_half = (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.float16)
    return has_vendor_kernel(cell) and h_mask is None and plain_autograd() and x.is_floating_point() and not cpu_half


def _template(cell: RecurrentCell) -> nn.RNNBase:
    """The cell's own parameterless PyTorch module (on the ``meta`` device; functional_call supplies every
    parameter). One per cell, not one per shape: functional_call swaps the parameters into the module for
    the call, so a module shared by two models could hand one model's weights to a call of the other from
    another thread, and would keep the last caller's weights alive after that model is gone."""
    module = cell.__dict__.get("_vendor_template")
    if module is None:
        module = type(cell).torch_equivalent(cell.input_size, cell.hidden_size, num_layers=1,
                                             bias=cell.bias_ih is not None, device="meta")
        object.__setattr__(cell, "_vendor_template", module)  # not a submodule: no parameters, no state_dict
    return module


def vendor_layer(cell: RecurrentCell, x: Tensor, state: State, lengths: Tensor | None) -> tuple[Tensor, State]:
    """One layer over a whole sequence with PyTorch's kernel.

    Args:
        cell: a cell with ``torch_equivalent`` (see :func:`has_vendor_kernel`).
        x: ``[T, B, I]`` layer input.
        state: the cell's initial state, a tuple of ``[B, H]`` tensors (``(h,)`` or ``(h, c)``).
        lengths: ``[B]`` valid lengths, or None when every sequence has all T steps.

    Returns:
        outputs ``[T, B, H]`` (zeros at padded positions) and the final state, each sequence's at its
        own last valid step.
    """
    bias = cell.bias_ih is not None
    module = _template(cell)
    params = {"weight_ih_l0": cell.weight_ih, "weight_hh_l0": cell.weight_hh}
    if bias:
        params.update(bias_ih_l0=cell.bias_ih, bias_hh_l0=cell.bias_hh)
    hx = tuple(s.unsqueeze(0) for s in state)
    hx = hx if len(hx) > 1 else hx[0]
    T = x.shape[0]
    if lengths is None:
        out, final = functional_call(module, params, (x, hx))
    else:
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        out, final = functional_call(module, params, (packed, hx))
        out, _ = pad_packed_sequence(out, total_length=T)
    final = tuple(s.squeeze(0) for s in final) if isinstance(final, tuple) else (final.squeeze(0),)
    return out, final

