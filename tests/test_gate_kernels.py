"""The fused CPU gate kernels (bnrhn.kernels) against float64 PyTorch and the step equations written out here,
the run-time choice, and the fallback where no compiler is found."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from bnrhn import kernels
from bnrhn.models.captioner import CaptionerConfig, build_captioner
from bnrhn.nn import Recurrent

needs_compiler = pytest.mark.skipif(kernels.compiler_missing() is not None,
                                    reason=f"the kernels cannot be built here: {kernels.compiler_missing()}")


@pytest.fixture
def ops(monkeypatch):
    if kernels.compiler_missing():
        pytest.skip(f"the kernels cannot be built here: {kernels.compiler_missing()}")
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "on")
    kernels.reset()
    found = kernels.ops_for(torch.zeros(1))
    assert found is not None, kernels.status()
    yield found
    kernels.reset()


def _wide_range():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.linspace(-40, 40, 100_001), torch.logspace(-12, 1.5, 20_000),
                      -torch.logspace(-12, 1.5, 20_000), torch.randn(10_000, generator=g) * 3,
                      torch.tensor([0.0, 0.25, -0.25, 0.2499999, 88.0, -88.0, 1e30, -1e30])])


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_float32_activations_are_within_a_few_ulp_of_float64(ops, name):
    x = _wide_range()
    got = getattr(ops, name)(x).double()
    ref = getattr(torch, name)(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((got - ref).abs() / ulp).max() <= 8  # measured: 3.6 (tanh), 2.3 (sigmoid); PyTorch's own: 0.5, 1.2
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out = getattr(ops, name)(special)
    assert torch.isnan(out[0]) and out[1] == 1 and out[2] == (-1 if name == "tanh" else 0)


def test_float64_activations_equal_pytorch(ops):
    x = _wide_range().double()
    assert torch.allclose(ops.tanh(x), torch.tanh(x), rtol=1e-15, atol=1e-300)
    assert torch.allclose(ops.sigmoid(x), torch.sigmoid(x), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("H", [1, 7, 33])  # below, at and past a vector's width (tails)
def test_highway_kernels_compute_the_layer_equations(ops, G, H):
    g = torch.Generator().manual_seed(G * 100 + H)
    B = 5
    p = torch.randn(B, G * H, dtype=torch.float64, generator=g) * 2
    s = torch.randn(B, H, dtype=torch.float64, generator=g)
    ds = torch.randn(B, H, dtype=torch.float64, generator=g)
    h, t = torch.tanh(p[:, :H]), torch.sigmoid(p[:, H : 2 * H])
    c = 1 - t if G == 2 else torch.sigmoid(p[:, 2 * H :])
    act = p.clone()
    s_new = ops.highway_forward(act, s, G)
    assert torch.allclose(s_new, h * t + s * c, atol=1e-14, rtol=0)
    assert torch.allclose(act, torch.cat([h, t] + ([] if G == 2 else [c]), 1), atol=1e-15, rtol=0)
    dp, ds_prev = ops.highway_backward(ds, act, s, G)
    dh, dt = ds * t, ds * (h - s if G == 2 else h)  # ∂s_l/∂t is h − s with c = 1 − t, else h
    expected = [dh * (1 - h**2), dt * t * (1 - t)] + ([] if G == 2 else [ds * s * c * (1 - c)])
    assert torch.allclose(dp, torch.cat(expected, 1), atol=1e-14, rtol=0)
    assert torch.allclose(ds_prev, ds * c, atol=1e-14, rtol=0)


@pytest.mark.parametrize("H", [3, 17])
def test_lstm_kernels_compute_the_cell_equations(ops, H):
    g = torch.Generator().manual_seed(H)
    B = 4
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g)  # noqa: E731
    p, c_prev, c_hat, dh, dc = r(B, 4 * H) * 2, r(B, H), r(B, H), r(B, H), r(B, H)
    i, f, gg, o = torch.sigmoid(p[:, :H]), torch.sigmoid(p[:, H : 2 * H]), torch.tanh(p[:, 2 * H : 3 * H]), torch.sigmoid(p[:, 3 * H :])
    act = p.clone()
    c = ops.lstm_gates_forward(act, c_prev)
    assert torch.allclose(c, f * c_prev + i * gg, atol=1e-14, rtol=0)
    h, tc = ops.lstm_output_forward(act, c_hat)
    assert torch.allclose(tc, torch.tanh(c_hat), atol=1e-15, rtol=0) and torch.allclose(h, o * torch.tanh(c_hat), atol=1e-15)
    assert torch.allclose(ops.lstm_output_backward(dh, act, tc), dh * o * (1 - tc**2), atol=1e-14, rtol=0)
    dgates, dc_prev = ops.lstm_gates_backward(dc, dh, act, c_prev, tc)
    expected = torch.cat([dc * gg * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - gg**2), dh * tc * o * (1 - o)], 1)
    assert torch.allclose(dgates, expected, atol=1e-14, rtol=0)
    assert torch.allclose(dc_prev, dc * f, atol=1e-14, rtol=0)


def test_a_nan_pre_activation_reaches_the_state(ops):
    """Divergence detection needs NaN to propagate (the float32 activations are built from exp_u20, whose
    integer conversion would turn NaN into a finite number without an explicit check)."""
    act = torch.zeros(2, 3 * 16)
    act[0, 5] = float("nan")  # h of row 0
    act[1, 16 + 9] = float("nan")  # t of row 1
    s_new = ops.highway_forward(act, torch.zeros(2, 16), 3)
    assert torch.isnan(s_new[0, 5]) and torch.isnan(s_new[1, 9]) and torch.isfinite(s_new).sum() == 30


@pytest.mark.parametrize("name,opts", [("rhn", {}), ("rhn", {"carry": "free", "input_at": "every"}),
                                       ("bn_rhn", {}), ("bn_rhn", {"normalize": "h,t", "carry": "coupled"})])
def test_inference_with_the_kernels_equals_the_composition(name, opts, monkeypatch):
    if kernels.compiler_missing():
        pytest.skip(f"the kernels cannot be built here: {kernels.compiler_missing()}")
    torch.manual_seed(0)
    rnn = Recurrent(name, 5, 6, depth=3, num_layers=2, **opts).double()
    with torch.no_grad():
        rnn(torch.randn(7, 8, 5, dtype=torch.float64))  # population statistics
    rnn.eval()
    x = torch.randn(9, 4, 5, dtype=torch.float64)
    outs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("BNRHN_GATE_KERNELS", mode)
        kernels.reset()
        with torch.no_grad():
            outs[mode] = rnn(x, lengths=torch.tensor([9, 3, 7, 1]))[0]
    kernels.reset()
    assert torch.allclose(outs["on"], outs["off"], atol=1e-13, rtol=0)


def test_attention_tanh_values_and_gradients_equal_torch(ops):
    x = (torch.randn(3, 7, 11, dtype=torch.float64) * 2).requires_grad_()
    y = kernels.tanh(x)
    assert y.grad_fn is not None and "Tanh" in type(y.grad_fn).__name__ and type(y.grad_fn).__module__ != "torch"
    w = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.allclose(y, torch.tanh(x), atol=1e-15) and torch.allclose(gx, w * (1 - torch.tanh(x) ** 2), atol=1e-14)
    assert torch.autograd.gradcheck(kernels.tanh, (x[:1, :2, :3].detach().clone().requires_grad_(),))


def test_captioner_with_attention_trains_the_same_with_and_without_the_kernels(monkeypatch):
    if kernels.compiler_missing():
        pytest.skip(f"the kernels cannot be built here: {kernels.compiler_missing()}")
    cfg = CaptionerConfig(model="show_attend_tell", vocab_size=13, cell="bn_rhn", embed_size=8, hidden_size=10,
                          feature_size=6, grid_size=5, attention_size=9, dropout=0.0, cell_options={"depth": 2})
    torch.manual_seed(0)
    model = build_captioner(cfg).double()
    grid = torch.randn(4, 5, 6, dtype=torch.float64)
    tokens = torch.cat([torch.full((4, 1), 1), torch.randint(4, 13, (4, 5)), torch.full((4, 1), 2)], 1)
    lengths = torch.full((4,), 7)
    results, start = {}, copy.deepcopy(model.state_dict())  # the first pass updates batch-norm statistics
    for mode in ("on", "off"):
        monkeypatch.setenv("BNRHN_GATE_KERNELS", mode)
        kernels.reset()
        model.load_state_dict(start)
        model.zero_grad()
        loss = model.loss(grid, tokens, lengths)[0]
        loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    kernels.reset()
    assert torch.allclose(results["on"][0], results["off"][0], atol=1e-12, rtol=0)
    for a, b in zip(results["on"][1], results["off"][1]):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)


def test_modes(monkeypatch):
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "off")
    kernels.reset()
    assert kernels.ops_for(torch.zeros(1)) is None and "BNRHN_GATE_KERNELS=off" in kernels.status()
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "sometimes")
    kernels.reset()
    with pytest.raises(ValueError, match="BNRHN_GATE_KERNELS must be one of"):
        kernels.ops_for(torch.zeros(1))
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "auto")
    kernels.reset()
    assert kernels.ops_for(torch.zeros(1, dtype=torch.float16)) is None  # 16-bit: PyTorch's kernels
    assert kernels.ops_for(torch.zeros(1, device="meta")) is None  # not the CPU
    kernels.reset()


@needs_compiler
def test_auto_mode_times_both_paths_and_keeps_the_faster(monkeypatch):
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "auto")
    kernels.reset()
    in_use = kernels.ops_for(torch.zeros(1)) is not None
    fused_us, composed_us = kernels._state["choice"]
    assert in_use == (fused_us < composed_us)
    assert f"{fused_us:.0f} µs fused vs {composed_us:.0f} µs composed" in kernels.status()
    kernels.reset()


_STEP = """
import torch
from bnrhn.nn import Recurrent
torch.manual_seed(0)
rnn = Recurrent("bn_rhn", 5, 6, depth=2, stats="momentum").double()
out, _ = rnn(torch.randn(4, 3, 5, dtype=torch.float64))
out.square().sum().backward()
print(repr(out.sum().item()), repr(rnn.cells[0].weight_hh[0].grad.sum().item()))
"""


def _run_step(tmp_path, **env):
    full = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), **env}
    done = subprocess.run([sys.executable, "-c", _STEP], env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_without_a_compiler_the_cells_fall_back_with_one_line(tmp_path):
    """A fresh process on a machine with no C++ compiler (``$CXX`` names nothing, empty extension cache):
    one line on stderr, and the numbers of the composed path."""
    hidden = _run_step(tmp_path, CXX=str(tmp_path / "no-such-c++"), BNRHN_GATE_KERNELS="auto")
    lines = [line for line in hidden.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "composed" in lines[0], hidden.stderr
    composed = _run_step(tmp_path, BNRHN_GATE_KERNELS="off")
    assert hidden.stdout == composed.stdout and composed.stderr.strip() == ""
    assert not (tmp_path / "extensions").exists() or not any((tmp_path / "extensions").iterdir())


@pytest.mark.slow
@needs_compiler
def test_a_fresh_build_gives_the_numbers_of_the_composed_path(tmp_path):
    """Builds the extension from source into an empty cache (about 20 s) and checks one training step."""
    built = _run_step(tmp_path, BNRHN_GATE_KERNELS="on")
    composed = _run_step(tmp_path, BNRHN_GATE_KERNELS="off")
    a, b = (tuple(float(v) for v in r.stdout.split()) for r in (built, composed))
    assert a == pytest.approx(b, rel=1e-12)
    assert any((tmp_path / "extensions").iterdir())


class _Counting:
    """The kernels' op namespace, counting calls by name."""

    def __init__(self, ops):
        self.ops, self.calls = ops, {}

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted


