"""A plain per-image beam search, written independently of the batched one, as its reference.

Same rules as :func:`bnrhn.decoding.beam_search` (see :mod:`bnrhn.decoding.search`), spelled out with
Python lists and sorting for one image at a time, and always run to the maximum length (no early
stopping): tests check that the batched search, with its early stopping and its images × beams
tensor, returns the same captions and scores. Slow; not meant for real use.
"""

from __future__ import annotations

import math

import torch

from bnrhn.decoding.search import Hypothesis


@torch.no_grad()
def beam_search_one(model, feature, beam_size: int = 3, max_len: int = 20, length_norm: float = 0.0,
                    topk: int = 1, allow_unk: bool = False) -> list[Hypothesis]:
    """The ``topk`` best captions of one image (``feature``: one image's features, without batch dim)."""
    model.eval()
    cfg = model.cfg
    K = beam_size
    banned = {cfg.pad_id, cfg.start_id} | (set() if allow_unk else {cfg.unk_id})
    state = model.start(feature.unsqueeze(0).to(next(model.parameters()).device))
    alive = [([], 0.0, 0)]  # (words, logprob, row of `state`)
    finished: list[tuple[float, float, list[int]]] = []  # (score, logprob, words)
    for t in range(1, max_len + 2):
        if not alive:
            break
        tokens = torch.tensor([w[-1] if w else cfg.start_id for w, _, _ in alive])
        rows = torch.tensor([r for _, _, r in alive])
        logp, state = model.step(tokens, model.select(state, rows))
        logp = logp.double().tolist()
        cands = []
        for i, (words, lp, _) in enumerate(alive):
            for w in range(cfg.vocab_size):
                if w in banned or (t == max_len + 1 and w != cfg.end_id):
                    continue
                cands.append((lp + logp[i][w], i, w))
        cands.sort(key=lambda c: -c[0])  # stable: ties keep (beam, word) order
        cands = cands[: 2 * K]
        new_alive = []
        for rank, (lp, i, w) in enumerate(cands):
            if math.isinf(lp):
                continue
            words = alive[i][0]
            if w == cfg.end_id:
                if rank < K:
                    finished.append((lp / (len(words) + 1) ** length_norm, lp, list(words)))
            elif len(new_alive) < K:
                new_alive.append((words + [w], lp, i))
        finished.sort(key=lambda f: -f[0])
        finished = finished[:K]
        alive = new_alive
    return [Hypothesis(words, lp, score) for score, lp, words in finished[:topk]]
