"""No host synchronisation per time step: the recurrent step functions read no tensor back to the host
(``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``nonzero``) inside the time loop, where a GPU would
stall at every step. Counted on the CPU with a TorchFunctionMode: the number of reads must not grow with
the sequence length."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bnrhn.nn import Recurrent

HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"}


class CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _training_reads(rnn: Recurrent, T: int) -> int:
    torch.manual_seed(0)
    x = torch.randn(T, 5, 8)
    lengths = torch.tensor([T, T - 1, T - 2, 3, 2])  # padded: the packed runner
    rnn.train()
    with CountHostReads() as c:
        out, _ = rnn(x, lengths=lengths)
        out.sum().backward()
    return c.count


def _decoding_reads(rnn: Recurrent, T: int) -> int:
    x = torch.randn(T, 5, 8)
    rnn.eval()
    with CountHostReads() as c, torch.no_grad():
        state = None
        for t in range(T):
            _, state = rnn.step(x[t], state, t)
    return c.count


# every cell with its defaults; the batch-norm cells with each population estimator too
CASES = [(cell, {}) for cell in ("lstm", "gru", "rhn", "bn_rhn", "bn_lstm")] + [
    (cell, {"stats": stats}) for cell in ("bn_rhn", "bn_lstm") for stats in ("momentum", "cumulative")]


@pytest.mark.parametrize("cell,options", CASES, ids=[f"{c}-{o.get('stats', 'default')}" for c, o in CASES])
def test_no_host_read_per_time_step(cell, options):
    torch.manual_seed(0)
    rnn = Recurrent(cell, 8, 8, use_vendor_kernel=False, **options)  # the step loop, not PyTorch's kernel
    assert _training_reads(rnn, 6) == _training_reads(rnn, 12)
    _decoding_reads(rnn, 2)  # the host-side table of population slots is built once after training
    assert _decoding_reads(rnn, 6) == _decoding_reads(rnn, 12)


def test_the_counter_sees_a_read_per_step():
    """The counter is not blind: a loop that reads a value at every step is counted at every step."""
    x = torch.randn(12, 3)
    with CountHostReads() as short:
        for t in range(6):
            float(x[t].sum())
    with CountHostReads() as long:
        for t in range(12):
            x[t].sum().item()
    assert (short.count, long.count) == (6, 12)


def test_population_slot_lookup_follows_new_statistics():
    """The host-side table of eval slots is refreshed when the statistics change (state dict loaded, training)."""
    from bnrhn.nn import SequenceBatchNorm

    bn = SequenceBatchNorm(3, max_steps=6)
    bn.train()(torch.randn(2, 4, 3), step=0)  # slots 0 and 1 trained
    bn.eval()
    assert [bn._eval_slot(t) for t in range(6)] == [0, 1, 1, 1, 1, 1]
    other = SequenceBatchNorm(3, max_steps=6)
    other.train()(torch.randn(4, 4, 3), step=0)
    bn.load_state_dict(other.state_dict())
    assert [bn._eval_slot(t) for t in range(6)] == [0, 1, 2, 3, 3, 3]
    bn.train()(torch.randn(4, 3), step=5)
    bn.eval()
    assert bn._eval_slot(5) == 5
