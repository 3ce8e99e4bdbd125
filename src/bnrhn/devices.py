"""Where a command computes (``--device``) and in which precision (``--precision``).

``auto`` is CUDA when this PyTorch has a GPU, else the CPU. Under ``torchrun`` a CUDA device without an index
is the process's own GPU, ``cuda:LOCAL_RANK``. A device that is not there fails before any work, saying
what this PyTorch can use.

Precisions: ``fp32`` (default); ``bf16`` and ``fp16``, mixed precision through ``torch.autocast`` (the
products in 16 bits, the batch-norm statistics, the highway and BN-LSTM steps and the loss in float32;
fp16 with a gradient scaler); ``fp64``, the whole model in float64 (for exactness checks, slow).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEVICES = "auto, cpu, cuda, cuda:N, mps"
PRECISIONS = ("fp32", "bf16", "fp16", "fp64")


def check_device_spec(spec: object) -> str:
    """``ValueError`` for a device name that is none of :data:`DEVICES` (availability is checked later)."""
    if not isinstance(spec, str):
        raise ValueError(f"device must be one of {DEVICES}, got {spec!r}")
    kind, _, index = spec.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be one of {DEVICES}, got {spec!r}")
    return spec


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``spec``; ``ValueError`` when it is not available here."""
    check_device_spec(spec)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}, but no GPU is visible" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {spec}: this PyTorch ({torch.__version__}, {build}) cannot use CUDA; "
                             "use --device cpu (or auto)")
        index = int(spec.partition(":")[2]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's Metal backend is not available in this PyTorch or on this machine; "
                         "use --device cpu")
    return torch.device("mps")


def check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def model_dtype(precision: str) -> torch.dtype:
    """The dtype the parameters are kept in (mixed precision keeps float32 master weights)."""
    return torch.float64 if check_precision(precision) == "fp64" else torch.float32


def autocast_mode(precision: str) -> str | None:
    """``"bf16"`` / ``"fp16"`` for mixed precision, None otherwise (the trainer's ``autocast``)."""
    return precision if check_precision(precision) in ("bf16", "fp16") else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_note(precision: str, device: torch.device) -> str | None:
    """A line to tell the user when the precision asked for is slow or unsupported on ``device``."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return ("precision bf16: this CPU has no native bfloat16 arithmetic (no AVX512-BF16 or AMX in /proc/cpuinfo); "
                "PyTorch emulates it, which is usually slower than fp32")
    if precision == "fp16" and device.type == "cpu":
        return "precision fp16 on the CPU: supported by torch.autocast, but bf16 (or fp32) is usually faster there"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16; use fp16"
    return None
