"""The runner of recurrent layers (:class:`Recurrent`: whole sequences, padded batches, step-by-step
decoding, PyTorch's kernels for the cells that are PyTorch's); re-exports the building blocks of
:mod:`bnrhn.layers` that callers use beside it."""

from bnrhn.layers import SequenceBatchNorm, variational_mask
from bnrhn.nn.recurrent import DropoutMasks, Recurrent

__all__ = ["SequenceBatchNorm", "Recurrent", "DropoutMasks", "variational_mask"]
