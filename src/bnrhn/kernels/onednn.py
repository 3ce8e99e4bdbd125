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
bn_lstm, gru, 7 rounds), so the threshold stays at 384. MUT1–3's [H, H] products through oneDNN, forward alone, made
whole steps 0.98–1.04× as fast at 384 and 512; in both directions (ninth session, in-process, 9–11 rounds) MUT3's
1.08–1.09× at 384 and 512, MUT1's and MUT2's 1.01–1.06× at 512 and 1.00–1.03× at 384 (one series 0.89×, not
repeated in the next two).

Which library is faster depends on the processor: on this AMD part MKL runs its AVX2 ("zen") sgemm kernel while
oneDNN uses AVX-512; limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, the same silicon) oneDNN's products took
0.65–1.11× mm's time from hidden size 384 on, varying with the machine's load, and training steps at 384 were once
slower with it (RHN 0.87×, BN-RHN 0.94×; 1.05–1.18× faster in the next series); on an Intel processor MKL runs its
own AVX-512 kernels, unmeasured here. So the choice is made where the code runs: ``BNRHN_RECURRENT_PRODUCTS=auto``
(the default) times both libraries once per product shape, thread count and process (:func:`time_products`: seven
interleaved rounds, 5–20 ms per shape at hidden sizes 384–512, ~75 ms at 1024, at the first sequence of that shape
— a new batch size is a new shape) and takes oneDNN where the rule above allows it and it took at most ``MARGIN`` ×
mm's time. Near that margin two processes may choose differently; the trainer keeps the timings in its checkpoints,
so that a resumed run (and each rank of a data-parallel one, from rank 0's) makes the choices it trained with
(:func:`adopt`). ``onednn`` takes oneDNN wherever the rule allows, untimed (results then never depend on a timing);
``mm`` never. The timing is of the plain product; the loops' variants (the projection's rows added, the masked
backward) were not timed apart.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

MIN_HIDDEN = 384  # below, PyTorch's mm (whole training steps were slower with oneDNN at 128 and 256, faster from 384)
MARGIN = 0.9  # auto: oneDNN's product (with the copy into the loop's records) must take ≤ 0.9 × mm's, since each
# sequence also pays a reorder per weight that the timing leaves out (~1 ms at [2048, 512], 20 products of ~0.7 ms)
MODES = ("auto", "onednn", "mm")

_lock = threading.Lock()
_timed: dict[tuple[int, int, int, int], tuple[float, float]] = {}  # (rows, out, in, threads) → (mm µs, oneDNN µs)


def mode() -> str:
    """``BNRHN_RECURRENT_PRODUCTS``: "auto" (timed per product shape; the default), "onednn" or "mm"."""
    value = os.environ.get("BNRHN_RECURRENT_PRODUCTS", "auto").strip().lower()
    if value not in MODES:
        raise ValueError(f"BNRHN_RECURRENT_PRODUCTS must be one of {MODES}, got {value!r}")
    return value


def time_products(rows: int, out_features: int, in_features: int, rounds: int = 7) -> tuple[float, float]:
    """µs per product ``[rows, in] × [in, out]`` with PyTorch's mm into a preallocated output, and with oneDNN's
    inner product on the weight reordered plus the copy of its result (what a loop pays): the fastest of
    ``rounds`` interleaved rounds (the two libraries in alternating order), each over enough calls for ~100 MFLOP
    (at least one), after two calls of each. (Medians of five rounds of ~20 MFLOP put oneDNN at 0.74–1.22× mm's
    time for one shape in four processes on a busy machine; the fastest of seven rounds of 100 MFLOP at
    0.76–0.81×.) Constant inputs: the random number streams are left as they were."""
    with torch.no_grad():
        x = torch.full((rows, in_features), 0.5)
        weight = torch.full((out_features, in_features), 0.01)
        weight_t, out = weight.t(), torch.empty(rows, out_features)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        calls = max(1, round(1e8 / (2 * rows * in_features * out_features)))

        def by_mm() -> None:
            torch.mm(x, weight_t, out=out)

        def by_onednn() -> None:
            out.copy_(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], None))

        times: dict[Callable[[], None], list[float]] = {by_mm: [], by_onednn: []}
        for fn in times:  # first calls: oneDNN creates its primitive, MKL its buffers
            fn()
            fn()
        for k in range(rounds):
            for fn in (by_mm, by_onednn) if k % 2 == 0 else (by_onednn, by_mm):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[fn].append((time.perf_counter() - t0) / calls * 1e6)
    return min(times[by_mm]), min(times[by_onednn])


