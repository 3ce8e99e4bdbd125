"""The hand-written single-node steps (RHN highway layers, BN-LSTM step, masked sequence batch norm)
against the compositions of autograd operations they replace, and against finite differences."""

from __future__ import annotations

import pytest
import torch

from bnrhn.cells.bn_lstm import BNLSTMSequence, BNLSTMStep, NativeBNLSTMSequence
from bnrhn.cells.gru import GRUSequence
from bnrhn.cells.mut import MUTSequence
from bnrhn.cells.rnn import RNNSequence
from bnrhn.cells.highway import HighwayStep
from bnrhn.cells.highway_sequence import HighwaySequence, NativeHighwaySequence
from bnrhn.nn import Recurrent, SequenceBatchNorm

FUSED_CASES = [
    ("bn_rhn", {}),  # batch renormalization, the default
    ("bn_rhn", {"stats": "momentum"}),
    ("bn_rhn", {"renorm_rmax": 1.05, "renorm_dmax": 0.01, "renorm_warmup": 0}),  # limits that bind
    ("bn_rhn", {"renorm_rmax": 100.0, "renorm_dmax": 100.0, "renorm_warmup": 0}),  # r and d inside their limits
    ("bn_rhn", {"normalize": "h,t,c", "stats": "cumulative"}),
    ("bn_rhn", {"normalize": "t", "per_step": False}),
    ("bn_rhn", {"carry": "coupled", "normalize": "h,t", "input_at": "every"}),
    ("bn_rhn", {"max_steps": 3}),  # renormalised, later steps share the last slot (tracked step by step)
    ("bn_rhn", {"stats": "cumulative", "max_steps": 3, "normalize": "h,t"}),
    ("bn_rhn", {"normalize": ""}),  # batch norm on no gate (bias in the projection): as rhn
    ("rhn", {}),  # no normaliser: the one-node layer where the gate kernels serve, else the composition
    ("rhn", {"carry": "free", "input_at": "every"}),
    ("bn_rhn_tf", {}),  # layer norm: the C++ loop where the gate kernels serve, else the composition
    ("bn_rhn_tf", {"normalize": "h,t,c", "input_at": "first"}),
    ("bn_lstm", {"stats": "momentum"}),
    ("bn_lstm", {"carry_norm": "recurrence", "stats": "momentum"}),
    ("bn_lstm", {}),  # batch renormalization, the default
    ("bn_lstm", {"renorm_rmax": 1.05, "renorm_dmax": 0.01, "renorm_warmup": 0}),  # limits that bind
    ("bn_lstm", {"renorm_rmax": 100.0, "renorm_dmax": 100.0, "renorm_warmup": 0}),  # r and d inside their limits
    ("bn_lstm", {"stats": "cumulative", "max_steps": 3}),
    ("gru", {}),  # the C++ loop where the gate kernels serve (with its recurrent-dropout mask), else the composition
    ("rnn", {}),  # likewise
]


RENORM_BINDING = {"stats": "renorm", "renorm_rmax": 1.05, "renorm_dmax": 0.01, "renorm_warmup": 0, "normalize": "h,c"}


def _run(rnn, x, lengths, seed):
    torch.manual_seed(seed)  # the same dropout masks for both paths
    out, final = rnn(x, lengths=lengths)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss = loss + sum(t.square().sum() for state in final for t in state)  # every final state, c_T included
    params = list(rnn.parameters())
    grads = torch.autograd.grad(loss, [x, *params])
    return out, final, grads


@pytest.mark.parametrize("name,opts", FUSED_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FUSED_CASES)])
# None: full batches; (7, 4, 6, 7): packed, every step with ≥ 2 rows (batch-norm cells run the whole-sequence
# nodes); (7, 4, 6, 2): the last step has one row, whose batch statistics cannot apply (they run step by step)
@pytest.mark.parametrize("lengths", [None, (7, 4, 6, 7), (7, 4, 6, 2)], ids=["full", "packed", "one-row-step"])
def test_fused_training_path_equals_the_autograd_composition(name, opts, lengths, gate_kernels):
    check_fused_equals_composition(name, opts, lengths)


