"""Self-critical sequence training: the CIDEr-D reward against coco-caption's scorer, the policy-gradient
loss against the equation written out, its sign, and a short SCST run on the synthetic scenes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bnrhn.captioning import CaptionConfig, train
from bnrhn.captioning.data import caption_rows
from bnrhn.captioning.scst import SelfCritical, training_reward
from bnrhn.cli import main
from bnrhn.data.vocab import Vocabulary
from bnrhn.decoding.search import Hypothesis
from bnrhn.metrics import score
from bnrhn.metrics.cider import CiderDReward
from bnrhn.models import CaptionerConfig, build_captioner
from bnrhn.training import read_log

WORDS = "a man dog runs on the grass red ball child plays in water two people sit bench".split()


def random_corpus(n_images=40, seed=0):
    rng = random.Random(seed)
    refs = [[" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(rng.randint(1, 5))]
            for _ in range(n_images)]
    cands = [" ".join(rng.choices(WORDS, k=rng.randint(0, 9))) for _ in range(n_images)]
    return refs, cands


def test_reward_equals_coco_caption_cider_d_over_the_corpus():
    refs, cands = random_corpus()
    reward = CiderDReward(refs)
    got = reward(cands, range(len(cands)))
    ours = score(dict(enumerate(cands)), dict(enumerate(refs)), "cider", tokenizer=None)
    np.testing.assert_allclose(got, [ours.per_image[i]["CIDEr"] for i in range(len(cands))], rtol=0, atol=1e-12)
    assert got.std() > 0.1  # the captions differ: a real comparison, not all zeros
    from pycocoevalcap.cider.cider import Cider  # a dependency of the package

    _, per = Cider().compute_score(dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)})
    np.testing.assert_allclose(got, per, rtol=0, atol=1e-12)


def test_reward_of_a_caption_does_not_depend_on_the_batch():
    """Document frequencies are the corpus's: an image scored alone, twice, or among others gets the same
    reward (coco-caption on the subset alone would count frequencies on the subset and differ)."""
    refs, cands = random_corpus()
    reward = CiderDReward(refs)
    full = reward(cands, range(len(cands)))
    pick = [3, 3, 7, 1, 0]
    np.testing.assert_allclose(reward([cands[i] for i in pick], pick), full[pick], rtol=0, atol=1e-12)
    subset = score({i: cands[i] for i in (1, 3, 7)}, {i: refs[i] for i in (1, 3, 7)}, "cider", tokenizer=None)
    assert any(abs(subset.per_image[i]["CIDEr"] - full[i]) > 1e-3 for i in (1, 3, 7))
    # an unseen word matches nothing and an empty caption scores 0
    assert reward(["", "zebra zebra"], [0, 0]).tolist() == [0.0, 0.0]


def test_scst_reward_equals_score_on_raw_captions():
    """training_reward tokenizes the references and SelfCritical.captions the candidates as score() does:
    the per-image reward of raw text equals score()'s CIDEr-D with its default PTB tokenisation."""
    refs = [["A dog runs on the grass.", "The brown dog is running!"], ["Two people sit, on a bench."],
            ["A child can't swim in the water", "kids play in water"]]
    vocab = Vocabulary(["a", "dog", "runs", "on", "grass", "the", "two", "people", "sit", "bench", "child", "in",
                        "water", "cannot"])
    words = [["a", "dog", "runs", "on", "the", "grass"], ["two", "people", "sit", "on", "a", "bench"],
             ["a", "child", "cannot", "in", "water"]]
    hyps = [Hypothesis([vocab.index[w] for w in ws], 0.0, 0.0) for ws in words]
    sc = SelfCritical(training_reward(refs), vocab)
    got = sc.reward(sc.captions(hyps), [0, 1, 2])
    expected = score({i: " ".join(ws) for i, ws in enumerate(words)}, dict(enumerate(refs)), "cider")
    np.testing.assert_allclose(got, [expected.per_image[i]["CIDEr"] for i in range(3)], rtol=0, atol=1e-12)
    assert sc.captions(hyps)[2] == "a child can not in water"  # PTB splits "cannot", as coco-caption does


