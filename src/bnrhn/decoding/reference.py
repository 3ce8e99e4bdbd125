"""A plain per-image beam search, written independently of the batched one, as its reference.

Same rules as :func:`bnrhn.decoding.beam_search` (see :mod:`bnrhn.decoding.search`), spelled out with
Python lists and sorting for one image at a time, and always run to the maximum length (no early
stopping): tests check that the batched search, with its early stopping and its images × beams
tensor, returns the same captions and scores. The constraints and length penalties of
:mod:`bnrhn.decoding.constraints` are written out here again, per hypothesis with Python sets and the
formulas in full, rather than reusing the batched masks. Slow; not meant for real use.
"""

from __future__ import annotations

import math

import torch

from bnrhn.decoding.search import Hypothesis


@torch.no_grad()
def beam_search_one(model, feature, beam_size: int = 3, max_len: int = 20, length_norm: float = 0.0,
                    topk: int = 1, allow_unk: bool = False, length_penalty: str = "power",
                    block_trigrams: bool = False, bad_ending_ids=None) -> list[Hypothesis]:
    """The ``topk`` best captions of one image (``feature``: one image's features, without batch dim)."""
    model.eval()
    cfg = model.cfg
    K = beam_size
    banned = {cfg.pad_id, cfg.start_id} | (set() if allow_unk else {cfg.unk_id})
    bad_words = set(bad_ending_ids or ()) - {cfg.pad_id, cfg.start_id, cfg.end_id, cfg.unk_id}

    def penalty(words: list[int]) -> float:  # |Y| = the words and <end>
        if length_norm == 0:
            return 1.0
        if length_penalty == "gnmt":
            return ((5 + len(words) + 1) / 6) ** length_norm  # Wu et al. 2016, eq. 14
        return (len(words) + 1) ** length_norm

    def repeats(words: list[int]) -> set[int]:
        """The words that would complete a trigram ``words`` already holds."""
        if not block_trigrams or len(words) < 3:
            return set()
        seen = {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
        return {c for a, b, c in seen if (a, b) == (words[-2], words[-1])}

    def allowed(words: list[int], w: int, t: int, blocked: set[int]) -> bool:
        if w in banned or (t == max_len + 1 and w != cfg.end_id):
            return False
        if w == cfg.end_id:
            return not (words and words[-1] in bad_words)
        if t == max_len and w in bad_words:  # would have to be followed by <end>, which it may not
            return False
        return w not in blocked

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
            blocked = repeats(words)
            for w in range(cfg.vocab_size):
                if not allowed(words, w, t, blocked):
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
                    finished.append((lp / penalty(words), lp, list(words)))
            elif len(new_alive) < K:
                new_alive.append((words + [w], lp, i))
        finished.sort(key=lambda f: -f[0])
        finished = finished[:K]
        alive = new_alive
    return [Hypothesis(words, lp, score) for score, lp, words in finished[:topk]]
