"""The C++ loops' recurrent products through oneDNN, on weights it has reordered once per sequence (forward) and
once per backward.

Each forward step of a loop multiplies the state by a recurrent weight: ``[B, H] × [H, G·H]``, T·L times per
sequence with the same weight. PyTorch's ``mm`` hands float32 products to MKL's sgemm, which packs the weight
again on every call; oneDNN's inner product (``mkldnn::_linear_pointwise``, the op PyTorch's Inductor uses for
frozen linear layers) takes a weight reordered once (``mkldnn::_reorder_linear_weight``). On the 2-core AMD EPYC
(AVX-512) we develop on, interleaved timings with 2 threads: [64, 512] × [512, 1536] 482 against 963 µs,
[64, 512] × [512, 2048] 635 against 1,309, [64, 256] × [256, 1024] 185 against 394. In a training step the
oneDNN path also pays a copy of each result into the loop's records and one reorder per weight and sequence;
whole steps (B 64, T 20, both paths interleaved in one process) were 6–17% faster at hidden size 512 and 5–10%
at 384 (rhn, bn_rhn, bn_lstm; gru and rnn level at 384), but up to 13% slower at 256 and 5–20% at 128 — hence
:data:`MIN_HIDDEN`. Not measured on an Intel processor, where MKL is at its best (oneDNN is Intel's own library
there too, and ``torch.nn.LSTM`` uses it).

:func:`packed_recurrent_weights` (forward) and :func:`packed_transposed_weights` (backward: ``d W`` is an inner
product on Wᵀ) decide and pack; the loops take the packed weights as optional arguments (``packed=None``,
``packed_t=None``: PyTorch's mm). The backward's reordering costs a transposed copy per weight; whole steps with
it against forward-only oneDNN, interleaved, 9 rounds: rhn, bn_rhn, bn_rhn_tf 1.07/1.09/1.11× and 1.03/1.09/1.04×
at hidden size 512, 1.07/1.20/1.08× at 384 (an earlier series during heavy machine noise: 0.92–1.08×); bn_lstm, gru,
rnn 1.00–1.03× at 512 and 1.00–1.09× at 384. Both directions against mm at 256: 0.97–1.05× (rhn, bn_rhn,
bn_lstm, gru, 7 rounds), so the threshold stays at 384. MUT1–3 keep mm: their [H, H] products through oneDNN (forward) made
whole steps 0.98–1.04× as fast at 384 and 512.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

MIN_HIDDEN = 384  # below, PyTorch's mm (whole training steps were slower with oneDNN at 128 and 256, faster from 384)


def available() -> bool:
    """PyTorch was built with oneDNN, it is not switched off (``torch.backends.mkldnn.enabled``), and it registers
    the two ops the loops use."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):  # built, and not switched off
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight.default
        torch.ops.mkldnn._linear_pointwise.binary
    except (AttributeError, RuntimeError):
        return False
    return True


def applies(weight: Tensor) -> bool:
    """Whether a loop's products with ``weight`` ([G·H, H]) go through oneDNN: float32 on the CPU, hidden size
    at least :data:`MIN_HIDDEN`, oneDNN present."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.size(1) >= MIN_HIDDEN
            and available())


def packed_transposed_weights(weights: Sequence[Tensor], batch: int) -> list[Tensor] | None:
    """Every weight's transpose reordered by oneDNN, for the backward's products ``d W``; None where
    :func:`applies` says no. Reordered once per backward, as the forward reorders the weights once per sequence."""
    if not weights or not all(applies(w) for w in weights):
        return None
    with torch.no_grad():
        return [torch.ops.mkldnn._reorder_linear_weight(w.detach().t().contiguous(), batch) for w in weights]


def packed_recurrent_weights(weights: Sequence[Tensor], batch: int) -> list[Tensor] | None:
    """Every weight reordered by oneDNN for products of ``batch`` rows, or None where :func:`applies` says no
    (the loop then uses PyTorch's mm). A reordered weight is a copy: pack again after each optimiser step."""
    if not weights or not all(applies(w) for w in weights):
        return None
    with torch.no_grad():
        return [torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), batch) for w in weights]
