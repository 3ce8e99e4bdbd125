"""The runner: stacks recurrent layers of any registered cell and owns time.

Whole sequences (training, teacher forcing)::

    rnn = Recurrent("bn_rhn", input_size=512, hidden_size=512, num_layers=1, depth=3)
    out, state = rnn(x, lengths=lengths)      # x: [T, B, I] (or [B, T, I] with batch_first=True)

One step at a time (decoding), with the same parameters and batch-norm conventions::

    state = rnn.init_state(B)
    for t in range(T):
        y, state = rnn.step(x[t], state, t)

For each layer the state-independent input term W x_t + b is computed for all T steps in one matrix
product (``cell.project_input``); only the recurrent term is computed inside the time loop. Padded
batches run as packed sequences: sorted by length, step t computes only the sequences still running,
so padded positions cost nothing, output zeros and stay out of batch-norm statistics, and the final
state of each sequence is the one at its own last step (as with packed sequences in ``torch.nn.LSTM``).

Layers of the cells whose equations are PyTorch's (LSTM, GRU, tanh RNN) run whole sequences through
``torch.nn.LSTM/GRU/RNN``'s kernels instead of the step loop when no recurrent dropout mask is in use
(:mod:`bnrhn.nn.vendor`); ``use_vendor_kernel=False`` keeps them on the cell's own paths. GRU and RNN
training on the CPU take the cell's C++ time loop instead where it can (measured faster than ``nn.GRU``'s and
``nn.RNN``'s, and it takes the recurrent-dropout mask); ``fused=False`` keeps PyTorch's kernel there (e.g. for
double backward or forward-mode AD, which the hand-written loops do not support).

The runner decides how every step may run and passes it to the cell (:class:`bnrhn.cells.StepMode`,
built by :meth:`Recurrent.step_mode` once per call): the fast paths unless ``fused=False`` or a
``torch.func`` transform is running, deferred weight gradients for the time loop of a sequence when
gradients are recorded, and in-place inference when they are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnrhn import kernels
from bnrhn.autodiff import plain_autograd
from bnrhn.cells import build_cell
from bnrhn.cells.base import State, StepMode, check_size
from bnrhn.cells.packed_rows import drop_finished, final_state, pack_order
from bnrhn.layers.dropout import check_probability, variational_mask
from bnrhn.nn.vendor import vendor_layer, vendor_usable


@dataclass
class DropoutMasks:
    """Per-sequence dropout masks for every layer: on its input, on its output and on h_{t−1}."""

    inputs: list[Tensor | None]
    outputs: list[Tensor | None]
    recurrent: list[Tensor | None]

    def rows(self, index) -> "DropoutMasks":
        """The masks of the sequences ``index`` (a slice or a ``[B']`` index tensor), in that order."""
        pick = lambda masks: [m[index] if m is not None else None for m in masks]  # noqa: E731
        return DropoutMasks(pick(self.inputs), pick(self.outputs), pick(self.recurrent))


class Recurrent(nn.Module):
    """A stack of ``num_layers`` recurrent layers built from the cell registered as ``cell``.

    Args:
        cell: registry name (see :data:`bnrhn.cells.CELLS`).
        input_size, hidden_size: sizes of x_t and h_t.
        num_layers: number of stacked layers (layer k > 0 reads layer k−1's output).
        input_dropout: variational dropout on the input of the first layer.
        dropout: variational dropout on the output of every layer.
        recurrent_dropout: variational dropout on h_{t−1} where it enters the recurrent product.
        batch_first: inputs and outputs are ``[B, T, ·]`` instead of ``[T, B, ·]``.
        use_vendor_kernel: let PyTorch's own kernel run whole sequences of the cells that have one
            (``lstm``, ``gru``, ``rnn``) when no recurrent dropout is in use (GRU and RNN training on the CPU
            prefer their own C++ loops, see above); False = the cells' own paths (the step loop, or that C++ loop).
        fused: let the cells take their fast paths (hand-written autograd nodes, fused CPU kernels,
            deferred weight gradients); False = every step is the composition of PyTorch operations, the
            plain equations (for tests and for ``torch.compile``; under ``no_grad`` the products still
            write into the runner's own projected inputs).
        **cell_options: passed to :func:`bnrhn.cells.build_cell` (e.g. ``depth=3``, ``norm="batch"``).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        input_dropout: float = 0.0,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        batch_first: bool = False,
        use_vendor_kernel: bool = True,
        fused: bool = True,
        **cell_options,
    ) -> None:
        super().__init__()
        check_size("num_layers", num_layers)
        self.cell_name = cell
        self.input_size = check_size("input_size", input_size)
        self.hidden_size = check_size("hidden_size", hidden_size)
        self.num_layers = num_layers
        self.input_dropout = check_probability("input_dropout", input_dropout)
        self.dropout = check_probability("dropout", dropout)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        self.batch_first = batch_first
        self.use_vendor_kernel = bool(use_vendor_kernel)
        self.fused = bool(fused)
        self.cells = nn.ModuleList(
            build_cell(cell, input_size if k == 0 else hidden_size, hidden_size, **cell_options)
            for k in range(num_layers)
        )

    def extra_repr(self) -> str:
        return (
            f"cell={self.cell_name!r}, num_layers={self.num_layers}, input_dropout={self.input_dropout}, "
            f"dropout={self.dropout}, recurrent_dropout={self.recurrent_dropout}, batch_first={self.batch_first}, "
            f"use_vendor_kernel={self.use_vendor_kernel}" + ("" if self.fused else ", fused=False")
        )

    def step_mode(self, sequence: bool) -> StepMode:
        """How the cells' steps may run in this call (see :class:`bnrhn.cells.StepMode`): fused unless
        ``fused=False`` or a ``torch.func`` transform is running (the hand-written nodes support ordinary
        autograd only); deferred weight-gradient taps (fresh, one set per layer) for the time loop of a
        whole ``sequence`` when gradients are recorded; inference, with the projected inputs as scratch,
        when they are not."""
        fused = self.fused and plain_autograd()
        grad = torch.is_grad_enabled()
        return StepMode(fused=fused, taps={} if fused and sequence and grad else None, inference=not grad)

    # ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> list[State]:
        """Zero states, one tuple per layer."""
        if device is None or dtype is None:
            p = next(self.parameters())
            device, dtype = device or p.device, dtype or p.dtype
        return [cell.init_state(batch_size, device, dtype) for cell in self.cells]

    def sample_dropout_masks(self, batch_size: int) -> DropoutMasks | None:
        """Fresh per-sequence masks (None in eval mode or when every dropout is 0)."""
        if not self.training or not (self.input_dropout or self.dropout or self.recurrent_dropout):
            return None
        like = next(self.parameters())
        H = self.hidden_size
        return DropoutMasks(
            inputs=[variational_mask(batch_size, self.input_size, self.input_dropout, like)]
            + [None] * (self.num_layers - 1),
            outputs=[variational_mask(batch_size, H, self.dropout, like) for _ in self.cells],
            recurrent=[variational_mask(batch_size, H, self.recurrent_dropout, like) for _ in self.cells],
        )

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        lengths: Tensor | list[int] | None = None,
        state: list[State] | None = None,
        step: int = 0,
    ) -> tuple[Tensor, list[State]]:
        """Run whole sequences.

        Args:
            x: ``[T, B, I]`` (``[B, T, I]`` if ``batch_first``).
            lengths: valid length of each sequence (≤ T); None = all T.
            state: initial state (list of per-layer tuples); None = zeros.
            step: time index of x's first step (for batch-norm statistics when continuing a sequence).

        Returns:
            outputs ``[T, B, H]`` (zeros at padded positions) and the final state of every layer, taken
            at each sequence's last valid step.
        """
        if self.batch_first:
            x = x.transpose(0, 1)
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"Recurrent expects input of shape [T, B, {self.input_size}]"
                f"{' (batch_first: [B, T, I])' if self.batch_first else ''} (input_size={self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        T, B, _ = x.shape
        if T == 0:
            raise ValueError(f"Recurrent needs at least one time step, got input of shape {tuple(x.shape)}")
        mask, full_steps = self._mask(lengths, T, B, x.device)
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        masks = self.sample_dropout_masks(B)
        if self._vendor_applies(x, masks):
            out, final = self._forward_vendor(x, mask.sum(0) if full_steps < T else None, state, masks)
        elif full_steps < T:
            out, final = self._forward_packed(x, mask, state, step, masks)
        else:
            out, final = self._forward_full(x, state, step, masks)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, final

    def _vendor_applies(self, x: Tensor, masks: DropoutMasks | None) -> bool:
        if not self.use_vendor_kernel:
            return False
        if self._own_training_loop_preferred(x):
            return False
        return all(
            vendor_usable(cell, masks.recurrent[k] if masks is not None else None, x) for k, cell in enumerate(self.cells)
        )

    def _own_training_loop_preferred(self, x: Tensor) -> bool:
        """Whether every layer trains through its own C++ time loop rather than PyTorch's kernel: cells that say
        they train faster that way (``trains_faster_than_torch_equivalent``: GRU, RNN, measured on the CPU), in a fused
        mode with gradients recorded, where the fused CPU kernels serve the input."""
        if not (self.fused and torch.is_grad_enabled() and plain_autograd()) or torch.is_autocast_enabled(x.device.type):
            return False
        if not all(getattr(type(cell), "trains_faster_than_torch_equivalent", False) for cell in self.cells):
            return False
        return kernels.loop_ops_for(x) is not None

    def _forward_vendor(self, x: Tensor, lengths: Tensor | None, state: list[State], masks: DropoutMasks | None):
        """Every layer through PyTorch's kernel; the variational masks on inputs and outputs are applied
        around each layer, as in the step loop."""
        final: list[State] = []
        layer_in = x
        for k, cell in enumerate(self.cells):
            if masks is not None and masks.inputs[k] is not None:
                layer_in = layer_in * masks.inputs[k]
            out, s = vendor_layer(cell, layer_in, state[k], lengths)
            if masks is not None and masks.outputs[k] is not None:
                out = out * masks.outputs[k]
            final.append(s)
            layer_in = out
        return layer_in, final

    def _forward_full(self, x: Tensor, state: list[State], step: int, masks: DropoutMasks | None):
        """Every sequence valid at every step."""
        final: list[State] = []
        layer_in = x
        for k, cell in enumerate(self.cells):
            if masks is not None and masks.inputs[k] is not None:
                layer_in = layer_in * masks.inputs[k]
            h_mask = masks.recurrent[k] if masks is not None else None
            xp = cell.project_input(layer_in, step, None)
            s = state[k]
            mode = self.step_mode(sequence=True)
            whole = cell.recur_sequence(xp, s, step, h_mask, mode)
            if whole is not None:
                out, s = whole
            else:
                outs = []
                for t, xp_t in enumerate(xp.unbind(0)):
                    s = cell.recur(xp_t, s, step + t, None, h_mask, mode=mode)
                    outs.append(s[0])
                out = torch.stack(outs)
            if masks is not None and masks.outputs[k] is not None:
                out = out * masks.outputs[k]
            final.append(s)
            layer_in = out
        return layer_in, final

    def _forward_packed(self, x: Tensor, mask: Tensor, state: list[State], step: int, masks: DropoutMasks | None):
        """Padded sequences, computed as packed sequences are (``torch.nn.utils.rnn.pack_padded_sequence``):
        the batch is sorted by length, and step t computes only the n_t sequences still running — the first
        n_t rows — as one full batch. Nothing is computed for padding, every step takes the cells' full-batch
        paths (the fused kernels included), and batch-norm statistics of step t are those of its n_t valid
        positions, as with the masked statistics. A sequence's final state is its state when it drops out;
        outputs at padded positions are zeros. Hand-written rather than PackedSequence because the cells
        are ours (PyTorch packs only for its own nn.RNN/LSTM/GRU)."""
        T, B, _ = x.shape
        order, inverse, active = pack_order(mask.t())  # n_t: n_0 = B (every length ≥ 1)
        sort = lambda t: t.index_select(0, order) if t is not None else None  # noqa: E731 (rows = sequences)
        layer_in = x.index_select(1, order)
        sorted_mask = mask.index_select(1, order)
        final: list[State] = []
        for k, cell in enumerate(self.cells):
            if masks is not None and masks.inputs[k] is not None:
                layer_in = layer_in * sort(masks.inputs[k])
            h_mask = sort(masks.recurrent[k]) if masks is not None else None
            xp = cell.project_input(layer_in, step, sorted_mask)
            s = tuple(sort(a) for a in state[k])
            mode = self.step_mode(sequence=True)
            whole = cell.recur_sequence(xp, s, step, h_mask, mode, active)
            if whole is not None:
                out, s = whole
            else:
                finished: list[State] = []  # the rows that dropped out, latest (lowest rows) last
                outs = []
                for t in range(T):
                    n = active[t]
                    s = drop_finished(s, n, finished)
                    s = cell.recur(xp[t, :n], s, step + t, None, h_mask[:n] if h_mask is not None else None,
                                   mode=mode)
                    outs.append(s[0] if n == B else torch.nn.functional.pad(s[0], (0, 0, 0, B - n)))
                out = torch.stack(outs)
                s = final_state(s, finished)
            if masks is not None and masks.outputs[k] is not None:
                out = out * sort(masks.outputs[k])
            final.append(tuple(a.index_select(0, inverse) for a in s))
            layer_in = out
        return layer_in.index_select(1, inverse), final

    def step(
        self,
        x: Tensor,
        state: list[State] | None,
        step: int,
        dropout_masks: DropoutMasks | None = None,
        mask: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, list[State]]:
        """One time step for every layer: ``x`` is ``[B, I]``; returns the top output ``[B, H]`` and the state.

        ``rows`` (``[B]`` long) says that ``x`` holds distinct inputs only and sequence b reads
        ``x[rows[b]]`` — e.g. the embeddings of the distinct words of a beam: in eval mode the first
        layer's input projection (row-wise there) is then computed once per distinct input.

        ``step`` is the time index (batch-norm cells pick their statistics with it). Dropout is applied
        only with ``dropout_masks`` (from :meth:`sample_dropout_masks`), so that a sequence keeps one
        mask over all of its steps.

        ``mask`` (``[B]`` bool, True = valid) does for one step what ``lengths`` does in
        :meth:`forward`: sequences whose mask is False keep their previous state, output zeros and stay
        out of batch-norm statistics. A loop of masked steps therefore equals ``forward`` with the
        matching lengths (training step by step, e.g. with attention, over padded batches).
        """
        if x.dim() != 2 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"Recurrent.step expects input of shape [B, {self.input_size}] (input_size={self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if rows is not None:
            rows = torch.as_tensor(rows, device=x.device)
            if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= x.shape[0])):
                raise ValueError(f"rows must be a 1-d index into the {x.shape[0]} rows of x, got {rows.tolist()[:8]}...")
            batch = rows.numel()
        if mask is not None:
            mask = torch.as_tensor(mask, device=x.device).bool()
            if mask.shape != (batch,):
                raise ValueError(f"mask must have one entry per sequence ({batch}), got shape {tuple(mask.shape)}")
            if bool(mask.all()):
                mask = None  # every sequence valid: same as no mask, and the fused batch-norm path applies
        projected = None
        if rows is not None:
            if self.training or dropout_masks is not None or mask is not None:
                x = x.index_select(0, rows)  # batch statistics and dropout masks are per sequence
            else:
                projected = self.cells[0].project_input(x, step).index_select(0, rows)
        if state is None:
            state = self.init_state(batch, x.device, x.dtype)
        new_state = []
        h = x
        mode = self.step_mode(sequence=False)
        for k, cell in enumerate(self.cells):
            if dropout_masks is not None and dropout_masks.inputs[k] is not None:
                h = h * dropout_masks.inputs[k]
            h_mask = dropout_masks.recurrent[k] if dropout_masks is not None else None
            xp = projected if k == 0 and projected is not None else cell.project_input(h, step, mask)
            projected = None
            s = cell.recur(xp, state[k], step, mask, h_mask, mode=mode)
            if mask is not None:
                keep = mask.unsqueeze(1)
                s = tuple(torch.where(keep, a, b) for a, b in zip(s, state[k]))
            new_state.append(s)
            h = s[0]
            if mask is not None:
                h = h * mask.unsqueeze(1).to(h.dtype)
            if dropout_masks is not None and dropout_masks.outputs[k] is not None:
                h = h * dropout_masks.outputs[k]
        return h, new_state

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        """Forward matrix-product FLOPs of all layers for ``steps`` steps of ``batch_size`` sequences."""
        return sum(cell.matmul_flops(batch_size, steps) for cell in self.cells)

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _mask(lengths, T: int, B: int, device) -> tuple[Tensor | None, int]:
        """([T, B] bool mask or None, number of leading steps where every sequence is valid)."""
        if lengths is None:
            return None, T
        lengths = torch.as_tensor(lengths, device=device)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have one entry per sequence ({B}), got shape {tuple(lengths.shape)}")
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must be in [1, T={T}], got min {int(lengths.min())}, max {int(lengths.max())}")
        mask = torch.arange(T, device=device).unsqueeze(1) < lengths.unsqueeze(0)
        return mask, int(lengths.min()) if lengths.numel() else T
