"""Generating text from a character language model.

After the prime text has been read, each next character is drawn from

    p_T(c) = softmax(logits / T)_c             (temperature T > 0; T < 1 sharpens, T > 1 flattens)
    c = argmax logits                          (T = 0: greedy, deterministic)

The model runs in eval mode (batch norm with population statistics); the time index passed to the cells
is the position modulo the training window length, as in training and evaluation.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sample_text", "check_temperature", "default_prime"]


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if math.isnan(t) or t < 0 or math.isinf(t):
        raise ValueError(
            f"temperature must be a finite number ≥ 0 (0 = greedy, 1 = the model's distribution), got {temperature!r}"
        )
    return t


def default_prime(vocab) -> str:
    """A newline when the vocabulary has one (the start of a line / sentence), else its first character."""
    return "\n" if "\n" in vocab else vocab.chars[0]


@torch.no_grad()
def sample_text(
    model,
    vocab,
    prime: str,
    length: int = 500,
    temperature: float = 1.0,
    seed: int | None = None,
    window: int = 100,
) -> str:
    """``prime`` followed by ``length`` generated characters.

    Raises ``ValueError`` for an empty prime, a prime character not in the vocabulary (named), a
    negative length or a temperature < 0.
    """
    temperature = check_temperature(temperature)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an integer ≥ 0, got {length!r}")
    if not prime:
        raise ValueError("the prime text is empty; give at least one character (e.g. --prime $'\\n')")
    vocab.check_text(prime, "--prime")
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) if seed is not None else torch.seed())
    try:
        state = None
        pos = 0
        logits = None
        for c in prime:
            x = torch.tensor([vocab.index[c]], device=device)
            logits, state = model.step(x, state, pos % window)
            pos += 1
        out: list[int] = []
        for _ in range(length):
            z = logits[0].double().cpu()
            if temperature == 0.0:
                nxt = int(torch.argmax(z))
            else:
                scaled = z / temperature
                if not torch.isfinite(scaled).all():  # a temperature so small it overflows: greedy
                    nxt = int(torch.argmax(z))
                else:
                    nxt = int(torch.multinomial(torch.softmax(scaled, 0), 1, generator=gen))
            out.append(nxt)
            logits, state = model.step(torch.tensor([nxt], device=device), state, pos % window)
            pos += 1
    finally:
        model.train(was_training)
    return prime + vocab.decode(out)
