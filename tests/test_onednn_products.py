"""The C++ loops' recurrent products (forward and backward) through oneDNN on reordered weights
(bnrhn/kernels/onednn.py): the same results as PyTorch's mm path, taken exactly where the rule says."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from bnrhn import kernels
from bnrhn.kernels import onednn
from bnrhn.nn import Recurrent

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch was built without oneDNN")


@pytest.fixture
def loops(monkeypatch):
    """The fused kernels and C++ loops forced on (skips, saying why, where they cannot be built)."""
    why = kernels.compiler_missing()
    if why:
        pytest.skip(f"the C++ loops cannot be built here: {why}")
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "on")
    kernels.reset()
    yield
    kernels.reset()


CASES = [  # every way the loops form a product: + the projection's rows (one chunk: contiguous; a chunk
    # per layer: strided), + the bias, the product alone; with and without batch norm, renormalization and masks
    ("rhn", {}),
    ("rhn", {"carry": "free", "input_at": "every"}),
    ("bn_rhn", {}),
    ("bn_rhn", {"normalize": ""}),
    ("bn_rhn", {"stats": "momentum", "input_at": "every"}),
    ("bn_rhn_tf", {}),
    ("bn_lstm", {}),
    ("bn_lstm", {"stats": "momentum", "carry_norm": "recurrence"}),
    ("gru", {}),  # the recurrent bias in the product
    ("rnn", {}),
    ("rhn", {"recurrent_dropout": 0.0}),  # no mask: the backward adds the product as it is
    ("gru", {"recurrent_dropout": 0.0}),
]


def _calls_onednn(prof) -> bool:
    return any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())


def _products_through_onednn(model, x, lengths) -> tuple[list[torch.Tensor], tuple[bool, bool]]:
    """Forward and backward of a loss on every output; whether each of the two called oneDNN's inner product."""
    torch.manual_seed(3)  # the same dropout masks on both paths
    with profile() as forward:
        out, final = model(x, lengths=lengths)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss = loss + sum(t.square().sum() for state in final for t in state)
    with profile() as backward:
        grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return [out, *[t for state in final for t in state], *grads], (_calls_onednn(forward), _calls_onednn(backward))


@needs_onednn
@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("lengths", [None, (7, 4, 6, 7)], ids=["full", "packed"])
def test_onednn_products_equal_the_mm_path(name, opts, lengths, loops, monkeypatch):
    torch.manual_seed(0)
    extra = {"depth": 3} if "rhn" in name else {}
    model = Recurrent(name, 5, 24, num_layers=2, **{"recurrent_dropout": 0.25, **extra, **opts})
    x = torch.randn(7, 4, 5, requires_grad=True)
    lengths = torch.tensor(lengths) if lengths is not None else None
    with torch.no_grad():  # population statistics to renormalise against
        model(torch.randn(7, 4, 5) * 2 + 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(onednn, "MIN_HIDDEN", 10**9)
    by_mm, used = _products_through_onednn(model, x, lengths)
    assert used == (False, False)
    model.load_state_dict(state)  # the same statistics again
    monkeypatch.setattr(onednn, "MIN_HIDDEN", 24)
    by_onednn, used = _products_through_onednn(model, x, lengths)
    assert used == (True, True)  # forward and backward
    for a, b in zip(by_mm, by_onednn, strict=True):  # float32 rounding, which batch norm over 3–4 rows amplifies
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape and float((a - b).norm()) <= 1e-4 * float(a.norm())


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's, on switching the flags
def test_the_rule_packs_float32_cpu_weights_from_the_threshold_on(monkeypatch):
    at = onednn.MIN_HIDDEN
    assert onednn.packed_recurrent_weights([torch.randn(3 * (at - 1), at - 1)], 64) is None  # too small
    assert onednn.packed_recurrent_weights([torch.randn(3 * at, at, dtype=torch.float64)], 64) is None
    assert onednn.packed_recurrent_weights([], 64) is None
    if onednn.available():
        w = torch.randn(3 * at, at, requires_grad=True)
        packed = onednn.packed_recurrent_weights([w, w.detach()], 64)
        assert packed is not None and len(packed) == 2 and not packed[0].requires_grad
        h = torch.randn(64, at)
        y = torch.ops.mkldnn._linear_pointwise(h, packed[0], None, "none", [], "")
        torch.testing.assert_close(y, h @ w.detach().t(), rtol=1e-5, atol=1e-4)
    with torch.backends.mkldnn.flags(enabled=False):  # the user switched oneDNN off
        assert onednn.packed_recurrent_weights([torch.randn(3 * at, at)], 64) is None
    monkeypatch.setattr(onednn, "available", lambda: False)  # a PyTorch without oneDNN
    assert onednn.packed_recurrent_weights([torch.randn(3 * at, at)], 64) is None


@needs_onednn
def test_the_loops_check_the_packed_weights(loops):
    ops = kernels.loop_ops_for(torch.zeros(1))
    T, B, H = 3, 4, 8
    xp, s0 = torch.randn(T, B, 3 * H), torch.randn(B, H)
    w, b, g = torch.randn(3 * H, H), torch.randn(3 * H), torch.ones(H)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, B)]
    args = dict(reads_input=[1], bias_in_product=[0], normed=[], eps=1e-5, active=[], renorm=None, layer_norm=False)
    with pytest.raises(RuntimeError, match="expected 1 packed weights, got 2"):
        ops.highway_sequence_forward(xp, s0, None, [w], [b], [], packed=packed * 2, **args)
    with pytest.raises(RuntimeError, match=r"packed weight 0 has shape \[24, 4\], the weight \[24, 8\]"):
        ops.highway_sequence_forward(xp, s0, None, [w], [b], [], **args,
                                     packed=[torch.ops.mkldnn._reorder_linear_weight(torch.randn(3 * H, 4), B)])
    with pytest.raises(RuntimeError, match="float32 tensors only"):
        ops.highway_sequence_forward(xp.double(), s0.double(), None, [w.double()], [b.double()], [],
                                     packed=packed, **args)
    plain = ops.highway_sequence_forward(xp, s0, None, [w], [b], [], **args)
    through_onednn = ops.highway_sequence_forward(xp, s0, None, [w], [b], [], packed=packed, **args)
    torch.testing.assert_close(plain[0], through_onednn[0])
    # the backward's products take the transpose, reordered: checked against it
    out, _, *records = ops.gru_sequence_forward(xp, s0, None, w, None, [])
    with pytest.raises(RuntimeError, match=r"packed transposed weight 0 has shape \[24, 8\], the transposed weight "
                                           r"\[8, 24\]"):
        ops.gru_sequence_backward(torch.ones_like(out), None, T, B, None, w, records, [], True, packed_t=packed)
