"""Self-critical sequence training (SCST): REINFORCE on the CIDEr-D of sampled captions.

Rennie et al. 2017 ("Self-critical Sequence Training for Image Captioning") fine-tune a captioner trained
with cross-entropy by maximising the expected CIDEr-D of its own captions. For an image with features v,
k captions w^1..w^k are sampled from the model and scored against the image's references, r_j = CIDEr-D(w^j);
the loss is the policy gradient with a baseline b_j:

    L = − Σ_j (r_j − b_j) · Σ_t log p(w^j_t | w^j_<t, v)  /  (number of sampled words, <end> included)

Two baselines:

- ``mean`` (default): b_j = the mean reward of the image's *other* k − 1 samples (Luo 2020, "A Better Variant
  of Self-Critical Sequence Training"; also Kool et al. 2019); no extra decoding, and the advantages of one
  image sum to zero, so rewards never push all of an image's captions the same way;
- ``greedy``: b_j = the reward of the model's greedy caption of the image (Rennie et al.'s test-time
  inference baseline); one greedy decode per image and step.

How the two passes are run (a choice the code makes explicit, not a mode hidden in the model):

1. **Sampling** (no gradient) runs the model in eval mode: population batch-norm statistics, no dropout. In
   training mode the step-by-step sampler would normalise each step with statistics over rows that have
   already ended, and would update the population statistics with them — the batch-composition cue that
   training learns from and inference does not have (docs/captioning.md, "batch-norm leak").
2. **The log-probabilities** that carry the gradient are computed teacher-forced on the sampled captions
   (the same fused sequence path as cross-entropy training), in ``policy="train"`` mode (the recurrent
   layers' dropout and batch statistics over the sampled captions' real words, as in cross-entropy
   training; Show, Attend and Tell's deep-output dropout is part of its cross-entropy loss only) or
   ``policy="eval"`` (the distribution that was sampled, at temperature 1: on-policy). Either way the
   tokens the sampler never draws are removed from the softmax and an ``<end>`` forced after ``max_len``
   words contributes no term.

The reward is :class:`bnrhn.metrics.cider.CiderDReward`: CIDEr-D with document frequencies counted once on
all training images' references (PTB-tokenized as coco-caption does), so the reward of a caption equals
what ``bnrhn.metrics.score`` reports for it on the training set and does not depend on the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bnrhn.captioning.data import caption_rows
from bnrhn.data.vocab import Vocabulary
from bnrhn.decoding import decode
from bnrhn.metrics.cider import CiderDReward
from bnrhn.metrics.tokenizer import tokenize_captions

from bnrhn.captioning.config import SCST_BASELINES as BASELINES
from bnrhn.captioning.config import SCST_POLICIES as POLICIES


def training_reward(references: list[list[str]]) -> CiderDReward:
    """The CIDEr-D reward over the training images' references (raw text; PTB-tokenized here, once)."""
    flat = tokenize_captions([c for refs in references for c in refs])
    grouped, at = [], 0
    for refs in references:
        grouped.append(flat[at: at + len(refs)])
        at += len(refs)
    return CiderDReward(grouped)


@dataclass
class SelfCritical:
    """The SCST objective for one training split (see the module docstring).

    ``reward``: CIDEr-D over the split's images (index i = the split's i-th image); ``samples``: k captions
    per image; ``baseline``: ``mean`` or ``greedy``; ``temperature``: the sampler's softmax temperature (the
    gradient is always of the model's own log p); ``max_len``: longest sampled caption, in words;
    ``policy``: ``train`` or ``eval``, the mode of the log-probability pass.
    """

    reward: CiderDReward
    vocab: Vocabulary
    samples: int = 5
    baseline: str = "mean"
    temperature: float = 1.0
    max_len: int = 20
    policy: str = "train"

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"SCST baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"SCST policy mode must be one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise ValueError(f"SCST samples per image must be a positive integer, got {self.samples!r}")
        if self.baseline == "mean" and self.samples < 2:
            raise ValueError("the mean-of-the-others baseline needs at least 2 samples per image (--scst-samples)")
        if not self.temperature > 0:
            raise ValueError(f"SCST temperature must be > 0, got {self.temperature!r}")

    def captions(self, hyps) -> list[str]:
        """Hypotheses as coco-caption tokenizes candidates (the reward's references are tokenized alike)."""
        return tokenize_captions([self.vocab.decode(h.tokens) for h in hyps])

    def loss(self, model, features: Tensor, images: Tensor) -> tuple[Tensor, int, dict[str, float]]:
        """(policy-gradient loss, sampled words, logged parts) for ``features`` of the split's ``images``."""
        k = self.samples
        t0 = time.perf_counter()
        feats = features.repeat_interleave(k, 0)  # image i's samples are rows i·k .. i·k + k − 1
        hyps = [h[0] for h in decode(model, feats, "sample", max_len=self.max_len, temperature=self.temperature)]
        t1 = time.perf_counter()
        owner = np.repeat(images.cpu().numpy(), k)
        rewards = self.reward(self.captions(hyps), owner)
        if self.baseline == "mean":
            r = rewards.reshape(-1, k)
            base = ((r.sum(1, keepdims=True) - r) / (k - 1)).reshape(-1)
        else:
            greedy = [h[0] for h in decode(model, features, "greedy", max_len=self.max_len)]
            base = np.repeat(self.reward(self.captions(greedy), images.cpu().numpy()), k)
        t2 = time.perf_counter()
        advantage = torch.as_tensor(rewards - base, dtype=features.dtype, device=features.device)
        v = self.vocab
        tokens, lengths = caption_rows([h.tokens for h in hyps], v.start_id, v.end_id, v.pad_id)
        tokens, lengths = tokens.to(features.device), lengths.to(features.device)
        model.train(self.policy == "train")
        # the sampled captions' real words only (w_1 .. <end>; no logits for padding), row-major: sample of each
        logits, targets, valid = model.real_token_logits(feats, tokens, lengths)
        sample = valid.nonzero(as_tuple=True)[0]
        # the sampler's distribution: the tokens it never draws (<pad>, <start>, <unk>) removed, and no term
        # for an <end> it forced after max_len words (its probability was 1)
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[[v.pad_id, v.start_id, v.unk_id]] = True
        logp = F.log_softmax(logits.float().masked_fill(banned, float("-inf")), -1)  # [words, V]
        kept = ~((lengths[sample] - 2 == self.max_len) & (targets == v.end_id))
        word_logp = torch.where(kept, logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), 0.0)
        n_words = max(int(kept.sum()), 1)
        loss = -(advantage[sample] * word_logp).sum() / n_words
        with torch.no_grad():
            plogp = torch.where(banned, 0.0, logp.exp() * logp)
            entropy = float(-plogp.sum(-1).mul(kept).sum() / n_words)
        return loss, n_words, {
            "reward": float(rewards.mean()), "baseline": float(base.mean()), "entropy": round(entropy, 5),
            "sample_words": float(lengths.float().mean()) - 2.0,
            "sample_seconds": round(t1 - t0, 4), "reward_seconds": round(t2 - t1, 4),  # with greedy: its decode
        }