def faster_here(rows: int, out_features: int, in_features: int) -> bool:
    """Whether oneDNN's product of this shape beats mm by :data:`MARGIN` here, timed once per shape, thread count
    and process (:func:`time_products`)."""
    if rows == 0:  # an empty batch: nothing to multiply, nothing to time
        return False
    key = (rows, out_features, in_features, torch.get_num_threads())
    with _lock:
        if key not in _timed:
            try:
                _timed[key] = time_products(rows, out_features, in_features)
            except RuntimeError as exc:  # oneDNN refused the shape: mm it is, said once
                _timed[key] = (0.0, math.inf)
                print(f"bnrhn: oneDNN could not time [{rows}, {in_features}]×[{in_features}, {out_features}] "
                      f"({str(exc).splitlines()[0]}); those products use PyTorch's mm", file=sys.stderr)
        mm_us, onednn_us = _timed[key]
    return onednn_us <= MARGIN * mm_us


def timings() -> dict[tuple[int, int, int, int], tuple[float, float]]:
    """The timings made so far in this process: (rows, out, in, threads) → (mm µs, oneDNN µs)."""
    with _lock:
        return dict(_timed)


def saved_timings() -> list[list[float]]:
    """:func:`timings` as a checkpoint keeps them: ``[rows, out, in, threads, mm µs, oneDNN µs]`` each."""
    return [[*key, *value] for key, value in timings().items()]


def adopt(saved: Iterable[Sequence[float]]) -> None:
    """Take timings a checkpoint kept (:func:`saved_timings`) as this process's: a resumed run makes the choices
    it trained with (and every data-parallel rank, reading rank 0's checkpoint, makes rank 0's) instead of timing
    again and perhaps choosing the other library, whose float32 rounding differs. Shapes not among them (another
    batch or thread count) are timed as usual."""
    with _lock:
        for record in saved:
            rows, out_features, in_features, threads, mm_us, onednn_us = record
            _timed[(int(rows), int(out_features), int(in_features), int(threads))] = (float(mm_us), float(onednn_us))


def summary() -> str:
    """One line on the recurrent products' library: the setting, and each shape timed with its choice."""
    chosen = mode()
    if chosen != "auto" or not _timed:
        return f"recurrent products: BNRHN_RECURRENT_PRODUCTS={chosen}" + (", nothing timed yet" if chosen == "auto"
                                                                             else "")
    parts = [f"[{r}, {k}]×[{k}, {n}] {'oneDNN' if d <= MARGIN * m else 'mm'} ({m:.0f} µs mm, {d:.0f} µs oneDNN"
             f"{', ' + str(t) + ' threads' if t != torch.get_num_threads() else ''})"
             for (r, n, k, t), (m, d) in sorted(timings().items())]
    return "recurrent products timed here: " + "; ".join(parts)


def reset() -> None:
    """Forget the timings (tests)."""
    with _lock:
        _timed.clear()


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


def allowed(weight: Tensor) -> bool:
    """Whether the rule lets a loop's products with ``weight`` ([G·H, H]) go through oneDNN: float32 on the CPU,
    hidden size at least :data:`MIN_HIDDEN`, oneDNN present, ``BNRHN_RECURRENT_PRODUCTS`` not ``mm``."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.size(1) >= MIN_HIDDEN
            and mode() != "mm" and available())


def applies(weight: Tensor, rows: int, transposed: bool = False) -> bool:
    """Whether the products of ``rows`` states with ``weight`` (or, ``transposed``, of gradients with its
    transpose) go through oneDNN: :func:`allowed`, and with ``auto`` :func:`faster_here` for that shape."""
    if not allowed(weight):
        return False
    if mode() == "onednn":
        return True
    out_features, in_features = weight.shape if not transposed else weight.shape[::-1]
    return faster_here(rows, out_features, in_features)


def packed_transposed_weights(weights: Sequence[Tensor], batch: int) -> list[Tensor] | None:
    """Every weight's transpose reordered by oneDNN, for the backward's products ``d W``; None where
    :func:`applies` says no. Reordered once per backward, as the forward reorders the weights once per sequence."""
    return _reordered(weights, batch, transposed=True)


def packed_recurrent_weights(weights: Sequence[Tensor], batch: int) -> list[Tensor] | None:
    """Every weight reordered by oneDNN for products of ``batch`` rows, or None where :func:`applies` says no
    (the loop then uses PyTorch's mm). A reordered weight is a copy: pack again after each optimiser step."""
    return _reordered(weights, batch, transposed=False)


def _reordered(weights: Sequence[Tensor], batch: int, transposed: bool) -> list[Tensor] | None:
    if not weights or not all(applies(w, batch, transposed=transposed) for w in weights):
        return None
    with torch.no_grad():
        return [torch.ops.mkldnn._reorder_linear_weight((w.detach().t() if transposed else w.detach()).contiguous(),
                                                        batch) for w in weights]
