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
def loops(loop_ops, monkeypatch):
    """The fused kernels and C++ loops forced on (conftest's loop_ops), oneDNN's products wherever the rule allows."""
    monkeypatch.setenv("BNRHN_RECURRENT_PRODUCTS", "onednn")  # the rule alone, untimed (the timing has its tests)
    yield


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
    ("mut1", {}),  # the projection's rows (strided) added to each of W_hr's and W_hh's products
    ("mut2", {}),  # W_hz's product, added into ∂L/∂h_in in the backward
    ("mut3", {"recurrent_dropout": 0.0}),  # W_hz on tanh(h_in): the backward's product into scratch
]


def _onednn_calls(prof) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


PRODUCTS_PER_STEP = {"mut1": 2, "mut2": 2, "mut3": 3}  # per layer, step and direction: W_hr/W_hz, W_hh


def _products_through_onednn(model, x, lengths) -> tuple[list[torch.Tensor], tuple[bool, bool]]:
    """Forward and backward of a loss on every output; whether each of the two called oneDNN's inner product."""
    torch.manual_seed(3)  # the same dropout masks on both paths
    with profile() as forward:
        out, final = model(x, lengths=lengths)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss = loss + sum(t.square().sum() for state in final for t in state)
    with profile() as backward:
        grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return [out, *[t for state in final for t in state], *grads], (_onednn_calls(forward), _onednn_calls(backward))


@needs_onednn
@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("lengths", [None, (7, 4, 6, 7), (7, 4, 6, 5)], ids=["full", "packed", "one-row-step"])
def test_onednn_products_equal_the_mm_path(name, opts, lengths, loops, monkeypatch):
    torch.manual_seed(0)
    extra = {"depth": 3} if "rhn" in name else {}
    if lengths == (7, 4, 6, 5) and name in ("bn_rhn", "bn_lstm") and opts.get("normalize") != "":
        pytest.skip("a step of one row has no batch statistics: batch-normalised cells leave the C++ loop for it")
    inputs = 24 if name.startswith("mut") else 5  # MUT1 adds x_t to hidden-sized vectors
    model = Recurrent(name, inputs, 24, num_layers=2, **{"recurrent_dropout": 0.25, **extra, **opts})
    x = torch.randn(7, 4, inputs, requires_grad=True)
    lengths = torch.tensor(lengths) if lengths is not None else None
    with torch.no_grad():  # population statistics to renormalise against
        model(torch.randn(7, 4, inputs) * 2 + 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(onednn, "MIN_HIDDEN", 10**9)
    by_mm, calls = _products_through_onednn(model, x, lengths)
    assert calls == (0, 0)
    model.load_state_dict(state)  # the same statistics again
    monkeypatch.setattr(onednn, "MIN_HIDDEN", 24)
    by_onednn, calls = _products_through_onednn(model, x, lengths)
    assert calls[0] > 0 and calls[1] > 0  # forward and backward
    if name in PRODUCTS_PER_STEP:  # every product of every step and layer, each direction
        assert calls == (7 * 2 * PRODUCTS_PER_STEP[name],) * 2
    for a, b in zip(by_mm, by_onednn, strict=True):  # float32 rounding, which batch norm over 3–4 rows amplifies
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape and float((a - b).norm()) <= 1e-4 * float(a.norm())


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's, on switching the flags
def test_the_rule_packs_float32_cpu_weights_from_the_threshold_on(monkeypatch):
    monkeypatch.setenv("BNRHN_RECURRENT_PRODUCTS", "onednn")  # the rule alone, untimed
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
    h24 = torch.randn(B, 24)  # MUT1 takes W_hr and W_hh: two packed weights, not three
    w_h = torch.randn(24, 24)
    with pytest.raises(RuntimeError, match="expected 2 packed weights, got 3"):
        ops.mut_sequence_forward(1, torch.randn(T, B, 72), h24, None, None, w_h, w_h, [],
                                 packed=[torch.ops.mkldnn._reorder_linear_weight(w_h, B)] * 3)
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


@pytest.fixture
def fake_timings(monkeypatch):
    """``time_products`` replaced: each call recorded, answering (mm µs, oneDNN µs) from ``answer``."""
    calls, answer = [], {"us": (100.0, 80.0)}

    def timed(rows, out_features, in_features):
        calls.append((rows, out_features, in_features))
        return answer["us"]

    monkeypatch.setattr(onednn, "time_products", timed)
    monkeypatch.delenv("BNRHN_RECURRENT_PRODUCTS", raising=False)
    onednn.reset()
    yield calls, answer
    onednn.reset()


def test_auto_times_each_product_shape_once_and_wants_the_margin(fake_timings, monkeypatch):
    calls, answer = fake_timings
    assert onednn.mode() == "auto"
    assert onednn.faster_here(64, 2048, 512)  # 80 ≤ 0.9 × 100
    assert onednn.faster_here(64, 2048, 512)
    assert calls == [(64, 2048, 512)]  # cached
    answer["us"] = (100.0, 90.0)  # exactly the margin
    assert onednn.faster_here(16, 2048, 512)
    answer["us"] = (100.0, 95.0)  # faster, but not by the margin
    assert not onednn.faster_here(32, 2048, 512)  # another batch: another shape, timed
    assert calls == [(64, 2048, 512), (16, 2048, 512), (32, 2048, 512)]
    assert not onednn.faster_here(0, 2048, 512) and len(calls) == 3  # an empty batch: nothing to time
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)  # another thread count: timed again
    assert not onednn.faster_here(64, 2048, 512)
    assert len(calls) == 4 and len(onednn.timings()) == 4
    assert "[64, 512]×[512, 2048] oneDNN (100 µs mm, 80 µs oneDNN" in onednn.summary()
    assert "[32, 512]×[512, 2048] mm (100 µs mm, 95 µs oneDNN" in onednn.summary()


