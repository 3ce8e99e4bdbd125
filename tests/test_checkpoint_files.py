"""Checkpoint files a user may hand to bnrhn by mistake or malice: clear refusals that never suggest running
the file's code, and models with non-finite weights refused at load."""

from __future__ import annotations

import pickle

import pytest
import torch

from bnrhn.training import check_finite_weights, load_checkpoint, save_checkpoint


class _Payload:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/bnrhn-pwned-by-test",))


def test_a_pickle_with_code_is_refused_without_advice_to_unsafe_load(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "x", "obj": _Payload()}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "does not load, for safety" in msg and "weights_only" not in msg and "False" not in msg
    import os

    assert not os.path.exists("/tmp/bnrhn-pwned-by-test")


def test_empty_and_truncated_files_say_why(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_checkpoint(empty)
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(100)}})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"corrupt or truncated\?\): \S"):  # a reason follows, never empty
        load_checkpoint(cut)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="plain.pt"):
        load_checkpoint(plain)


def test_non_finite_weights_are_refused():
    check_finite_weights({"a": torch.ones(3), "steps": torch.tensor([4])}, "m.pt")
    with pytest.raises(ValueError, match=r"m.pt: the model's weights are not finite .*'b'"):
        check_finite_weights({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, "m.pt")


def test_loaders_refuse_a_nan_model(tmp_path):
    """bnrhn caption/evaluate (load_captioner) and the LM commands (load_char_lm) refuse before decoding."""
    from bnrhn.data.text import CharVocab
    from bnrhn.lm.task import CHECKPOINT_KIND, load_char_lm
    from bnrhn.models.char_lm import CharLM

    vocab = CharVocab("abc")
    model = CharLM(len(vocab), "lstm", hidden_size=4)
    state = model.state_dict()
    state["decoder.bias"][0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.pt", {"model": state, "task": {
        "kind": CHECKPOINT_KIND, "vocab": vocab.to_dict(), "model_config": model.config}})
    with pytest.raises(ValueError, match="decoder.bias"):
        load_char_lm(path)


def test_load_captioner_refuses_a_nan_model(tmp_path):
    from bnrhn.captioning import load_captioner
    from bnrhn.captioning.task import CHECKPOINT_KIND
    from bnrhn.data.vocab import Vocabulary
    from bnrhn.models import CaptionerConfig, build_captioner

    vocab = Vocabulary.build(["a b c d e"], min_count=1)
    cfg = CaptionerConfig(vocab_size=len(vocab), feature_size=4, embed_size=4, hidden_size=4)
    state = build_captioner(cfg).state_dict()
    state["out.weight"][0, 0] = float("inf")
    path = save_checkpoint(tmp_path / "best.pt", {"model": state, "task": {
        "kind": CHECKPOINT_KIND, "vocab": vocab.to_dict(), "model_config": cfg.to_dict(), "config": {}}})
    with pytest.raises(ValueError, match="out.weight"):
        load_captioner(path)
