"""The batch-composition diagnostic (``bnrhn analyze batchnorm``) and the batching recipe that keeps
batch-norm captioners from learning their batches' composition."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bnrhn.analysis.batchnorm import caption_leak, leak_summary, recompute_population_statistics
from bnrhn.captioning import CaptionConfig
from bnrhn.captioning.data import CaptionTensors, SplitFeatures, bucketed_batches
from bnrhn.captioning.task import resolve_batching
from bnrhn.cli import main
from bnrhn.models import CaptionerConfig, build_captioner
from bnrhn.nn import SequenceBatchNorm


def toy_data(n_images=24, per_image=3, vocab=12, max_words=9, seed=0):
    """Random image features and captions of random lengths (1..max_words words), as the pipeline stores them."""
    g = torch.Generator().manual_seed(seed)
    L = max_words + 2
    N = n_images * per_image
    lengths = torch.randint(3, L + 1, (N,), generator=g)
    tokens = torch.zeros(N, L, dtype=torch.long)
    for k in range(N):
        tokens[k, 0] = 1
        tokens[k, 1 : lengths[k] - 1] = torch.randint(4, vocab, (int(lengths[k]) - 2,), generator=g)
        tokens[k, lengths[k] - 1] = 2
    caps = CaptionTensors(tokens, lengths, torch.arange(N) // per_image)
    split = SplitFeatures([None] * n_images, torch.randn(n_images, 10, generator=g))
    return caps, split


def toy_model(cell="bn_rhn", seed=0, **cell_options):
    """A tiny captioner with population statistics; plain batch norm (momentum) unless told otherwise."""
    torch.manual_seed(seed)
    if cell.startswith("bn_"):
        cell_options = {"stats": "momentum", **cell_options}
    cfg = CaptionerConfig(vocab_size=12, feature_size=10, embed_size=8, hidden_size=8, cell=cell, dropout=0.0,
                          cell_options={"depth": 2, **cell_options} if "rhn" in cell else cell_options)
    model = build_captioner(cfg)
    caps, split = toy_data(seed=seed + 100)
    model.train()
    with torch.no_grad():  # population statistics from a few training batches
        for idx in bucketed_batches(caps.lengths, 16, 0, 0, bucket=1):
            L = int(caps.lengths[idx].max())
            model.teacher_forced_logits(split.batch(caps.image[idx]), caps.tokens[idx, :L], caps.lengths[idx])
    return model.eval()


def mean_ce(model, caps, split, batches):
    """Cross-entropy per token over ``batches`` with the model as it is (train or eval mode), by hand."""
    total, count = 0.0, 0
    for idx in batches:
        L = int(caps.lengths[idx].max())
        logits, targets, mask = model.teacher_forced_logits(split.batch(caps.image[idx]), caps.tokens[idx, :L],
                                                            caps.lengths[idx])
        total += float((F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask).sum())
        count += int(mask.sum())
    return total / count


def test_three_losses_equal_direct_computations_and_leave_the_model_alone():
    model = toy_model()
    caps, split = toy_data(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = caption_leak(model, caps, split, batch_size=16, seed=3)
    assert set(report.modes) == {"sorted", "random", "population"}
    with torch.no_grad():
        pop = mean_ce(copy.deepcopy(model).eval(), caps, split, [torch.arange(len(caps))])
        trained = copy.deepcopy(model).train()  # dropout is 0: training mode = batch statistics only
        sorted_ = mean_ce(trained, caps, split, bucketed_batches(caps.lengths, 16, 3, 0))
        random_ = mean_ce(trained, caps, split, bucketed_batches(caps.lengths, 16, 3, 0, bucket=1))
    assert report.modes["population"].loss == pytest.approx(pop, rel=1e-5)
    assert report.modes["sorted"].loss == pytest.approx(sorted_, rel=1e-5)
    assert report.modes["random"].loss == pytest.approx(random_, rel=1e-5)
    assert len({round(m.loss, 6) for m in report.modes.values()}) == 3  # three different numbers here
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # per-position bookkeeping: every target token counted once; position 1 has every row of every batch
    m = report.modes["sorted"]
    assert sum(m.per_step_tokens) == int((caps.lengths - 1).sum())
    assert m.valid_rows[0] == pytest.approx(len(caps) / math.ceil(len(caps) / 16))
    total = sum(l * n for l, n in zip(m.per_step_loss, m.per_step_tokens)) / sum(m.per_step_tokens)
    assert total == pytest.approx(m.loss, rel=1e-9)
    s = leak_summary(report)
    # the losses agree to float32 rounding (different summation orders), so their ratio to ~1e-7 absolute
    assert s["sorted_vs_random"] == pytest.approx(sorted_ / random_ - 1, abs=1e-6)


def test_train_loss_and_precise_statistics():
    model = toy_model()
    caps, split = toy_data(seed=1)
    train_caps, train_split = toy_data(seed=2)
    report = caption_leak(model, caps, split, train_caps, train_split, batch_size=16, precise_batches=3)
    with torch.no_grad():
        expect_train = mean_ce(copy.deepcopy(model).eval(), train_caps, train_split, [torch.arange(len(train_caps))])
    assert report.train_loss == pytest.approx(expect_train, rel=1e-5)
    assert leak_summary(report)["generalisation_gap"] == pytest.approx(report.modes["population"].loss - expect_train,
                                                                       abs=1e-5)
    # precise BN: the cumulative average of the batch statistics of the first 3 random training batches
    batches = bucketed_batches(train_caps.lengths, 16, 1, 0, bucket=1)[:3]
    precise = copy.deepcopy(model)

    def run(m, idx):
        L = int(train_caps.lengths[idx].max())
        m.teacher_forced_logits(train_split.batch(train_caps.image[idx]), train_caps.tokens[idx, :L],
                                train_caps.lengths[idx])

    assert recompute_population_statistics(precise, run, batches) == 3
    assert not precise.training
    bn = next(m for m in precise.modules() if isinstance(m, SequenceBatchNorm))
    assert bn.stats == "momentum" and int(bn.num_batches_tracked[0]) == 3
    with torch.no_grad():
        assert report.modes["precise"].loss == pytest.approx(mean_ce(precise, caps, split, [torch.arange(len(caps))]),
                                                             rel=1e-5)


def test_a_model_without_batch_norm_has_only_the_population_loss():
    model = toy_model("lstm")
    caps, split = toy_data(seed=1)
    report = caption_leak(model, caps, split, batch_size=16)
    assert list(report.modes) == ["population"] and "no batch normalisation" in report.notes[0]


def test_renorm_model_trains_like_it_infers_on_any_batches():
    """Unclipped batch renormalization: sorted = random = population, the property the recipe is for."""
    model = toy_model(stats="renorm", renorm_rmax=1e6, renorm_dmax=1e6, renorm_warmup=0)
    caps, split = toy_data(seed=1)
    s = leak_summary(caption_leak(model, caps, split, batch_size=16))
    assert abs(s["sorted_vs_random"]) < 1e-5 and abs(s["population_vs_random"]) < 1e-5


def test_batching_auto_is_random_for_batch_norm_decoders_only():
    for cell, expect in [("bn_rhn", "random"), ("bn_lstm", "random"), ("lstm", "bucketed"), ("rhn", "bucketed"),
                         ("bn_rhn_tf", "bucketed")]:
        model = build_captioner(CaptionerConfig(vocab_size=9, feature_size=4, embed_size=4, hidden_size=4, cell=cell))
        assert resolve_batching("auto", model) == expect, cell
        assert resolve_batching("bucketed", model) == "bucketed"
    with pytest.raises(ValueError, match="batching"):
        CaptionConfig(batching="sorted")


def test_bucketed_and_random_batches_differ_in_length_spread():
    lengths = torch.randint(3, 23, (3200,), generator=torch.Generator().manual_seed(0))
    spread = lambda bs: sum(float(lengths[b].max() - lengths[b].min()) for b in bs) / len(bs)
    sorted_, random_ = bucketed_batches(lengths, 64, 0, 0), bucketed_batches(lengths, 64, 0, 0, bucket=1)
    assert sorted(torch.cat(sorted_).tolist()) == sorted(torch.cat(random_).tolist()) == list(range(3200))
    assert spread(sorted_) < 1.0 < 15.0 < spread(random_)


def test_cli_refuses_a_bad_batch_size(tmp_path, capsys):
    assert main(["analyze", "batchnorm", str(tmp_path / "missing.pt"), "--batch-size", "1"]) != 0
    assert "--batch-size" in capsys.readouterr().err
    assert main(["analyze", "batchnorm", str(tmp_path / "missing.pt")]) != 0
    assert "missing.pt" in capsys.readouterr().err


def test_language_model_diagnostic_population_loss_equals_evaluate_ids():
    from bnrhn.analysis.batchnorm import lm_leak
    from bnrhn.lm.evaluate import evaluate_ids
    from bnrhn.models.char_lm import CharLM

    torch.manual_seed(0)
    model = CharLM(9, "bn_lstm", hidden_size=8, stats="momentum")
    ids = torch.randint(0, 9, (700,), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        model(ids[:600].view(20, 30))  # population statistics
    model.eval()
    report = lm_leak(model, ids, batch_size=4, seq_len=20)
    assert set(report.modes) == {"batch", "population"}
    expect = evaluate_ids(model, ids, batch_size=4, seq_len=20)
    assert report.modes["population"].loss == pytest.approx(expect.loss, rel=1e-6)
    assert sum(report.modes["population"].per_step_tokens) == expect.chars
    assert abs(report.modes["batch"].loss - expect.loss) > 1e-6  # batch statistics do differ (γ = 0.1: slightly)
    s = leak_summary(report)
    assert "population_vs_batch" in s and "sorted_vs_random" not in s


def test_checkpoints_keep_their_estimator():
    """A model records the estimator it was built with; one saved before that existed loads as momentum."""
    from bnrhn.cells import legacy_statistics, pin_statistics

    model = build_captioner(CaptionerConfig(vocab_size=9, feature_size=4, embed_size=4, hidden_size=4, cell="bn_rhn"))
    assert model.cfg.cell_options["stats"] == "renorm"
    assert pin_statistics("lstm", {}) == {} and pin_statistics("bn_lstm", {"stats": "cumulative"})["stats"] == "cumulative"
    assert legacy_statistics("bn_rhn", {"depth": 2}) == {"depth": 2, "stats": "momentum"}
    assert legacy_statistics("bn_rhn", {"stats": "renorm"}) == {"stats": "renorm"}
    assert legacy_statistics("rnn", {}) == {}


def test_a_language_model_saved_before_estimators_were_recorded_loads_as_momentum(tmp_path):
    from bnrhn.data.text import CharVocab
    from bnrhn.lm.task import CHECKPOINT_KIND, load_char_lm
    from bnrhn.models.char_lm import CharLM
    from bnrhn.training import save_checkpoint

    from bnrhn.cells import STATISTICS_OPTIONS

    vocab = CharVocab("abcdefgh")
    for saved_options, expect in [({}, "momentum"), ({"stats": "renorm"}, "renorm")]:
        model = CharLM(len(vocab), "bn_lstm", hidden_size=8, **saved_options)
        config = {k: v for k, v in model.config.items() if k not in STATISTICS_OPTIONS} | saved_options  # an old run's
        path = save_checkpoint(tmp_path / f"{expect}.pt", {"model": model.state_dict(), "task": {
            "kind": CHECKPOINT_KIND, "vocab": vocab.to_dict(), "model_config": config}})
        loaded = load_char_lm(path)
        assert loaded.model.cells[0].bn_h.stats == expect


def test_precise_statistics_are_plain_averages_of_batch_statistics():
    """By hand, for BN-LSTM's input-term batch norm at word position 2 (input w_1: every caption has one)."""
    model = toy_model("bn_lstm")
    caps, split = toy_data(seed=2)
    batches = bucketed_batches(caps.lengths, 16, 1, 0, bucket=1)[:3]

    def run(m, idx):
        L = int(caps.lengths[idx].max())
        m.teacher_forced_logits(split.batch(caps.image[idx]), caps.tokens[idx, :L], caps.lengths[idx])

    precise = copy.deepcopy(model)
    recompute_population_statistics(precise, run, batches)
    cell = model.rnn.cells[0]
    with torch.no_grad():
        z = [model.embed(caps.tokens[idx, 1]) @ cell.weight_ih.t() for idx in batches]  # W_x x at step 2
    bn = precise.rnn.cells[0].bn_x
    assert torch.allclose(bn.running_mean[2], torch.stack([v.mean(0) for v in z]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var[2], torch.stack([v.var(0, unbiased=True) for v in z]).mean(0), atol=1e-4)
    assert int(bn.num_batches_tracked[2]) == 3


def test_buffers_restored_undoes_training_mode_updates():
    from bnrhn.analysis.batchnorm import _buffers_restored

    bn = SequenceBatchNorm(3, max_steps=2, stats="momentum")
    before = {k: v.clone() for k, v in bn.named_buffers()}
    with _buffers_restored(bn):
        bn(torch.randn(2, 5, 3) * 4 + 2)
        assert not torch.equal(bn.running_mean, before["running_mean"])
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k


def test_resuming_a_run_refuses_another_estimator(tmp_path):
    """A run saved without a recorded estimator trained with momentum: resuming it under the renorm default
    is refused; with its own estimator it goes on."""
    from bnrhn.captioning.api import _check_resumable
    from bnrhn.captioning.task import CHECKPOINT_KIND
    from bnrhn.data.vocab import Vocabulary
    from bnrhn.training import save_checkpoint

    vocab = Vocabulary.build(["a b c d e"], min_count=1)
    old_model_config = {"cell": "bn_rhn", "cell_options": {"depth": 2}}
    path = save_checkpoint(tmp_path / "last.pt", {"task": {"kind": CHECKPOINT_KIND, "vocab": vocab.to_dict(),
                                                           "model_config": old_model_config}})
    with pytest.raises(ValueError, match="cannot resume.*momentum"):
        _check_resumable(path, vocab, CaptionConfig(cell="bn_rhn", cell_options={"depth": 2}))
    _check_resumable(path, vocab, CaptionConfig(cell="bn_rhn", cell_options={"depth": 2, "stats": "momentum"}))


def test_min_rows_above_the_batch_size_is_refused():
    with pytest.raises(ValueError, match="min_rows=80 exceeds the batch size 64"):
        CaptionConfig(cell="bn_rhn", cell_options={"min_rows": 80}, batch_size=64)