# -- the loss ---------------------------------------------------------------------------------------------------
def tiny_setup(cell="lstm", seed=0):
    """A small Show and Tell model (no dropout) and a reward whose references favour some of its words."""
    torch.manual_seed(seed)
    words = ["red", "blue", "star", "ball", "big"]
    vocab = Vocabulary(words)
    cfg = CaptionerConfig(model="show_tell", vocab_size=len(vocab), feature_size=6, embed_size=16, hidden_size=16,
                          cell=cell, dropout=0.0, pad_id=vocab.pad_id, start_id=vocab.start_id,
                          end_id=vocab.end_id, unk_id=vocab.unk_id)
    model = build_captioner(cfg)
    feats = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed + 1))
    reward = CiderDReward([["red star", "a red star"], ["blue ball", "big blue ball"], ["big star"], ["red ball"]])
    return model, feats, vocab, reward


@torch.no_grad()
def stepwise_logprob(model, feats, hyps, end_id, max_len=None):
    """log p(w_1 .. w_n <end>) of each caption under the sampler's distribution, through the decoding interface
    (model.start / model.step), one caption at a time: an independent path from the teacher-forced pass the
    loss uses. The sampler never draws <pad>, <start>, <unk> (renormalised away here) and forces <end> after
    max_len words (no term)."""
    model.eval()
    cfg = model.cfg
    allowed = [i for i in range(cfg.vocab_size) if i not in (cfg.pad_id, cfg.start_id, cfg.unk_id)]
    out = []
    for f, h in zip(feats, hyps):
        state = model.start(f.unsqueeze(0))
        prev = torch.tensor([cfg.start_id])
        total = 0.0
        words = h.tokens if max_len is not None and len(h.tokens) == max_len else [*h.tokens, end_id]
        for w in words:
            logp, state = model.step(prev, state)
            total += float(logp[0, w] - torch.logsumexp(logp[0, allowed].double(), 0))
            prev = torch.tensor([w])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_loss_is_the_policy_gradient_written_out(baseline, monkeypatch):
    """L = −Σ_j (r_j − b_j) Σ_t log p(w^j_t) / (words): rewards, baselines and log p recomputed here."""
    model, feats, vocab, reward = tiny_setup()
    sc = SelfCritical(reward, vocab, samples=3, baseline=baseline, max_len=3, policy="eval")
    seen = {}
    import bnrhn.captioning.scst as scst_module

    real = scst_module.decode

    def recording(model_, features, method, **kw):
        out = real(model_, features, method, **kw)
        seen[method] = [h[0] for h in out]
        return out

    monkeypatch.setattr(scst_module, "decode", recording)
    torch.manual_seed(5)
    images = torch.tensor([0, 1, 2, 3])
    loss, n_words, parts = sc.loss(model, feats, images)

    hyps = seen["sample"]
    texts = [vocab.decode(h.tokens) for h in hyps]
    r = np.array([reward([t], [i // 3])[0] for i, t in enumerate(texts)])  # one caption at a time
    if baseline == "mean":
        b = np.array([(r[(i // 3) * 3:(i // 3) * 3 + 3].sum() - r[i]) / 2 for i in range(len(r))])
    else:
        g = [vocab.decode(h.tokens) for h in seen["greedy"]]
        b = np.array([reward([g[i // 3]], [i // 3])[0] for i in range(len(r))])
    logp = stepwise_logprob(model, feats.repeat_interleave(3, 0), hyps, vocab.end_id, max_len=3)
    words = sum(len(h.tokens) + (len(h.tokens) < 3) for h in hyps)
    assert any(len(h.tokens) == 3 for h in hyps) and any(len(h.tokens) < 3 for h in hyps)  # both cases met
    expected = -float((torch.tensor(r - b) * logp).sum()) / words
    assert n_words == words
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert parts["reward"] == pytest.approx(r.mean()) and parts["baseline"] == pytest.approx(b.mean())
    assert np.ptp(r) > 0  # the samples were rewarded differently: the test compares something


def test_a_caption_above_its_baseline_becomes_more_probable():
    model, feats, vocab, reward = tiny_setup(seed=3)
    sc = SelfCritical(reward, vocab, samples=6, baseline="mean", max_len=5, policy="eval")
    import bnrhn.captioning.scst as scst_module

    torch.manual_seed(1)
    feats1 = feats[:1]
    hyps = [h[0] for h in scst_module.decode(model, feats1.repeat_interleave(6, 0), "sample", max_len=5)]
    r = reward([vocab.decode(h.tokens) for h in hyps], [0] * 6)
    assert np.ptp(r) > 0, "the samples need different rewards for this test"
    before = stepwise_logprob(model, feats1.repeat_interleave(6, 0), hyps, vocab.end_id)
    torch.manual_seed(1)  # the loss draws the same six samples
    loss, _, _ = sc.loss(model, feats1, torch.tensor([0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = stepwise_logprob(model, feats1.repeat_interleave(6, 0), hyps, vocab.end_id)
    best, worst = int(np.argmax(r)), int(np.argmin(r))
    assert float(after[best]) > float(before[best])
    assert float(after[worst]) < float(before[worst])


@pytest.mark.parametrize("policy", ["train", "eval"])
def test_policy_mode_of_the_log_probability_pass(policy):
    """policy="train": the pass runs in training mode (batch statistics of the samples: the population
    statistics move); policy="eval": in eval mode (population statistics untouched). Either way the same
    seed and weights give the same loss."""
    import copy

    torch.manual_seed(0)
    vocab = Vocabulary(["red", "blue", "star", "ball", "big"])
    cfg = CaptionerConfig(model="show_tell", vocab_size=len(vocab), feature_size=6, embed_size=16, hidden_size=16,
                          cell="bn_rhn", dropout=0.3)
    model = build_captioner(cfg)
    start = copy.deepcopy(model.state_dict())
    feats = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    reward = CiderDReward([["red star"], ["blue ball"], ["big star"], ["red ball"]])
    sc = SelfCritical(reward, vocab, samples=3, max_len=4, policy=policy)
    stats = {k: v.clone() for k, v in start.items() if "running" in k}
    assert stats, "the cell has population statistics"
    losses = []
    for _ in range(2):
        model.load_state_dict(start)
        torch.manual_seed(1)
        losses.append(float(sc.loss(model, feats, torch.arange(4))[0].detach()))
        assert model.training == (policy == "train")
    moved = any(not torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert moved == (policy == "train")
    assert losses[0] == losses[1]


def test_caption_rows_and_argument_errors():
    vocab = Vocabulary(["x", "y"])
    tokens, lengths = caption_rows([[4, 5], []], vocab.start_id, vocab.end_id, vocab.pad_id)
    assert tokens.tolist() == [[1, 4, 5, 2], [1, 2, 0, 0]] and lengths.tolist() == [4, 2]
    reward = CiderDReward([["x y"]])
    with pytest.raises(ValueError, match="at least 2 samples"):
        SelfCritical(reward, vocab, samples=1, baseline="mean")
    with pytest.raises(ValueError, match="baseline"):
        SelfCritical(reward, vocab, baseline="max")
    with pytest.raises(ValueError, match="--init"):
        CaptionConfig(objective="scst")
    with pytest.raises(ValueError, match="objective"):
        CaptionConfig(objective="rl")
    with pytest.raises(IndexError):
        reward(["x"], [1])


# -- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # about a minute: CI runs it (make test-slow)
def test_scst_raises_validation_cider_over_its_cross_entropy_start(feature_cache, tmp_path, capsys):
    common = dict(dataset="synthetic:400,60,10", cache_dir=str(feature_cache), embed_size=64, hidden_size=64,
                  min_count=1, progress=False, dropout=0.1)
    xe = train(CaptionConfig(run_dir=str(tmp_path / "xe"), cell="lstm", lr=3e-3, batch_size=32, epochs=3,
                             **common))
    # the command line takes the data and model settings from --init
    code = main(["train", "--objective", "scst", "--init", str(xe.best_checkpoint), "--lr", "1e-4",
                 "--batch-size", "20", "--epochs", "4", "--run-dir", str(tmp_path / "scst"), "--quiet",
                 "--cache-dir", str(feature_cache)])
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "scst"
    start = json.loads((run / "init_validation.json").read_text())
    assert start["CIDEr"] == pytest.approx(xe.best["CIDEr"], abs=1e-9)
    vals = [r for r in read_log(run / "log.jsonl") if r["kind"] == "validation"]
    best = max(v["CIDEr"] for v in vals)
    assert best > start["CIDEr"] + 0.02, (start, vals)
    steps = [r for r in read_log(run / "log.jsonl") if r["kind"] == "train"]
    assert all(0 <= r["reward"] <= 10 and r["entropy"] > 0 for r in steps)
    assert (run / "loss.png").stat().st_size > 10_000
    saved = json.loads((run / "config.json").read_text())["task"]
    assert saved["objective"] == "scst" and saved["hidden_size"] == 64 and saved["dataset"] == "synthetic:400,60,10"
    # a model of another shape cannot start from this checkpoint
    with pytest.raises(ValueError, match="hidden_size"):
        train(CaptionConfig(run_dir=str(tmp_path / "bad"), objective="scst", init=str(xe.best_checkpoint),
                            **{**common, "hidden_size": 32}))


@pytest.mark.slow  # about 15 s (features + two runs); CI runs it (make test-slow)
def test_scst_command_end_to_end_in_a_few_steps(feature_cache, tmp_path, capsys):
    """The plumbing in seconds: --init takes the checkpoint's settings, validation before the first step,
    the reward logged per step, loss.png with the reward panel; refusals before any feature is read."""
    from bnrhn.captioning.api import _read_init

    common = ["--dataset", "synthetic:30,8,4", "--cache-dir", str(feature_cache), "--quiet"]
    assert main(["train", *common, "--embed-size", "16", "--hidden-size", "16", "--min-count", "1",
                 "--max-steps", "3", "--run-dir", str(tmp_path / "xe")]) == 0
    ckpt = tmp_path / "xe" / "last.pt"
    run = tmp_path / "scst"
    assert main(["train", "--objective", "scst", "--init", str(ckpt), "--lr", "5e-5", "--batch-size", "8",
                 "--max-steps", "2", "--run-dir", str(run), "--cache-dir", str(feature_cache), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "init: validation" in err and "baseline mean" in err and "warning" not in err
    rows = list(read_log(run / "log.jsonl"))
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 2 and all({"reward", "baseline", "entropy", "sample_words"} <= set(r) for r in steps)
    assert json.loads((run / "init_validation.json").read_text())["init"] == str(ckpt)
    assert (run / "loss.png").stat().st_size > 5_000
    # a high learning rate is warned about
    assert main(["train", "--objective", "scst", "--init", str(ckpt), "--batch-size", "8", "--max-steps", "1",
                 "--run-dir", str(tmp_path / "fast"), "--cache-dir", str(feature_cache), "--quiet"]) == 0
    assert "learning rate 0.001 is high" in capsys.readouterr().err
    # refused before any data is read: another model shape, another encoder setting, not a captioner
    with pytest.raises(ValueError, match=r"hidden_size 16 \(this run: 32\)"):
        _read_init(ckpt, CaptionConfig(dataset="synthetic:30,8,4", embed_size=16, hidden_size=32))
    with pytest.raises(ValueError, match=r"resize 'squash' \(this run: 'crop'\)"):
        _read_init(ckpt, CaptionConfig(dataset="synthetic:30,8,4", embed_size=16, hidden_size=16, resize="crop"))
    torch.save({"format": "bnrhn-checkpoint", "task": {"kind": "bnrhn-lm"}}, tmp_path / "lm.pt")
    with pytest.raises(ValueError):
        _read_init(tmp_path / "lm.pt", CaptionConfig())


def test_packed_ngram_keys():
    """A table built with a fixed word numbering counts the same n-grams as one without, and its keys are
    one per distinct n-gram across orders (written out here from the words)."""
    from bnrhn.metrics.ngrams import KEY_BASE, build_ngram_table

    refs, cands = random_corpus(12)
    sentences = cands + [s for r in refs for s in r] + ["zebra a zebra"]  # an unseen word
    words = {w: i for i, w in enumerate(WORDS)}
    plain, keyed = build_ngram_table(sentences), build_ngram_table(sentences, words=words)
    assert plain.n_grams == keyed.n_grams  # gram ids follow the numbering; the (sentence, count) pairs do not
    assert sorted(zip(plain.sent.tolist(), plain.count.tolist())) == sorted(zip(keyed.sent.tolist(),
                                                                              keyed.count.tolist()))
    seen = {}
    for sentence in sentences:
        toks = sentence.split()
        for k in range(1, 5):
            for i in range(len(toks) - k + 1):
                ids = [words.get(w, len(words)) for w in toks[i:i + k]]  # "zebra" is the one unseen word
                key = 0
                for w in ids:
                    key = key * KEY_BASE + w + 1
                seen[key] = tuple(toks[i:i + k])
    assert sorted(int(k) for k in keyed.keys) == sorted(seen)
    with pytest.raises(ValueError, match="document_frequency"):
        from bnrhn.metrics.cider import cider_d

        cider_d(keyed, 1, np.zeros(1, dtype=np.int64), document_frequency=np.zeros(keyed.n_grams))
