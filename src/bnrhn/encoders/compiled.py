"""A frozen CNN trunk compiled with ``torch.compile`` for feature extraction, with the eager trunk as fallback.

Inductor with ``freezing`` treats the weights as constants: convolutions go to oneDNN with prepacked
weights and the ReLU6 clamps are fused into them. That is worth it for a data set (thousands of images)
and not for a handful: the first call compiles for tens of seconds (Inductor keeps its compiled code in
its on-disk cache, so a later process starts faster). One batch shape is compiled; a smaller last batch
is padded to it, so nothing recompiles. Every image's features are computed independently of the
others in its batch, so padding changes no result.

Inductor needs a C++ compiler on CPU. Where there is none, or compilation fails for any other reason,
the trunk runs eagerly and one line says why: extraction never fails because of this.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import Tensor, nn


def compiler_available() -> str | None:
    """Why Inductor cannot compile for CPU here (no C++ compiler on the PATH), or None when it can try."""
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx!r} not found; set $CXX)"


class CompiledTrunk:
    """``trunk`` (eval mode, channels-last input) compiled for ``batch_size`` images per call.

    ``log`` receives the one line of a fallback. ``engine`` is ``"compiled"`` or, after a fallback,
    ``"eager"``.
    """

    def __init__(self, trunk: nn.Module, batch_size: int, log) -> None:
        self.trunk = trunk
        self.batch_size = batch_size
        self.log = log
        why = compiler_available()
        self.compiled = None if why else torch.compile(trunk, options={"freezing": True})
        self.engine = "compiled" if self.compiled is not None else "eager"
        if why:
            log(f"features: {why}: the CNN runs uncompiled (slower, same numbers)")

    def __call__(self, x: Tensor) -> Tensor:
        if self.compiled is None:
            return self.trunk(x)
        n = x.shape[0]
        if n < self.batch_size:  # one compiled shape: pad the last batch instead of recompiling
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last)
        try:
            out = self.compiled(x)
        except Exception as exc:  # noqa: BLE001 — any compiler or backend failure: run eagerly instead
            self.compiled, self.engine = None, "eager"
            self.log(f"features: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                     "the CNN runs uncompiled (slower, same numbers)")
            return self.trunk(x[:n])
        return out[:n]
