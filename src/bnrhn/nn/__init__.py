"""Building blocks shared by the models: recurrent batch norm, the runner, dropout masks."""

from bnrhn.nn.dropout import variational_mask
from bnrhn.nn.recurrent import DropoutMasks, Recurrent
from bnrhn.nn.seq_batchnorm import SequenceBatchNorm

__all__ = ["SequenceBatchNorm", "Recurrent", "DropoutMasks", "variational_mask"]