@needs_onednn
def test_the_setting_decides_whether_to_time(fake_timings, monkeypatch):
    calls, answer = fake_timings
    w = torch.randn(2 * onednn.MIN_HIDDEN, onednn.MIN_HIDDEN)
    answer["us"] = (100.0, 200.0)  # oneDNN slower here
    assert onednn.packed_recurrent_weights([w], 16) is None
    assert onednn.packed_transposed_weights([w], 16) is None
    assert calls == [(16, *w.shape), (16, *reversed(w.shape))]  # the backward's product is on Wᵀ
    monkeypatch.setenv("BNRHN_RECURRENT_PRODUCTS", "onednn")  # the rule alone: no timing
    assert onednn.packed_recurrent_weights([w], 8) is not None
    assert onednn.packed_transposed_weights([w], 8) is not None
    monkeypatch.setenv("BNRHN_RECURRENT_PRODUCTS", "mm")
    assert onednn.packed_recurrent_weights([w], 8) is None and not onednn.allowed(w)
    assert len(calls) == 2
    assert onednn.summary() == "recurrent products: BNRHN_RECURRENT_PRODUCTS=mm"
    monkeypatch.setenv("BNRHN_RECURRENT_PRODUCTS", "fast")
    with pytest.raises(ValueError, match="BNRHN_RECURRENT_PRODUCTS must be one of"):
        onednn.mode()


@needs_onednn
def test_a_loop_takes_what_the_timing_chose(loops, fake_timings, monkeypatch):
    calls, answer = fake_timings
    monkeypatch.setattr(onednn, "MIN_HIDDEN", 24)
    torch.manual_seed(0)
    model = Recurrent("bn_rhn", 5, 24, depth=2)
    x = torch.randn(7, 4, 5, requires_grad=True)
    answer["us"] = (100.0, 150.0)
    assert _products_through_onednn(model, x, None)[1] == (0, 0)
    assert set(calls) == {(4, 72, 24), (4, 24, 72)}  # [h, t, c] gates of 24 units, and the backward's transpose
    onednn.reset()
    answer["us"] = (100.0, 50.0)
    assert all(_products_through_onednn(model, x, None)[1])
    empty = torch.randn(7, 0, 5, requires_grad=True)  # an empty batch trains (and times nothing)
    out, _ = model(empty)
    out.sum().backward()
    assert out.shape == (7, 0, 24) and empty.grad.shape == empty.shape and all(rows > 0 for rows, *_ in calls)


def test_timings_saved_and_adopted(fake_timings):
    calls, _ = fake_timings
    onednn.faster_here(64, 2048, 512)
    saved = onednn.saved_timings()
    assert saved == [[64, 2048, 512, torch.get_num_threads(), 100.0, 80.0]]
    onednn.reset()
    onednn.adopt([[64, 2048, 512, torch.get_num_threads(), 100.0, 120.0]])  # a run that had chosen mm
    assert not onednn.faster_here(64, 2048, 512) and len(calls) == 1  # adopted, not timed again


@needs_onednn
def test_the_timing_is_real_and_leaves_the_random_streams_alone():
    state = torch.get_rng_state()
    by_mm, by_onednn = onednn.time_products(8, 48, 16, rounds=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert 0 < by_mm < 1e5 and 0 < by_onednn < 1e5


@needs_onednn
def test_a_training_log_ends_with_the_choice(loops, fake_timings, monkeypatch, tmp_path):
    from bnrhn.lm.train import LMTrainConfig, train_char_lm

    monkeypatch.setattr(onednn, "MIN_HIDDEN", 16)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    cfg = LMTrainConfig(run_dir=str(tmp_path / "run"), text=str(text), cell="rhn", hidden=16, embed=8,
                        batch_size=4, seq_len=10, max_steps=2, valid_fraction=0.1, test_fraction=0.0, progress=False)
    lines: list[str] = []
    train_char_lm(cfg, log=lines.append)
    assert lines[-1] == ("model: recurrent products timed here: [4, 32]×[32, 16] oneDNN (100 µs mm, 80 µs oneDNN); "
                         "[4, 16]×[16, 32] oneDNN (100 µs mm, 80 µs oneDNN)"), lines  # the backward's, the forward's


def test_a_mistyped_setting_stops_training_before_it_starts(monkeypatch, tmp_path, capsys):
    from bnrhn.cli import main

    monkeypatch.setenv("BNRHN_RECURRENT_PRODUCTS", "fast")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    rc = main(["lm", "train", "--text", str(text), "--cell", "rnn", "--hidden", "8", "--embed", "4", "--batch-size", "4",
               "--seq-len", "10", "--max-steps", "2", "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert rc != 0
    assert "BNRHN_RECURRENT_PRODUCTS must be one of ('auto', 'onednn', 'mm'), got 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_shape_onednn_cannot_time_keeps_mm(monkeypatch, capsys):
    def refused(rows, out_features, in_features):
        raise RuntimeError("could not create a primitive descriptor\nmore lines")

    monkeypatch.setattr(onednn, "time_products", refused)
    onednn.reset()
    try:
        assert not onednn.faster_here(8, 48, 16) and not onednn.faster_here(8, 48, 16)
        err = capsys.readouterr().err
        assert err.count("oneDNN could not time [8, 16]×[16, 48] (could not create a primitive descriptor)") == 1
        assert "[8, 16]×[16, 48] mm" in onednn.summary()
    finally:
        onednn.reset()