@pytest.fixture
def counting(ops):
    counter = _Counting(ops)
    kernels._state["ops"] = kernels._state["loops"] = counter
    return counter


def test_the_cells_call_the_kernels_where_they_should(counting):
    """Guards the equality tests above against comparing the composition with itself."""
    T, B = 5, 3
    x = torch.randn(T, B, 4)
    for name, opts in (("rhn", {}), ("bn_rhn", {}), ("bn_rhn", {"stats": "momentum"})):
        rnn = Recurrent(name, 4, 6, depth=2, **opts)
        counting.calls.clear()
        rnn(x)[0].sum().backward()  # training on whole sequences: the C++ time loop, once per layer
        assert counting.calls == {"highway_sequence_forward": 1, "highway_sequence_backward": 1}, (name, opts)
        rnn.eval()
        counting.calls.clear()
        with torch.no_grad():
            rnn(x)
        assert counting.calls == {"highway_forward": T * 2}, (name, "inference")
        rnn.fused = False
        counting.calls.clear()
        with torch.no_grad():
            rnn(x)
        assert counting.calls == {}, (name, "fused=False keeps the composition")
    counting.calls.clear()
    Recurrent("bn_lstm", 4, 6, stats="momentum")(x)[0].sum().backward()  # whole sequences: the C++ time loop
    assert counting.calls == {"bn_lstm_sequence_forward": 1, "bn_lstm_sequence_backward": 1}
    counting.calls.clear()
    rnn = Recurrent("bn_lstm", 4, 6, stats="momentum")
    state = rnn.init_state(B)
    for t in range(T):  # one step at a time (decoding, attention): the step kernels
        out, state = rnn.step(x[t], state, t)
    out.sum().backward()
    assert counting.calls == {name: T for name in ("lstm_gates_forward", "lstm_output_forward",
                                                   "lstm_output_backward", "lstm_gates_backward")}
    counting.calls.clear()
    cfg = CaptionerConfig(model="show_attend_tell", vocab_size=13, cell="lstm", embed_size=8, hidden_size=10,
                          feature_size=6, grid_size=5, attention_size=9, dropout=0.0)
    tokens = torch.cat([torch.full((2, 1), 1), torch.randint(4, 13, (2, 3)), torch.full((2, 1), 2)], 1)
    build_captioner(cfg).loss(torch.randn(2, 5, 6), tokens, torch.full((2,), 5))[0].backward()
    assert counting.calls == {"tanh": 4}  # one attention per predicted word


