"""Fused elementwise kernels for the recurrent steps on the CPU (``gates.cpp``), and the training time loops of
the RHN family, BN-LSTM, GRU, MUT1–3 and the Elman RNN in C++ (``highway_sequence.cpp``, ``bn_lstm_sequence.cpp``,
``gru_sequence.cpp``, ``mut_sequence.cpp``, ``rnn_sequence.cpp``), built on first use.

The highway layer, the BN-LSTM step and the attention scores spend most of their non-product time in
tanh and σ, each a separate PyTorch kernel with its own pass over memory. How fast those are depends on
the processor: MKL's vector tanh takes 0.15 ns per element on an AVX-512 Intel machine and 4.4 ns on an
AVX2 AMD EPYC (docs/performance.md). ``gates.cpp`` does each phase of a step (activations and state
update; all the backward's products) in one pass with ATen's vectorised math.

Three things decide whether a step uses it:

- ``BNRHN_GATE_KERNELS`` = ``auto`` (default), ``on`` or ``off``;
- it must build: ``torch.utils.cpp_extension`` compiles it with the machine's C++ compiler into
  PyTorch's extension cache (about 20 s, once per machine and source version; ``python -m bnrhn.kernels``
  does it ahead of time). Where there is no compiler, or the build fails, one line says so and every
  cell runs PyTorch's composed operations instead — same equations, nothing else changes;
- with ``auto``, it must be faster here: the first use times one highway layer's elementwise forward and
  backward both ways ([64, 3·256] float32, a few milliseconds) and keeps the faster for the process.

Only CPU tensors of float32 or float64 qualify (CUDA and 16-bit tensors use PyTorch's kernels).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from bnrhn.autodiff import plain_autograd
from bnrhn.kernels import composed

_SOURCES = [Path(__file__).with_name(name) for name in ("gates.cpp", "highway_sequence.cpp", "bn_lstm_sequence.cpp",
                                                                   "gru_sequence.cpp", "mut_sequence.cpp",
                                                                   "rnn_sequence.cpp", "team_check.cpp")]
_HEADERS = [Path(__file__).with_name(name) for name in ("vec_math.h", "row_kernels.h", "sequence.h", "team.h")]
_MODES = ("auto", "on", "off", "loops")  # loops: the C++ time loops only, the per-step ops composed
_FLAGS = {  # compiler flags per ATen CPU capability: the extension's Vectorized<T> matches PyTorch's own
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}

_lock = threading.Lock()
_state: dict = {}  # "ops": the loaded op namespace or None, "why": reason it is not used, "choice": timings


def mode() -> str:
    value = os.environ.get("BNRHN_GATE_KERNELS", "auto").strip().lower()
    if value not in _MODES:
        raise ValueError(f"BNRHN_GATE_KERNELS must be one of {_MODES}, got {value!r}")
    return value


def check_settings() -> None:
    """Raise ValueError, naming the variable, for a mistyped kernel setting (``BNRHN_GATE_KERNELS``,
    ``BNRHN_RECURRENT_PRODUCTS``, ``BNRHN_BATCH_SPLIT``): the training commands call it before training, so that
    a typo stops the run there rather than at its first step or after it."""
    from bnrhn.kernels import batch_split, onednn

    mode()
    onednn.mode()
    batch_split.setting()


def capability() -> str:
    """ATen's CPU capability in use ("AVX512", "AVX2", "DEFAULT", …), which the build targets."""
    return torch.backends.cpu.get_cpu_capability()


