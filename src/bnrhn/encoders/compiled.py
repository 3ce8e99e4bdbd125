"""A frozen CNN trunk compiled with ``torch.compile`` for feature extraction, with the eager trunk as fallback.

Inductor with ``freezing`` treats the weights as constants: convolutions go to oneDNN with prepacked
weights and the ReLU6 clamps are fused into them. Dynamo reads ``torch._inductor.config.freezing`` while
it traces, i.e. on the first call, not when ``torch.compile`` is called: passed only as
``torch.compile(..., options={"freezing": True})`` the flag reaches Inductor after Dynamo has already made
the weights graph inputs, and nothing is frozen (torch 2.13). So every call runs under
``torch._inductor.config.patch(freezing=True)`` and inference mode (freezing needs gradients off), and
shapes are static (``dynamic=False``): a second compilation with automatic dynamic shapes would make the
weights inputs again.

That is worth it for a data set (thousands of images) and not for a handful: the first call compiles for
seconds (MobileNetV2 on 2 cores: about 5). One batch shape is compiled (on CPU the encoder's chunk of a few
images); a smaller last batch is padded to it, and an ordinary (autograd-aware) input tensor is copied to an
inference tensor, so nothing recompiles within an extraction (an extraction with another chunk size compiles
its own). Every image's features are computed independently of the others in its batch, so padding changes
no result.

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
        self.compiled = None if why else torch.compile(trunk, dynamic=False)
        self.engine = "compiled" if self.compiled is not None else "eager"
        if why:
            log(f"features: {why}: the CNN runs uncompiled (slower, same numbers)")

    def __call__(self, x: Tensor) -> Tensor:
        if self.compiled is None:
            return self.trunk(x)
        n = x.shape[0]
        if n < self.batch_size:  # one compiled shape: pad the last batch instead of recompiling
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        if not x.is_inference():  # Dynamo would compile a second graph for an ordinary (autograd-aware) tensor
            with torch.inference_mode():
                x = x.clone()
        x = x.contiguous(memory_format=torch.channels_last)
        try:
            from torch._inductor import config as inductor_config

            with inductor_config.patch(freezing=True), torch.inference_mode():  # see the module docstring
                out = self.compiled(x)
        except Exception as exc:  # noqa: BLE001 — any compiler or backend failure: run eagerly instead
            self.compiled, self.engine = None, "eager"
            self.log(f"features: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                     "the CNN runs uncompiled (slower, same numbers)")
            return self.trunk(x[:n])
        return out[:n]