@pytest.mark.parametrize("H", [1, 7, 9, 33])
def test_float32_kernels_with_partial_vectors_equal_float64(ops, H):
    g = torch.Generator().manual_seed(H)
    B = 3
    p, s, ds = torch.randn(B, 3 * H, generator=g) * 2, torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    act32, act64 = p.clone(), p.double()
    s32, s64 = ops.highway_forward(act32, s, 3), ops.highway_forward(act64, s.double(), 3)
    assert torch.allclose(s32.double(), s64, atol=2e-6, rtol=0) and torch.allclose(act32.double(), act64, atol=2e-6)
    for a, b in zip(ops.highway_backward(ds, act32, s, 3), ops.highway_backward(ds.double(), act64, s.double(), 3)):
        assert torch.allclose(a.double(), b, atol=1e-5, rtol=0)


def test_the_kernels_refuse_what_they_cannot_compute(ops):
    s = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.highway_forward(torch.randn(15, 4).t(), s, 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.highway_forward(torch.randn(4, 15, dtype=torch.float64), s, 3)
    with pytest.raises(RuntimeError, match=r"expected \[B, 3·H\]"):
        ops.highway_forward(torch.randn(4, 10), s, 3)
    with pytest.raises(RuntimeError, match="G must be 2 or 3"):
        ops.highway_forward(torch.randn(4, 20), s, 4)


def test_the_sequence_loop_refuses_what_it_cannot_compute(ops):
    """The C++ time loop checks its arguments before any work (the cells always pass valid ones)."""
    T, B, H = 4, 3, 5
    xp, s0 = torch.randn(T, B, 3 * H), torch.randn(B, H)
    weights, biases, gammas = [torch.randn(3 * H, H)], [torch.zeros(3 * H)], [torch.ones(H)]
    flags = dict(reads_input=[1], bias_in_product=[0], normed=[0], eps=1e-5, renorm=None, layer_norm=False)

    def call(**changes):
        args = dict(xp=xp, s0=s0, h_mask=None, weights=weights, biases=biases, gammas=gammas, active=[], **flags)
        args.update(changes)
        return ops.highway_sequence_forward(**args)

    assert call()[0].shape == (T, B, H)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        call(xp=xp.half(), s0=s0.half())
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        call(s0=torch.randn(H, B).t())
    with pytest.raises(RuntimeError, match="non-increasing"):
        call(active=[3, 2, 3, 2])
    with pytest.raises(RuntimeError, match="≥ 2 rows"):
        call(active=[3, 2, 2, 1])
    with pytest.raises(RuntimeError, match="last dimension"):
        call(xp=torch.randn(T, B, 2 * H))
    with pytest.raises(RuntimeError, match=r"renorm must be \[L, K, 5, T, H\]"):
        call(renorm=torch.ones(1, 1, 5, T, H + 1))
    with pytest.raises(RuntimeError, match="renorm applies to batch norm only"):
        call(renorm=torch.ones(1, 1, 5, T, H), layer_norm=True)


def test_the_lstm_gru_and_rnn_loops_refuse_what_they_cannot_compute(ops):
    T, B, H = 3, 4, 5
    h0 = torch.randn(B, H)
    lstm = dict(xp=torch.randn(T, B, 4 * H), h0=h0, c0=h0, h_mask=None, weight=torch.randn(4 * H, H),
                gamma_h=torch.ones(4 * H), gamma_c=torch.ones(H), beta_c=torch.zeros(H), carry_normed=False, eps=1e-5,
                active=[], renorm_h=None, renorm_c=None)
    assert ops.bn_lstm_sequence_forward(**lstm)[0].shape == (T, B, H)
    with pytest.raises(RuntimeError, match="at least one step"):
        ops.bn_lstm_sequence_forward(**{**lstm, "xp": torch.randn(0, B, 4 * H)})
    with pytest.raises(RuntimeError, match=r"weight \[4H, H\]"):
        ops.bn_lstm_sequence_forward(**{**lstm, "weight": torch.randn(4 * H, H + 1)})
    with pytest.raises(RuntimeError, match="both norms renormalise or neither"):
        ops.bn_lstm_sequence_forward(**{**lstm, "renorm_h": torch.ones(5, T, 4 * H)})
    gru = dict(xp=torch.randn(T, B, 3 * H), h0=h0, h_mask=None, weight=torch.randn(3 * H, H), bias=None, active=[])
    assert ops.gru_sequence_forward(**gru)[0].shape == (T, B, H)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.gru_sequence_forward(**{**gru, "xp": torch.randn(T, B, 6 * H)[:, :, ::2]})
    with pytest.raises(RuntimeError, match="h_mask must be shaped as h0"):
        ops.gru_sequence_forward(**{**gru, "h_mask": torch.ones(1, H)})
    rnn = dict(xp=torch.randn(T, B, H), h0=h0, h_mask=None, weight=torch.randn(H, H), active=[])
    assert ops.rnn_sequence_forward(**rnn)[0].shape == (T, B, H)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.rnn_sequence_forward(**{**rnn, "xp": torch.randn(T, B, 2 * H)[:, :, ::2]})
    with pytest.raises(RuntimeError, match=r"weight must be \[H, H\]"):
        ops.rnn_sequence_forward(**{**rnn, "weight": torch.randn(H, H + 1)})
    with pytest.raises(RuntimeError, match="h_mask must be shaped as h0"):
        ops.rnn_sequence_forward(**{**rnn, "h_mask": torch.ones(1, H)})
    with pytest.raises(RuntimeError, match="non-increasing"):
        ops.rnn_sequence_forward(**{**rnn, "active": [1, B] + [B] * (T - 2)})


def test_the_time_loops_run_even_where_auto_keeps_the_step_activations_composed(ops, monkeypatch):
    """auto times one layer's activations only; where PyTorch's are faster the per-step ops stay composed, but the
    C++ time loops (whose gain is the work around each step) still run, and BNRHN_GATE_KERNELS=off stops both."""
    from bnrhn.cells.highway_sequence import NativeHighwaySequence

    monkeypatch.setenv("BNRHN_GATE_KERNELS", "auto")
    monkeypatch.setattr(kernels, "_time_both", lambda ops: (200.0, 100.0))  # the fused activations "slower here"
    kernels.reset()
    x = torch.randn(5, 3, 4)
    assert kernels.ops_for(x) is None and kernels.loop_ops_for(x) is not None
    calls = []
    original = NativeHighwaySequence.apply
    monkeypatch.setattr(NativeHighwaySequence, "apply", lambda *a: calls.append(1) or original(*a))
    for name in ("rhn", "bn_rhn"):
        Recurrent(name, 4, 6, depth=2)(x)[0].sum().backward()
    assert len(calls) == 2
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "off")
    kernels.reset()
    assert kernels.ops_for(x) is None and kernels.loop_ops_for(x) is None
    Recurrent("bn_rhn", 4, 6, depth=2)(x)[0].sum().backward()
    assert len(calls) == 2