def compiler_missing() -> str | None:
    """Why no extension can be built here (no C++ compiler), or None."""
    cxx = os.environ.get("CXX", "c++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx!r} not found; set $CXX)"


_loaded: dict = {}  # the library loaded into this process (never twice: a second TORCH_LIBRARY aborts)


def _build_name(openmp: bool = True) -> tuple[str, list[str]]:
    """The extension's name and flags: one build per source, flags, PyTorch and environment, so that
    checkouts and virtual environments sharing PyTorch's extension cache never rebuild each other's. ``openmp``:
    with -fopenmp (the loops' batch split, team.h, runs on OpenMP's threads: PyTorch's own libgomp, already
    loaded, serves the extension's calls too — one thread pool in the process)."""
    cap = capability()
    flags = ["-O3", "-DNDEBUG", *(["-fopenmp"] if openmp else []), *_FLAGS.get(cap, [])]
    sources = [f.read_text(encoding="utf-8") for f in (*_SOURCES, *_HEADERS)]
    key = "\0".join([*sources, *flags, torch.__version__, sys.prefix])
    return f"bnrhn_gates_{cap.lower()}_{hashlib.sha256(key.encode()).hexdigest()[:10]}", flags


def build(verbose: bool = False):
    """Compile (or find in PyTorch's extension cache, ``$TORCH_EXTENSIONS_DIR``) and load the kernels; returns
    ``torch.ops.bnrhn_gates``. Raises RuntimeError with the reason when it cannot. Where the compiler cannot build
    with OpenMP (clang without its OpenMP library, say), the kernels are built without it, said in one line: the
    loops then run in one part (no batch split)."""
    builds = [_build_name(openmp=True), _build_name(openmp=False)]
    if "name" in _loaded:
        if _loaded["name"] not in (name for name, _ in builds):
            raise RuntimeError(f"this process already loaded {_loaded['name']}; {builds[0][0]} (a changed source) "
                               "needs a new process")
        return torch.ops.bnrhn_gates
    why = compiler_missing()
    if why:
        raise RuntimeError(why)
    from torch.utils.cpp_extension import _get_build_directory

    if shutil.which("ninja") is None:  # the ninja wheel (a dependency) puts its binary in the venv's bin/
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            raise RuntimeError("ninja not found (pip install ninja)") from None
    folders = [Path(_get_build_directory(name, verbose=False)) for name, _ in builds]
    if not (folders[0] / f"{builds[0][0]}.so").exists() and (folders[1] / f"{builds[1][0]}.so").exists():
        builds, folders = builds[1:], folders[1:]  # built without OpenMP before: this compiler has none
    try:
        _build_and_load(*builds[0], folders[0], verbose)
    except RuntimeError as exc:
        if len(builds) == 1:
            raise
        try:
            _build_and_load(*builds[1], folders[1], verbose)
        except RuntimeError:
            raise exc from None
        _say(f"the C++ compiler could not build with OpenMP ({_first_error(exc)}); the kernels are built without "
             "it and the loops run unsplit (BNRHN_BATCH_SPLIT has no effect)")
    return torch.ops.bnrhn_gates


def _build_and_load(name: str, flags: list[str], folder: Path, verbose: bool) -> None:
    from torch.utils.cpp_extension import load

    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        # left by a build that was killed (PyTorch's build lock waits for it forever)
        _say(f"removing the stale build lock {lock} (over {_STALE_LOCK_S // 60} minutes old)")
        lock.unlink(missing_ok=True)
    if not (folder / f"{name}.so").exists():
        _say(f"building the fused CPU gate kernels in {folder} (once per machine, about 20 s)")
    load(name, [str(f) for f in _SOURCES], extra_cflags=flags,
         extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], is_python_module=False, verbose=verbose,
         build_directory=str(folder))
    _loaded["name"] = name


_STALE_LOCK_S = 600


def _first_error(exc: Exception) -> str:
    """The compiler's first error line of a failed build (PyTorch's message starts with the command line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror:|fatal error", line)]
    return ((errors or lines or [type(exc).__name__])[0])[:200]


def _say(line: str) -> None:
    print(f"bnrhn: {line}", file=sys.stderr, flush=True)


def _load() -> None:
    """Fill ``_state`` once per process (thread-safe)."""
    with _lock:
        if "ops" in _state:
            return
        chosen = mode()
        if chosen == "off":
            _state.update(ops=None, why="BNRHN_GATE_KERNELS=off")
            return
        try:
            ops = build()
            if chosen == "loops":  # what auto settles on where PyTorch's activations are faster (worker processes)
                _state.update(ops=None, loops=ops, why="BNRHN_GATE_KERNELS=loops")
                return
            timing = _time_both(ops) if chosen == "auto" else None
        except Exception as exc:  # noqa: BLE001 — any build failure: the composed path, said once
            first = _first_error(exc)
            _state.update(ops=None, why=f"not built: {first}")
            _say(f"fused CPU gate kernels not available ({first}); the cells use PyTorch's composed "
                 "operations (same equations, slower on CPUs with slow vector math)")
            return
        if timing is not None and timing[0] >= timing[1]:
            _state.update(ops=None, loops=ops, why=f"slower here ({timing[0]:.0f} vs {timing[1]:.0f} µs per layer)",
                          choice=timing)
        else:
            _state.update(ops=ops, loops=ops, why=None, **({"choice": timing} if timing else {}))


def _time_both(ops, reps: int = 20) -> tuple[float, float]:
    """µs per highway layer's elementwise forward + backward, fused and composed ([64, 3·256] float32)."""
    g = torch.Generator().manual_seed(0)
    B, H = 64, 256
    a = torch.randn(B, 3 * H, generator=g)
    s, ds = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)

    def fused():
        act = a.clone()
        ops.highway_forward(act, s, 3)
        ops.highway_backward(ds, act, s, 3)

    def composed_step():
        act = a.clone()
        composed.highway_forward(act, s, 3)
        composed.highway_backward(ds, act, s, 3)

    best = {}
    for name, fn in (("fused", fused), ("composed", composed_step)):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps * 1e6)
        best[name] = min(times)
    return best["fused"], best["composed"]


