"""Decoding: greedy, sampling with temperature, and batched beam search.

All three work on any model with the decoding interface of :class:`bnrhn.models.Captioner`
(``start``, ``step``, ``select``) and put the model in eval mode (batch-norm cells then use their
population statistics of the time index the model passes along, so a beam of 3 sees the same
normalisation as a training batch of 64).

A caption is ``w_1 .. w_n <end>`` with n ≤ ``max_len``; at step ``max_len + 1`` only ``<end>`` is
allowed. ``<pad>`` and ``<start>`` are never generated, ``<unk>`` only with ``allow_unk=True``. The
log-probability of a caption is Σ_t log p(w_t | w_<t, image) including the final ``<end>`` (the
model's own probabilities: banned tokens are removed, not renormalised away). With length
normalisation α > 0 beams are ranked by ``logprob / lp(n + 1)``: ``(n + 1)^α`` (im2txt's length
normalisation, ``length_penalty="power"``, the default) or GNMT's ``((5 + n + 1) / 6)^α``
(``length_penalty="gnmt"``). Trigram blocking and the ban on bad endings (off by default) mask
continuations with −inf, in every search; see :mod:`bnrhn.decoding.constraints`.

**Beam search** (beam K), for all images × beams in one ``[B·K, ·]`` tensor. At step t every alive
hypothesis is extended by every allowed word; of the 2K best extensions of each image, those ending
in ``<end>`` *and ranked within the top K* become finished hypotheses (a pool of the K best is kept),
and the K best that do not end stay alive (states reordered with ``index_select``). An image stops as
soon as no alive hypothesis can still beat its ``topk``-th finished one (exact: scores only fall as
words are added; with α > 0 the bound uses the longest possible length), and leaves the batch. With
K = 1 this is greedy decoding; with K at least the number of candidates it is exhaustive search.
The 2K best extensions of an image are among the 2K best words of each of its beams, so each beam
row's words are ranked first and only those K·2K candidates are scored against each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bnrhn.decoding.constraints import bad_mask, block_repeated_trigrams_, check_length_penalty
from bnrhn.decoding.constraints import length_penalty as _penalty


@dataclass
class Hypothesis:
    """A generated caption: word ids (no ``<start>``/``<end>``), log-probability, ranking score."""

    tokens: list[int]
    logprob: float
    score: float

    def __len__(self) -> int:
        return len(self.tokens)


def _banned(model, allow_unk: bool, device) -> Tensor:
    cfg = model.cfg
    banned = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
    banned[cfg.pad_id] = True
    banned[cfg.start_id] = True
    if not allow_unk:
        banned[cfg.unk_id] = True
    return banned


def _check(max_len: int, beam_size: int = 1) -> None:
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam size must be a positive integer, got {beam_size!r}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy(model, features: Tensor, max_len: int = 20, allow_unk: bool = False,
           temperature: float | None = None, generator: torch.Generator | None = None,
           length_norm: float = 0.0, length_penalty: str = "power", block_trigrams: bool = False,
           bad_ending_ids=None) -> list[Hypothesis]:
    """Greedy decoding (``temperature=None``) or sampling from softmax(log p / temperature), batched.

    Returns one :class:`Hypothesis` per image. Sampling is reproducible with ``generator``.
    ``block_trigrams`` and ``bad_ending_ids`` (word ids after which ``<end>`` is banned) constrain each
    step's choice (:mod:`bnrhn.decoding.constraints`); ``length_norm``/``length_penalty`` only set the
    reported score. Should a constraint leave a row no word at all, its ``<end>`` is allowed after all.
    """
    _check(max_len)
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_length_penalty(length_norm, length_penalty)
    model.eval()
    device = _device(model)
    features = features.to(device)
    B = features.shape[0]
    cfg = model.cfg
    banned = _banned(model, allow_unk, device)
    end_only = torch.ones(cfg.vocab_size, dtype=torch.bool, device=device)
    end_only[cfg.end_id] = False
    bad = bad_mask(bad_ending_ids, cfg.vocab_size, device, (cfg.pad_id, cfg.start_id, cfg.end_id, cfg.unk_id))
    constrained = block_trigrams or bad is not None
    state = model.start(features)
    tokens = torch.full((B,), cfg.start_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logprob = torch.zeros(B, dtype=torch.float64, device=device)
    length = torch.zeros(B, dtype=torch.long, device=device)
    out = []
    for t in range(1, max_len + 2):
        logp, state = model.step(tokens, state)
        logp = logp.float()
        end_lp = logp[:, cfg.end_id].clone() if constrained else None
        logp = logp.masked_fill(banned, float("-inf"))
        if t == max_len + 1:
            logp = logp.masked_fill(end_only, float("-inf"))
        if bad is not None:
            if t == max_len:  # the last word: one that <end> may not follow cannot be it
                logp.masked_fill_(bad, float("-inf"))
            if t > 1:
                logp[:, cfg.end_id].masked_fill_(bad[tokens], float("-inf"))
        if block_trigrams and t > 3:
            block_repeated_trigrams_(logp, torch.stack(out, 1))
        if constrained:  # no word left (a tiny vocabulary): end the caption after all
            stuck = torch.isneginf(logp).all(1)
            logp[:, cfg.end_id] = torch.where(stuck, end_lp, logp[:, cfg.end_id])
        if temperature is None:
            nxt = logp.argmax(-1)
        else:
            probs = (logp / temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        lp = logp.gather(1, nxt.unsqueeze(1)).squeeze(1)
        logprob += torch.where(done, 0.0, lp.double())
        nxt = torch.where(done, cfg.pad_id, nxt)
        out.append(nxt)
        length += (~done & (nxt != cfg.end_id)).long()
        done = done | (nxt == cfg.end_id)
        if bool(done.all()):
            break
        tokens = nxt
    seqs = torch.stack(out, 1).tolist()
    res = []
    for b in range(B):
        toks = seqs[b][: int(length[b])]
        lp = float(logprob[b])
        res.append(Hypothesis(toks, lp, lp / _penalty(len(toks) + 1, length_norm, length_penalty)))
    return res


def sample(model, features: Tensor, temperature: float = 1.0, max_len: int = 20, allow_unk: bool = False,
           generator: torch.Generator | None = None, block_trigrams: bool = False,
           bad_ending_ids=None) -> list[Hypothesis]:
    """One caption per image sampled from softmax(log p / temperature) (constraints as :func:`greedy`)."""
    return greedy(model, features, max_len, allow_unk, temperature=temperature, generator=generator,
                  block_trigrams=block_trigrams, bad_ending_ids=bad_ending_ids)


@torch.no_grad()
def beam_search(model, features: Tensor, beam_size: int = 3, max_len: int = 20, length_norm: float = 0.0,
                topk: int = 1, allow_unk: bool = False, length_penalty: str = "power", block_trigrams: bool = False,
                bad_ending_ids=None) -> list[list[Hypothesis]]:
    """Batched beam search; for each image the ``topk`` best captions, best first (see the module docstring).

    ``length_norm`` α and ``length_penalty`` (``"power"`` or ``"gnmt"``) rank the finished captions;
    ``block_trigrams`` bans repeated word trigrams and ``bad_ending_ids`` (word ids) bans ``<end>`` right
    after those words (:mod:`bnrhn.decoding.constraints`)."""
    _check(max_len, beam_size)
    K = beam_size
    if not 1 <= topk <= K:
        raise ValueError(f"topk must be between 1 and the beam size {K}, got {topk}")
    check_length_penalty(length_norm, length_penalty)
    model.eval()
    device = _device(model)
    features = features.to(device)
    B = features.shape[0]
    cfg = model.cfg
    V = cfg.vocab_size
    NEG = float("-inf")
    banned = _banned(model, allow_unk, device).nonzero().flatten()  # column indices: few words
    end_only = torch.ones(V, dtype=torch.bool, device=device)
    end_only[cfg.end_id] = False
    n = min(2 * K, K * V)  # extensions kept per image and step: K that may end, K that go on
    m = min(n, V)  # of which at most m come from one beam (so each beam's m best words suffice)
    bound_div = _penalty(max_len + 1, length_norm, length_penalty)
    bad = bad_mask(bad_ending_ids, V, device, (cfg.pad_id, cfg.start_id, cfg.end_id, cfg.unk_id))
    bad_cols = bad.nonzero().flatten() if bad is not None else None

    # The first step runs once per image (all K beams would start from the same state); afterwards the
    # state holds K rows per image (``width``).
    state = model.start(features)
    width = 1
    alive_lp = torch.full((B, K), NEG, device=device)
    alive_lp[:, 0] = 0.0  # one start hypothesis per image; the other K−1 slots are empty
    alive_seq = torch.zeros(B, K, 0, dtype=torch.long, device=device)
    fin_score = torch.full((B, K), NEG, device=device)
    fin_lp = torch.full((B, K), NEG, device=device)
    fin_seq = torch.full((B, K, max_len), cfg.pad_id, dtype=torch.long, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    image = torch.arange(B, device=device)  # original index of each active row
    tokens = torch.full((B,), cfg.start_id, dtype=torch.long, device=device)
    results: list[list[Hypothesis] | None] = [None] * B

    for t in range(1, max_len + 2):
        b = image.numel()
        n_words = t - 1  # words in the hypotheses being extended
        logp, state = model.step(tokens, state)
        # logp is this step's own fresh tensor: masked in place, and only on the banned columns
        logp = logp.float().index_fill_(1, banned, NEG)
        if t == max_len + 1:
            logp.masked_fill_(end_only, NEG)
        if bad is not None:
            if t == max_len:  # the last word: one that <end> may not follow cannot be it
                logp.index_fill_(1, bad_cols, NEG)
            if n_words:  # no <end> right after a bad-ending word (width = K once a word is there)
                logp[:, cfg.end_id].masked_fill_(bad[alive_seq[:, :, -1].reshape(-1)], NEG)
        if block_trigrams and n_words >= 3:
            block_repeated_trigrams_(logp, alive_seq.reshape(b * K, n_words))
        # The n best extensions of an image are among the m best words of each of its beams: rank
        # the words of every beam row first (adding the beam's score to m values, not to all V)
        row_lp, row_word = logp.topk(m, dim=1)  # [b·width, m], sorted
        cand = row_lp.view(b, width, m).add_(alive_lp[:, :width].unsqueeze(2)).view(b, width * m)
        if width * m < n:  # tiny vocabularies: pad with impossible candidates
            cand = torch.cat([cand, cand.new_full((b, n - width * m), NEG)], 1)
        top_lp, top_j = cand.topk(n, dim=1)  # sorted, best first
        top_j = top_j.clamp_max_(width * m - 1)  # a padded candidate (−inf) points at a real one
        src = top_j // m  # candidate column j is word j % m of beam slot j // m
        word = row_word.view(b, width * m).gather(1, top_j)
        finite = torch.isfinite(top_lp)
        is_end = (word == cfg.end_id) & finite
        rank = torch.arange(n, device=device).unsqueeze(0)

        # finished: <end> extensions within the top K; merged into the pool of the K best
        new_fin = is_end & (rank < K)
        norm = _penalty(n_words + 1, length_norm, length_penalty)
        seq_src = alive_seq.gather(1, src.unsqueeze(2).expand(b, n, n_words))  # [b, n, n_words]
        new_seq = torch.full((b, n, max_len), cfg.pad_id, dtype=torch.long, device=device)
        new_seq[:, :, :n_words] = seq_src
        all_score = torch.cat([fin_score, torch.where(new_fin, top_lp / norm, NEG)], 1)
        all_lp = torch.cat([fin_lp, torch.where(new_fin, top_lp, NEG)], 1)
        all_seq = torch.cat([fin_seq, new_seq], 1)
        all_len = torch.cat([fin_len, torch.full((b, n), n_words, dtype=torch.long, device=device)], 1)
        fin_score, order = all_score.topk(K, dim=1)
        fin_lp = all_lp.gather(1, order)
        fin_seq = all_seq.gather(1, order.unsqueeze(2).expand(b, K, max_len))
        fin_len = all_len.gather(1, order)

        # alive: the K best extensions that do not end
        ok = ~is_end & finite
        sel = torch.where(ok, rank, rank + n).argsort(dim=1, stable=True)[:, :K]
        alive_lp = top_lp.gather(1, sel).masked_fill(~ok.gather(1, sel), NEG)
        src_sel, word_sel = src.gather(1, sel), word.gather(1, sel)
        alive_seq = torch.cat([alive_seq.gather(1, src_sel.unsqueeze(2).expand(b, K, n_words)),
                               word_sel.unsqueeze(2)], 2)

        # images whose topk-th finished caption no alive hypothesis can beat are done
        best_alive = alive_lp.max(1).values
        if t == max_len + 1:
            done = torch.ones(b, dtype=torch.bool, device=device)
        else:
            done = fin_score[:, topk - 1] >= best_alive / bound_div
        if bool(done.any()):
            d_rows = done.nonzero().flatten().tolist()
            fs, fl, fq, fn = (x[done].tolist() for x in (fin_score, fin_lp, fin_seq, fin_len))
            for j, r in enumerate(d_rows):
                results[int(image[r])] = [
                    Hypothesis(fq[j][k][: fn[j][k]], fl[j][k], fs[j][k]) for k in range(topk) if fs[j][k] > NEG
                ]
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            image = image[keep]
            alive_lp, alive_seq, src_sel, word_sel = alive_lp[keep], alive_seq[keep], src_sel[keep], word_sel[keep]
            fin_score, fin_lp, fin_seq, fin_len = fin_score[keep], fin_lp[keep], fin_seq[keep], fin_len[keep]
            rows = keep
        else:
            rows = torch.arange(b, device=device)
        flat = (rows.unsqueeze(1) * width + src_sel).flatten()
        state = model.select(state, flat)
        width = K
        tokens = word_sel.flatten()
    return [r if r is not None else [] for r in results]


METHODS = ("beam", "greedy", "sample")


def decode(model, features: Tensor, method: str = "beam", beam_size: int = 3, max_len: int = 20,
           length_norm: float = 0.0, topk: int = 1, temperature: float = 1.0, allow_unk: bool = False,
           generator: torch.Generator | None = None, length_penalty: str = "power", block_trigrams: bool = False,
           bad_ending_ids=None) -> list[list[Hypothesis]]:
    """The decoding method by name, for every caller that lets the user choose it: per image, ``"beam"``:
    the ``topk`` best captions of a beam of ``beam_size`` (scored with ``length_norm`` α in the
    ``length_penalty`` form); ``"greedy"``: one caption; ``"sample"``: ``topk`` captions sampled at
    ``temperature``, most probable first. ``block_trigrams`` and ``bad_ending_ids`` constrain all three
    (:mod:`bnrhn.decoding.constraints`)."""
    check_length_penalty(length_norm, length_penalty)
    constraints = dict(block_trigrams=block_trigrams, bad_ending_ids=bad_ending_ids)
    if method == "beam":
        return beam_search(model, features, beam_size, max_len, length_norm, topk, allow_unk, length_penalty,
                           **constraints)
    if method == "greedy":
        return [[h] for h in greedy(model, features, max_len, allow_unk, length_norm=length_norm,
                                    length_penalty=length_penalty, **constraints)]
    if method == "sample":
        draws = [sample(model, features, temperature, max_len, allow_unk, generator, **constraints)
                 for _ in range(topk)]
        return [sorted((d[i] for d in draws), key=lambda h: -h.logprob) for i in range(features.shape[0])]
    raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