def test_parallel_workers_inherit_the_loops_when_auto_keeps_the_activations_composed(ops, monkeypatch):
    """settled_mode hands workers "loops" where auto chose composed activations but the loops run, and that
    mode gives a worker the same: loops on, per-step ops composed, no timing."""
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "auto")
    monkeypatch.setattr(kernels, "_time_both", lambda ops: (200.0, 100.0))
    kernels.reset()
    assert kernels.settled_mode() == "loops" and "time loops in use" in kernels.status()
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "loops")
    monkeypatch.setattr(kernels, "_time_both", lambda ops: pytest.fail("a worker must not time again"))
    kernels.reset()
    x = torch.randn(2, 3)
    assert kernels.ops_for(x) is None and kernels.loop_ops_for(x) is not None
    assert kernels.settled_mode() == "loops"


@pytest.mark.parametrize("name", ["rhn", "bn_rhn_tf", "gru", "mut3"])
def test_an_empty_batch_trains_through_the_loops(ops, name):
    rnn = Recurrent(name, 3, 4, **({"depth": 2} if "rhn" in name else {}))
    x = torch.randn(5, 0, 3, requires_grad=True)
    out, final = rnn(x)
    assert out.shape == (5, 0, 4) and final[0][0].shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_the_loops_take_a_broadcast_boolean_mask_and_strided_parameters(ops):
    """Direct callers of recur_sequence may pass a [1, H] bool mask and non-contiguous parameters: the nodes make
    them dense (the runner always passes a [B, H] mask of the state's dtype)."""
    from bnrhn.cells.base import StepMode

    torch.manual_seed(0)
    cell = Recurrent("bn_rhn", 3, 4, depth=2, stats="momentum").double().cells[0]
    xp = cell.project_input(torch.randn(5, 6, 3, dtype=torch.float64))
    s0 = (torch.randn(6, 4, dtype=torch.float64),)
    keep = torch.tensor([[True, False, True, True]])
    mode = StepMode(fused=True, taps={}, inference=False)
    a, _ = cell.recur_sequence(xp, s0, 0, keep, mode)
    b, _ = cell.recur_sequence(xp, s0, 0, keep.double().expand(6, 4), mode)
    assert torch.allclose(a, b, atol=1e-15)
    with torch.no_grad():
        w = cell.weight_hh[0]
        w.set_(w.t().contiguous().t())  # same values, column-major
    assert not cell.weight_hh[0].is_contiguous()
    c, _ = cell.recur_sequence(xp, s0, 0, keep, mode)
    assert torch.allclose(a, c, atol=1e-15)