def check_fused_equals_composition(name, opts, lengths, inputs=5):
    """Two layers of ``name`` (fused, and ``fused=False``: the autograd composition) with the same weights, in
    float64 on 4 rows of ``lengths`` (None: full) with recurrent dropout and dropout, after a first batch has given
    the population statistics: outputs, final states, every gradient and the statistics equal to 1e-12."""
    torch.manual_seed(0)
    extra = {"depth": 3} if "rhn" in name else {}
    kw = dict(num_layers=2, recurrent_dropout=0.25, dropout=0.1, **extra, **opts)
    fused = Recurrent(name, inputs, 6, **kw).double()
    reference = Recurrent(name, inputs, 6, fused=False, **kw).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(7, 4, inputs, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor(lengths) if lengths is not None else None
    for model in (fused, reference):  # population statistics to renormalise against (and to update)
        torch.manual_seed(5)  # the same dropout masks
        with torch.no_grad():
            _ = model(torch.randn(7, 4, inputs, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 + 1)
    out_f, final_f, grads_f = _run(fused, x, lengths, seed=3)
    out_r, final_r, grads_r = _run(reference, x, lengths, seed=3)
    assert torch.allclose(out_f, out_r, atol=1e-12, rtol=0)
    for sf, sr in zip(final_f, final_r):
        for a, b in zip(sf, sr):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)
    for gf, gr, (pname, _) in zip(grads_f, grads_r, [("x", None), *fused.named_parameters()]):
        assert torch.allclose(gf, gr, atol=1e-11, rtol=0), pname
    for (bname, bf), br in zip(fused.named_buffers(), reference.buffers()):  # population statistics
        assert torch.equal(bf, br) if not bf.dtype.is_floating_point else torch.allclose(bf, br, atol=1e-12), bname


@pytest.mark.parametrize("name,opts", [("bn_rhn", {"renorm_rmax": 100.0, "renorm_dmax": 100.0, "renorm_warmup": 0}),
                                       ("bn_rhn", {"stats": "momentum", "normalize": "h,t,c"}), ("rhn", {}),
                                       ("bn_rhn_tf", {}), ("gru", {}), ("rnn", {}), ("mut3", {}),
                                       ("bn_lstm", {"renorm_rmax": 100.0, "renorm_dmax": 100.0, "renorm_warmup": 0})])
def test_float32_training_path_is_float64s_to_float32_precision(name, opts, gate_kernels):
    """The float32 kernels (activations on exp_u20, batch and layer norm written out) against the float64
    reference composition: outputs, final states and every gradient, on packed rows with recurrent dropout,
    after a first batch has given the population statistics that renormalisation reads."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, recurrent_dropout=0.25, **({"depth": 3} if "rhn" in name else {}), **opts)
    fast = Recurrent(name, 5, 16, **kw)
    reference = Recurrent(name, 5, 16, fused=False, **kw).double()
    reference.load_state_dict(fast.state_dict())
    first = torch.randn(7, 6, 5) * 2 + 1
    for model, dtype in ((fast, torch.float32), (reference, torch.float64)):
        torch.manual_seed(5)
        with torch.no_grad():
            model(first.to(dtype))
    x = torch.randn(7, 6, 5)
    lengths = torch.tensor([7, 4, 6, 7, 3, 5])
    out32, final32, grads32 = _run(fast, x.clone().requires_grad_(), lengths, seed=3)
    out64, final64, grads64 = _run(reference, x.double().requires_grad_(), lengths, seed=3)
    assert torch.allclose(out32.double(), out64, atol=5e-5, rtol=0)
    assert torch.allclose(final32[-1][0].double(), final64[-1][0], atol=2e-5, rtol=0)
    for g32, g64, (pname, _) in zip(grads32, grads64, [("x", None), *fast.named_parameters()]):
        assert torch.allclose(g32.double(), g64, atol=1e-4, rtol=1e-4), pname


def test_the_fast_paths_are_taken(monkeypatch, gate_kernels):
    """Guard against the equality test above passing because both models took the reference path. Where the
    gate kernels serve, the RHN family's sequences run the C++ loop; without them, the Python one."""
    calls = {"sequence": 0, "highway": 0, "lstm_sequence": 0, "lstm": 0}
    loops = {"C++": 0, "Python": 0}  # which whole-sequence nodes ran ("sequence", "lstm_sequence" count both)
    native = (NativeHighwaySequence, NativeBNLSTMSequence)
    for key, fn in (("sequence", NativeHighwaySequence), ("sequence", HighwaySequence), ("highway", HighwayStep),
                    ("lstm_sequence", NativeBNLSTMSequence), ("lstm_sequence", BNLSTMSequence), ("lstm", BNLSTMStep)):
        original = fn.apply

        def counting(*args, _key=key, _original=original, _fn=fn):
            calls[_key] += 1
            if _key.endswith("sequence"):
                loops["C++" if _fn in native else "Python"] += 1
            return _original(*args)

        monkeypatch.setattr(fn, "apply", counting)
    Recurrent("bn_rhn", 3, 4, depth=2)(torch.randn(5, 3, 3))  # batch renormalization (the default)
    Recurrent("bn_rhn", 3, 4, depth=2, stats="momentum")(torch.randn(5, 3, 3), lengths=[5, 5, 4])  # packed
    Recurrent("bn_lstm", 3, 4, stats="momentum")(torch.randn(5, 3, 3))
    Recurrent("bn_lstm", 3, 4)(torch.randn(5, 3, 3))  # batch renormalization, the default
    assert calls == {"sequence": 2, "highway": 0, "lstm_sequence": 2, "lstm": 0}  # one node per layer
    assert loops == ({"C++": 4, "Python": 0} if gate_kernels == "kernels" else {"C++": 0, "Python": 4})
    Recurrent("bn_rhn", 3, 4, depth=2).step(torch.randn(3, 3), None, 0)  # one step at a time (decoding
    Recurrent("bn_lstm", 3, 4).step(torch.randn(3, 3), None, 0)          # with attention): the step nodes
    assert calls == {"sequence": 2, "highway": 2, "lstm_sequence": 2, "lstm": 1}
    Recurrent("bn_lstm", 3, 4, min_rows=4)(torch.randn(5, 3, 3))  # 3 rows < min_rows: population path
    Recurrent("bn_rhn", 3, 4, depth=2, min_rows=4)(torch.randn(5, 3, 3))
    assert calls == {"sequence": 2, "highway": 2, "lstm_sequence": 2, "lstm": 1}
    # 2 rows < min_rows at the last step only: step by step, the first four steps fused
    Recurrent("bn_rhn", 3, 4, depth=2, min_rows=3)(torch.randn(5, 3, 3), lengths=[5, 5, 4])
    Recurrent("bn_lstm", 3, 4, min_rows=3)(torch.randn(5, 3, 3), lengths=[5, 5, 4])
    assert calls == {"sequence": 2, "highway": 2 + 4 * 2, "lstm_sequence": 2, "lstm": 1 + 4}
    # batch renormalization with steps sharing a slot (T = 5 > max_steps = 3): the Python loop either way
    Recurrent("bn_rhn", 3, 4, depth=2, max_steps=3)(torch.randn(5, 3, 3))
    Recurrent("bn_lstm", 3, 4, max_steps=3)(torch.randn(5, 3, 3))
    assert loops == ({"C++": 4, "Python": 2} if gate_kernels == "kernels" else {"C++": 0, "Python": 6})
    # layer norm (bn_rhn_tf): the C++ loop, even with a one-row step; without the kernels the composed steps
    Recurrent("bn_rhn_tf", 3, 4, depth=2)(torch.randn(5, 3, 3), lengths=[5, 4, 1])
    assert loops == ({"C++": 5, "Python": 2} if gate_kernels == "kernels" else {"C++": 0, "Python": 6})


@pytest.mark.parametrize("name", ["mut1", "mut2", "mut3"])
@pytest.mark.parametrize("lengths", [None, (7, 4, 6, 7), (5, 2, 4, 5)], ids=["full", "packed", "empty-steps"])
def test_mut_loops_equal_the_composition(name, lengths, gate_kernels, monkeypatch):
    """MUT1–3 train through the C++ loop where the gate kernels serve (else the composed steps): values, final
    states and every gradient equal the reference composition's (float64), with recurrent dropout, two layers
    (MUT1 and MUT2 add the raw input, so input size = hidden size)."""
    calls = []
    original = MUTSequence.apply
    monkeypatch.setattr(MUTSequence, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    kw = dict(num_layers=2, recurrent_dropout=0.25, dropout=0.1)
    fast = Recurrent(name, 6, 6, **kw).double()
    reference = Recurrent(name, 6, 6, fused=False, **kw).double()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(7, 4, 6, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor(lengths) if lengths is not None else None
    out_f, final_f, grads_f = _run(fast, x, lengths, seed=3)
    assert len(calls) == (2 if gate_kernels == "kernels" else 0)
    out_r, final_r, grads_r = _run(reference, x, lengths, seed=3)
    assert len(calls) == (2 if gate_kernels == "kernels" else 0)
    assert torch.allclose(out_f, out_r, atol=1e-12, rtol=0)
    for sf, sr in zip(final_f, final_r):
        assert torch.allclose(sf[0], sr[0], atol=1e-12, rtol=0)
    for gf, gr, (pname, _) in zip(grads_f, grads_r, [("x", None), *fast.named_parameters()]):
        assert torch.allclose(gf, gr, atol=1e-11, rtol=0), pname


@pytest.mark.parametrize("name", ["mut1", "mut2", "mut3"])
def test_mut_loop_gradcheck(name, gate_kernels):
    """The MUT loops against finite differences: packed rows, recurrent dropout, an initial state, every input
    and parameter."""
    if gate_kernels == "composed":
        pytest.skip("without the gate kernels the MUT cells keep the composed steps (nothing fused to check)")
    torch.manual_seed(0)
    rnn = Recurrent(name, 4, 4, recurrent_dropout=0.3).double()
    names = [n for n, _ in rnn.named_parameters()]
    params = [q.detach().clone().requires_grad_() for q in rnn.parameters()]
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *ps):
        torch.manual_seed(1)
        out, final = torch.func.functional_call(rnn, dict(zip(names, ps)), (x,),
                                                {"lengths": torch.tensor([5, 4, 2]), "state": [(h0,)]})
        return out, final[0][0]

    assert torch.autograd.gradcheck(f, (x, h0, *params), fast_mode=True)


@pytest.mark.parametrize("name", ["rhn", "bn_rhn_tf", "gru", "rnn"])
def test_steps_past_every_sequence_end_compute_nothing(name, gate_kernels):
    """Padded input longer than its longest sequence: the last steps have no rows (the C++ loops take them as
    empty steps); outputs there are zeros and everything equals the reference composition (float64)."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, recurrent_dropout=0.25, **({"depth": 2} if "rhn" in name else {}))
    fast = Recurrent(name, 5, 6, **kw).double()
    reference = Recurrent(name, 5, 6, fused=False, **kw).double()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(7, 4, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4, 5])
    out_f, final_f, grads_f = _run(fast, x, lengths, seed=3)
    out_r, final_r, grads_r = _run(reference, x, lengths, seed=3)
    assert torch.equal(out_f[5:], torch.zeros_like(out_f[5:]))
    assert torch.allclose(out_f, out_r, atol=1e-12, rtol=0)
    assert torch.allclose(final_f[1][0], final_r[1][0], atol=1e-12, rtol=0)
    for a, b in zip(grads_f, grads_r):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)


@pytest.mark.parametrize("name,node", [("gru", GRUSequence), ("rnn", RNNSequence)])
def test_gru_and_rnn_train_through_their_loops_where_the_kernels_serve_and_equal_torch(name, node, monkeypatch,
                                                                                       gate_kernels):
    """GRU and Elman RNN training take the C++ loop instead of nn.GRU / nn.RNN where the gate kernels serve
    (measured faster there); without them, or without gradients, PyTorch's kernel. Both give PyTorch's values
    and gradients (float64)."""
    calls = []
    original = node.apply
    monkeypatch.setattr(node, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    ours = Recurrent(name, 5, 6, num_layers=2).double()
    vendor = Recurrent(name, 5, 6, num_layers=2, fused=False).double()  # fused=False: PyTorch's kernel
    vendor.load_state_dict(ours.state_dict())
    x = torch.randn(7, 4, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 4, 6, 2])
    out_o, final_o, grads_o = _run(ours, x, lengths, seed=3)
    assert len(calls) == (2 if gate_kernels == "kernels" else 0)
    out_v, final_v, grads_v = _run(vendor, x, lengths, seed=3)
    assert len(calls) == (2 if gate_kernels == "kernels" else 0)
    assert torch.allclose(out_o, out_v, atol=1e-12, rtol=0)
    assert torch.allclose(final_o[1][0], final_v[1][0], atol=1e-12, rtol=0)
    for a, b in zip(grads_o, grads_v):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)
    with torch.no_grad():
        ours(x)  # inference: PyTorch's kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.float()(x.float())  # autocast: PyTorch's kernel (the loop computes in float32/float64 only)
    assert len(calls) == (2 if gate_kernels == "kernels" else 0)


@pytest.mark.parametrize("G,normed,renormalised", [(2, (0,), False), (2, (0, 1), False), (3, (0,), False),
                                                   (3, (1, 2), False), (2, (), False), (3, (), False),
                                                   (2, (0,), True), (3, (1, 2), True)])
def test_highway_step_gradcheck(G, normed, renormalised, gate_kernels):
    """Batch renormalization's r and d are fixed functions of the statistics here (constants of the backward
    pass, as in the cell), so that finite differences and the hand-written backward see the same ones."""
    torch.manual_seed(0)
    B, H = 5, 3
    a = torch.randn(B, G * H, dtype=torch.float64, requires_grad=True)
    s = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(G * H, dtype=torch.float64, requires_grad=True)
    gammas = [(torch.rand(H, dtype=torch.float64) + 0.5).requires_grad_() for _ in normed]
    constants = lambda mean, var: (torch.linspace(0.5, 2.0, H, dtype=torch.float64),  # noqa: E731
                                   torch.linspace(-1.0, 1.0, H, dtype=torch.float64))
    spec = (H, G, tuple(normed), 1e-5, tuple(constants for _ in normed) if renormalised else None)
    if not normed:  # the bias is in a already (rhn): the node gets None
        f = lambda a, s: HighwayStep.apply(spec, a, s, None)[0]  # noqa: E731
        assert torch.autograd.gradcheck(f, (a, s))
        return
    f = lambda a, s, b, *gs: HighwayStep.apply(spec, a, s, b, *gs)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (a, s, bias, *gammas))


@pytest.mark.parametrize("name,opts", [("rhn", {}), ("rhn", {"carry": "free", "input_at": "every"}),
                                       ("bn_rhn", {"stats": "momentum", "normalize": "h,t"}),
                                       ("bn_rhn", RENORM_BINDING),
                                       ("bn_rhn_tf", {"normalize": "h,c"}),
                                       ("gru", {}), ("rnn", {}),
                                       ("bn_lstm", {"stats": "momentum"}),
                                       ("bn_lstm", {k: v for k, v in RENORM_BINDING.items() if k != "normalize"}),
                                       ("bn_lstm", {"stats": "momentum", "carry_norm": "recurrence"})])
def test_whole_sequence_node_gradcheck(name, opts, gate_kernels, monkeypatch):
    """The whole-sequence nodes against finite differences: packed rows (lengths 5, 5, 3), recurrent dropout,
    an initial state, two layers (RHN depth 2); every input and parameter. With the gate kernels the RHN family
    runs the C++ loop, without them the Python one. Batch renormalization is checked where its r and d are
    constants for finite differences too: population statistics far from the batch's, with limits that bind."""
    if name in ("rhn", "bn_rhn_tf", "gru", "rnn") and gate_kernels == "composed":
        pytest.skip(f"without the gate kernels {name} keeps the composed step path (nothing fused to check)")
    calls = []
    python_node, native_node = {"bn_lstm": (BNLSTMSequence, NativeBNLSTMSequence), "gru": (None, GRUSequence),
                                "rnn": (None, RNNSequence)}.get(name, (HighwaySequence, NativeHighwaySequence))
    node = native_node if gate_kernels == "kernels" else python_node
    original = node.apply
    monkeypatch.setattr(node, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    extra = {"depth": 2} if "rhn" in name else {}
    rnn = Recurrent(name, 3, 4, num_layers=2, recurrent_dropout=0.3, **extra, **opts).double()
    names = [n for n, _ in rnn.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    norms = [m for m in rnn.modules() if isinstance(m, SequenceBatchNorm)]

    def f(x, s0, *ps):
        torch.manual_seed(1)  # the same dropout masks at every evaluation
        for bn in norms:  # the same population statistics at every evaluation (each tracks the batch's)
            bn.running_mean.fill_(50.0)
            bn.running_var.fill_(100.0)
            bn.num_batches_tracked.fill_(1)
        state = [(s0, s0.flip(0)), (s0.flip(1), s0)] if name == "bn_lstm" else [(s0,), (s0,)]
        out, final = torch.func.functional_call(rnn, dict(zip(names, ps)), (x,),
                                                {"lengths": torch.tensor([5, 5, 3]), "state": state})
        return out, *(a for layer in final for a in layer)

    assert torch.autograd.gradcheck(f, (x, s0, *params), fast_mode=True)
    assert calls  # the sequence node was used


@pytest.mark.parametrize("carry_normed", [False, True])
@pytest.mark.parametrize("renormalised", [False, True])
def test_bn_lstm_step_gradcheck(carry_normed, renormalised, gate_kernels):
    """With batch renormalization r and d are constants of the backward pass (Ioffe 2017): fixed functions of
    the statistics here, so that finite differences see the same constants as the hand-written backward."""
    torch.manual_seed(0)
    B, H = 5, 3
    d = dict(dtype=torch.float64, requires_grad=True)
    r, xp, c = torch.randn(B, 4 * H, **d), torch.randn(B, 4 * H, **d), torch.randn(B, H, **d)
    gh, gc, bc = (torch.rand(4 * H, **d)), torch.rand(H, **d), torch.randn(H, **d)
    constants = lambda n: (lambda mean, var: (torch.linspace(0.5, 2.0, n, dtype=torch.float64),  # noqa: E731
                                               torch.linspace(-1.0, 1.0, n, dtype=torch.float64)))
    spec = (H, 1e-5, carry_normed, (constants(4 * H), constants(H)) if renormalised else None)
    assert torch.autograd.gradcheck(lambda *a: BNLSTMStep.apply(spec, *a)[:2], (r, xp, c, gh, gc, bc))


def test_masked_sequence_batch_norm_gradcheck_and_formula():
    torch.manual_seed(0)
    T, B, F = 4, 5, 3
    bn = SequenceBatchNorm(F, center=True).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(T, B, F, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3, 4, 1])
    mask = torch.arange(T).unsqueeze(1) < lengths
    w = mask.double().unsqueeze(-1)
    n = w.sum(1)
    mean = (x * w).sum(1) / n
    var = ((x - mean.unsqueeze(1)).square() * w).sum(1) / n
    expected = (x - mean.unsqueeze(1)) / torch.sqrt(var.unsqueeze(1) + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(bn(x, 0, mask), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, g, b: torch.func.functional_call(
        bn, {"weight": g, "bias": b}, (x, 0, mask)), (x, bn.weight.detach().clone().requires_grad_(),
                                                    bn.bias.detach().clone().requires_grad_()))


@pytest.mark.parametrize("name", ["rhn", "bn_rhn", "bn_lstm"])
def test_torch_func_transforms_take_the_composed_path_with_the_same_jacobian(name):
    """Under torch.func (jacrev) the cells and masked batch norm fall back to differentiable
    compositions; the Jacobian equals the one that plain autograd computes through the fast nodes."""
    torch.manual_seed(0)
    rnn = Recurrent(name, 3, 4, **({"depth": 2} if "rhn" in name else {})).double()
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3])  # padded steps exercise the masked batch norm

    def f(x, buffers):  # the running statistics are updated in place: torch.func wants them as inputs
        return torch.func.functional_call(rnn, buffers, (x,), {"lengths": lengths})[0]

    buffers = {k: b.clone() for k, b in rnn.named_buffers()}
    by_func = torch.func.jacrev(f)(x, buffers)
    buffers = {k: b.clone() for k, b in rnn.named_buffers()}
    by_autograd = torch.autograd.functional.jacobian(lambda x: f(x, buffers), x)
    assert torch.allclose(by_func, by_autograd, atol=1e-12)


@pytest.mark.parametrize("opts", [{}, {"normalize": "h,t,c", "stats": "cumulative"}, {"carry": "coupled", "normalize": "t"},
                                  {"input_at": "every", "max_steps": 3}])
def test_inference_folds_eval_batch_norm_into_one_affine_pass(opts):
    """Under no_grad in eval mode the RHN applies its population-statistics batch norms and biases as
    one affine map (RHNCell._eval_affine); with gradients on it takes the composed path. Same outputs,
    steps past T_max included."""
    torch.manual_seed(0)
    rnn = Recurrent("bn_rhn", 5, 6, depth=3, num_layers=2, **opts).double()
    rnn.train()
    for _ in range(3):  # population statistics that differ by step
        rnn(torch.randn(4, 8, 5, dtype=torch.float64) * 2 + 1)
    rnn.eval()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    composed, _ = rnn(x)  # gradients enabled: the split/normalise/cat composition
    with torch.no_grad():
        folded, _ = rnn(x)
        state, stepped = None, []
        for t in range(6):
            h, state = rnn.step(x[t].clone(), state, step=t)
            stepped.append(h)
    assert torch.allclose(composed, folded, atol=1e-12, rtol=0)
    assert torch.allclose(composed, torch.stack(stepped), atol=1e-12, rtol=0)