def ops_for(*tensors: Tensor):
    """The kernels' op namespace when they serve these tensors (CPU, float32/float64, built, chosen), else None."""
    if _bypass.active or not all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors):
        return None
    if "ops" not in _state:
        _load()
    return _state["ops"]


def loop_ops_for(*tensors: Tensor):
    """The op namespace of the C++ time loops when they serve these tensors (CPU, float32/float64, the extension
    built and ``BNRHN_GATE_KERNELS`` not ``off``), else None. Unlike :func:`ops_for` this does not follow the
    ``auto`` timing, which weighs one layer's activations only: the loops' gain is the Python and dispatcher work
    around each step, whatever the processor's vector math (their activations are the kernels' own either way)."""
    if _bypass.active or not all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors):
        return None
    if "ops" not in _state:
        _load()
    return _state.get("loops")


def loop_mask(h_mask: Tensor | None, state: Tensor) -> Tensor | None:
    """A recurrent-dropout mask as the C++ loops read it: dense, ``[B, H]`` like ``state``, of its dtype (a caller
    may pass a broadcastable or boolean one)."""
    return None if h_mask is None else h_mask.to(state.dtype).expand_as(state).contiguous()


def step_ops(*tensors: Tensor):
    """The operations a step runs on these tensors: the fused kernels (:func:`ops_for`) where they serve them,
    else their composition from PyTorch's (:mod:`bnrhn.kernels.composed`), with the same interface."""
    ops = ops_for(*tensors)
    return composed if ops is None else ops


def settled_mode() -> str:
    """"on", "loops" or "off": this process's choice (made now if not yet), for worker processes to take as their
    ``BNRHN_GATE_KERNELS`` so that they do not time both paths again, side by side, and maybe choose otherwise."""
    if "ops" not in _state:
        _load()
    if _state["ops"] is not None:
        return "on"
    return "loops" if _state.get("loops") is not None else "off"


def status() -> str:
    """One line on whether the kernels are in use, and why (for logs and benchmarks)."""
    if "ops" not in _state:
        _load()
    timing = _state.get("choice")
    timed = f" (highway layer fwd+bwd {timing[0]:.0f} µs fused vs {timing[1]:.0f} µs composed)" if timing else ""
    if _state["ops"] is not None:
        return f"fused CPU gate kernels in use, {capability()} build{timed}"
    loops = " (the C++ time loops in use)" if _state.get("loops") is not None else ""
    return f"fused CPU gate kernels not used: {_state['why']}{timed}{loops}"


class _Bypass(threading.local):
    active = False


_bypass = _Bypass()


@contextmanager
def bypassed():
    """Within this block (in this thread) no step uses the kernels: benchmarks time both paths in one run."""
    previous, _bypass.active = _bypass.active, True
    try:
        yield
    finally:
        _bypass.active = previous


def reset() -> None:
    """Forget the choice (tests; a new ``BNRHN_GATE_KERNELS`` or ``$CXX`` takes effect at the next use). The
    library itself stays loaded: a process loads it once."""
    with _lock:
        _state.clear()


class _Tanh(torch.autograd.Function):
    """y = tanh(x) by the kernels' tanh; ∂L/∂x = ∂L/∂y ⊙ (1 − y²)."""

    @staticmethod
    def forward(ctx, x: Tensor, ops) -> Tensor:
        y = ops.tanh(x.contiguous())
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y), None


def tanh(x: Tensor) -> Tensor:
    """``torch.tanh(x)``, by the fused kernels' tanh where they serve ``x`` (ordinary autograd only)."""
    ops = ops_for(x) if plain_autograd() and not torch.is_autocast_enabled(x.device.type) else None
    return torch.tanh(x) if ops is None else _Tanh.apply(x, ops)