def test_bn_lstm_keeps_the_composition_when_any_norm_is_synchronised(monkeypatch):
    from bnrhn.cells.base import StepMode
    from bnrhn.nn import SequenceBatchNorm

    cell = Recurrent("bn_lstm", 3, 4).cells[0]
    mode = StepMode(fused=True, taps={}, inference=False)
    assert cell._can_fuse(8, None, mode)
    monkeypatch.setattr(SequenceBatchNorm, "synchronized", property(lambda self: self is cell.bn_c))
    assert not cell._can_fuse(8, None, mode)


@pytest.mark.parametrize("name", ["rhn", "bn_rhn", "bn_lstm", "gru"])
def test_a_sequence_of_no_steps_is_refused_with_a_clear_error(name):
    rnn = Recurrent(name, 3, 4, **({"depth": 2} if "rhn" in name else {}))
    with pytest.raises(ValueError, match="at least one time step"):
        rnn(torch.randn(0, 2, 3, requires_grad=True))


def test_a_column_major_pre_activation_gives_the_composed_result(ops):
    """HighwayStep makes its working copy row-major whatever the layout of ``a``."""
    from bnrhn.cells.highway import HighwayStep

    torch.manual_seed(0)
    a = torch.randn(9, 4, dtype=torch.float64).t()  # [4, 9] column-major: G = 3, H = 3
    s = torch.randn(4, 3, dtype=torch.float64)
    out = HighwayStep.apply((3, 3, (), 1e-5, None), a, s, None)[0]
    h, t, c = torch.tanh(a[:, :3]), torch.sigmoid(a[:, 3:6]), torch.sigmoid(a[:, 6:])
    assert torch.allclose(out, h * t + s * c, atol=1e-14, rtol=0)


def test_a_failed_build_is_reported_by_its_compiler_error():
    message = ("Error building extension 'bnrhn_gates_avx2_0123456789': [1/2] c++ -MMD -MF gates.o.d -O3 -c gates.cpp\n"
               "FAILED: gates.o\n/src/gates.cpp:12:3: error: 'foo' was not declared in this scope\n"
               "ninja: build stopped: subcommand failed.")
    assert kernels._first_error(RuntimeError(message)) == "/src/gates.cpp:12:3: error: 'foo' was not declared in this scope"


def test_a_process_loads_one_build_only(ops, monkeypatch, capfd):
    """A second library registering the same op namespace would abort the process: a changed source in a
    running process is refused instead, and the cells fall back with one line."""
    monkeypatch.setitem(kernels._loaded, "name", "bnrhn_gates_other_build")
    kernels.reset()
    assert kernels.ops_for(torch.zeros(1)) is None
    err = capfd.readouterr().err
    assert "already loaded bnrhn_gates_other_build" in err and err.count("\n") == 1
