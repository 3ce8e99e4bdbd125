"""What every analysis needs: the models to compare (fresh or trained), real input sequences, and
population statistics for batch-norm cells that have never been trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnrhn.data.text import CharVocab, apply_transform, check_seq_len, read_text
from bnrhn.models.char_lm import CharLM
from bnrhn.layers.seq_batchnorm import estimating_population_statistics, uses_batch_statistics

__all__ = [
    "AnalysisModel", "parse_cell_spec", "fresh_model", "load_models", "text_windows",
    "calibrate_batchnorm", "encode_for", "DEFAULT_CELLS",
]

DEFAULT_CELLS = ("rnn", "lstm", "rhn", "bn_rhn")

LABELS = {
    "rnn": "vanilla RNN", "lstm": "LSTM", "gru": "GRU", "rhn": "RHN", "bn_rhn": "BN-RHN",
    "bn_rhn_tf": "BN-RHN (TF code)", "bn_lstm": "BN-LSTM",
}


@dataclass
class AnalysisModel:
    """A model under analysis with a legend label, its vocabulary and the window length of its
    batch-norm time index (the training ``seq_len``; for fresh models the analysed length)."""

    label: str
    model: CharLM
    vocab: CharVocab
    window: int
    origin: str  # "fresh init (seed 0)" or the checkpoint path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def cell_name(self) -> str:
        return self.model.config["cell"]


def parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_cell_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"lstm"`` or ``"lstm:forget_bias=0,hidden=..."`` → (cell name, options).

    Options are cell options (see ``bnrhn cells``); ``normalize`` takes ``h+t`` for several gates.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    opts: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"cell spec {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], got {item!r}")
            v = parse_value(value.strip())
            if key.strip() == "normalize" and isinstance(v, str):
                v = v.replace("+", ",")
            opts[key.strip()] = v
    return name, opts


def _label(name: str, opts: dict[str, Any]) -> str:
    base = LABELS.get(name, name)
    if not opts:
        return base
    return base + " (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")"


def fresh_model(spec: str, vocab: CharVocab, hidden_size: int, window: int, seed: int = 0,
                embed_size: int | None = None, num_layers: int = 1) -> AnalysisModel:
    """A freshly initialised CharLM for the cell ``spec`` (deterministic for ``seed``)."""
    from bnrhn.cells import cell_options

    name, opts = parse_cell_spec(spec)
    valid = cell_options(name)  # ValueError for an unknown cell
    if "max_steps" in valid and "max_steps" not in opts:
        opts_build = {**opts, "max_steps": window}
    else:
        opts_build = dict(opts)
    torch.manual_seed(seed)
    model = CharLM(len(vocab), name, hidden_size, num_layers=num_layers, embed_size=embed_size, **opts_build)
    model.eval()
    return AnalysisModel(_label(name, opts), model, vocab, window, f"fresh init (seed {seed})", {"spec": spec})


def load_models(paths: list[str]) -> list[AnalysisModel]:
    from bnrhn.lm.task import load_char_lm

    out = []
    labels: dict[str, int] = {}
    for p in paths:
        lm = load_char_lm(p)
        cfg = lm.model.config
        label = f"{LABELS.get(cfg['cell'], cfg['cell'])} (trained)"
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:
            label = f"{label} [{Path(p).parent.name}/{Path(p).name}]"
        out.append(AnalysisModel(label, lm.model, lm.vocab, lm.seq_len, str(p),
                                 {"transform": lm.transform, "train_config": lm.train_config}))
    return out


def encode_for(am: AnalysisModel, text: str, source: str) -> Tensor:
    """The text as ids of ``am``'s vocabulary (characters it does not know are dropped)."""
    text = apply_transform(text, am.info.get("transform"))
    return am.vocab.encode(text, source=source, unknown="skip")


def text_windows(ids: Tensor, length: int, count: int, seed: int = 0) -> Tensor:
    """``count`` windows of ``length + 1`` consecutive characters from random places of ``ids``
    (``[length + 1, count]``, time-major): inputs are rows 0..length−1, targets rows 1..length."""
    check_seq_len(length)
    n = ids.numel()
    if n < length + 1:
        raise ValueError(f"the text has {n} characters; the analysis needs at least {length + 1} (--length {length})")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - length, (count,), generator=g)
    idx = starts.unsqueeze(0) + torch.arange(length + 1).unsqueeze(1)
    return ids[idx]


@torch.no_grad()
def calibrate_batchnorm(model: CharLM, ids: Tensor, length: int, batches: int = 20, batch_size: int = 32,
                        seed: int = 0) -> bool:
    """Give an untrained model's batch-norm layers population statistics of real text.

    Fresh batch-norm cells hold placeholder statistics (mean 0, variance 1), which would make the
    eval-mode analysis meaningless; this sets every slot to the exact average of ``batches`` batches
    of text (Ioffe & Szegedy, Alg. 2; :func:`bnrhn.layers.seq_batchnorm.estimating_population_statistics`)
    by running the model in training mode without gradients. Returns whether the model had batch norm.
    """
    if not uses_batch_statistics(model):
        return False
    was_training = model.training
    model.train()
    try:
        with estimating_population_statistics(model):
            for i in range(batches):
                win = text_windows(ids, length, batch_size, seed=seed + 1000 + i)
                model(win[:-1], step=0)
    finally:
        model.train(was_training)
    return True


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def read_analysis_text(path: str | None) -> str:
    if path is None:
        raise ValueError("give the input text with --text FILE (real text: the analysis runs the models on it)")
    return read_text(path)
