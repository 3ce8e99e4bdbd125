"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One scene and feature cache for the test session: a module whose synthetic images are a subset of an
    earlier module's reuses that module's features instead of running the CNN again."""
    return tmp_path_factory.mktemp("shared-cache")
