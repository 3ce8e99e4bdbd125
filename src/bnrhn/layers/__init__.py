"""The building blocks that cells are made of, below the cells: recurrent (sequence) batch norm with
statistics per time step, and variational dropout masks. The runner (:mod:`bnrhn.nn`) sits above the cells."""

from bnrhn.layers.dropout import check_probability, variational_mask
from bnrhn.layers.seq_batchnorm import SequenceBatchNorm

__all__ = ["SequenceBatchNorm", "variational_mask", "check_probability"]
