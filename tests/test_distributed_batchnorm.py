"""Synchronised SequenceBatchNorm over 2 gloo processes equals one process holding the concatenated batch."""

from __future__ import annotations

import pytest
import torch

from bnrhn.nn import SequenceBatchNorm
from dist_support import run_ranks

T, F = 4, 5
# rows of each rank and their valid lengths: rank 1 has no valid row at step 3, and fewer rows than rank 0
LENGTHS = ([4, 2, 1], [3, 3, 1, 1, 2])


def _data():
    g = torch.Generator().manual_seed(0)
    B = sum(len(l) for l in LENGTHS)
    x = torch.randn(T, B, F, generator=g, dtype=torch.float64) * 3 + 2
    r = torch.randn(T, B, F, generator=g, dtype=torch.float64)
    lengths = torch.tensor([n for part in LENGTHS for n in part])
    mask = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)
    return x, r, mask


def _module(stats: str, min_rows: int = 0) -> SequenceBatchNorm:
    torch.manual_seed(1)
    # renorm: a short warm-up, so that the second call's corrections are not the identity
    bn = SequenceBatchNorm(F, max_steps=8, stats=stats, min_rows=min_rows, renorm_warmup=1, renorm_rmax=1.5,
                           renorm_dmax=0.5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn.train()


def _rows(rank: int) -> slice:
    start = sum(len(l) for l in LENGTHS[:rank])
    return slice(start, start + len(LENGTHS[rank]))


def _run(bn, x, r, mask, rows):
    """Three training calls (the sequence path at step 0; again, on other values, so that the population
    statistics of the first enter: batch renormalization's corrections; the one-step path at step 5), a loss,
    its gradients."""
    x = x[:, rows].clone().requires_grad_(True)
    y0 = bn(x, step=0, mask=mask[:, rows])
    y1 = bn(x * 0.5 + 1.0, step=0, mask=mask[:, rows])
    y2 = bn(x[1], step=5, mask=mask[1, rows])
    loss = (y0 * r[:, rows]).sum() + (y1 * r[:, rows].flip(0)).sum() + (y2 * r[0, rows]).sum()
    loss.backward()
    return {"y0": y0.detach(), "y1": y1.detach(), "y2": y2.detach(), "dx": x.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "tracked": bn.num_batches_tracked.clone()}


# every configuration the tests compare, run in one pair of processes (their start-up paid once)
CONFIGS = [("momentum", 0, True), ("cumulative", 0, True), ("momentum", 3, True), ("renorm", 0, True),
           ("momentum", 0, False)]


def _worker(rank, world, folder):
    x, r, mask = _data()
    for stats, min_rows, synchronised in CONFIGS:
        bn = _module(stats, min_rows)
        if synchronised:
            bn.synchronize()
            assert bn.synchronized
        torch.save(_run(bn, x, r, mask, _rows(rank)), f"{folder}/{stats}-{min_rows}-{synchronised}-rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks(stats, min_rows, synchronised)``: what each of the 2 processes computed."""
    folder = tmp_path_factory.mktemp("sync-bn")
    run_ranks(_worker, 2, folder)
    return lambda stats, min_rows=0, synchronised=True: [
        torch.load(folder / f"{stats}-{min_rows}-{synchronised}-rank{k}.pt") for k in range(2)]


@pytest.mark.parametrize("stats,min_rows", [("momentum", 0), ("cumulative", 0), ("momentum", 3), ("renorm", 0)])
def test_synchronised_equals_one_process_on_the_concatenated_batch(ranks, stats, min_rows):
    x, r, mask = _data()
    ref = _run(_module(stats, min_rows), x, r, mask, slice(None))
    got_ranks = ranks(stats, min_rows)
    for k, got in enumerate(got_ranks):
        rows = _rows(k)
        torch.testing.assert_close(got["y0"], ref["y0"][:, rows], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["y1"], ref["y1"][:, rows], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["y2"], ref["y2"][rows], rtol=1e-10, atol=1e-10)
        # the synchronised moments are one-pass (shifted) sums, one process's are two-pass: at a step with 2
        # valid positions the input gradient (|dx| ~ 300 there) agrees to ~1e-9 relative in float64
        torch.testing.assert_close(got["dx"], ref["dx"][:, rows], rtol=1e-8, atol=1e-8)
        for name in ("running_mean", "running_var", "tracked"):  # identical on every rank
            torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-10)
    # parameter gradients: each rank's own share; data-parallel training sums (averages) them
    for name in ("dweight", "dbias"):
        torch.testing.assert_close(got_ranks[0][name] + got_ranks[1][name], ref[name], rtol=1e-10, atol=1e-10)


def test_local_statistics_differ_from_one_process(ranks):
    """Without synchronisation each rank normalises with its own rows: the comparison above can fail."""
    x, r, mask = _data()
    ref = _run(_module("momentum"), x, r, mask, slice(None))
    local = ranks("momentum", 0, False)
    assert not torch.allclose(local[0]["y0"], ref["y0"][:, _rows(0)], atol=1e-3)
    assert not torch.allclose(local[0]["running_mean"], local[1]["running_mean"], atol=1e-3)


def test_without_a_process_group_a_synchronised_module_is_local():
    bn = _module("momentum")
    bn.synchronize()
    assert not bn.synchronized  # no process group running: the ordinary (fused) paths
    x, r, mask = _data()
    torch.testing.assert_close(_run(bn, x, r, mask, slice(None))["y1"],
                               _run(_module("momentum"), x, r, mask, slice(None))["y1"])
    # updated as usual: twice per step, except step 3, which holds a single valid position
    assert bn.num_batches_tracked[:4].tolist() == [2, 2, 2, 0]
