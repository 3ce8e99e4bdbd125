"""Captioning end to end: training on synthetic scenes and on real Flickr8k images (CI-sized), exact
resume, captioning and evaluation from a checkpoint, bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from bnrhn.captioning import CaptionConfig, caption_images, evaluate, load_captioner, score_captions, train
from bnrhn.captioning.api import dataset_for_config
from bnrhn.cli import main
from bnrhn.encoders import find_mobilenet_weights
from bnrhn.models import ShowTell
from bnrhn.training import TrainingDiverged, load_checkpoint, read_log

DATA = Path(os.environ.get("BNRHN_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FLICKR = DATA / "flickr8k"


def _need_weights():
    try:
        find_mobilenet_weights()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _need_flickr():
    if not (FLICKR / "Flickr8k.token.txt").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR} (set BNRHN_DATA)")


@pytest.fixture(scope="module")
def cache(shared_cache):
    return shared_cache


def tiny(cache, run_dir, **kw) -> CaptionConfig:
    base = dict(cache_dir=str(cache), run_dir=str(run_dir), embed_size=32, hidden_size=32, batch_size=32,
                progress=False, lr=3e-3, dropout=0.1)
    base.update(kw)
    return CaptionConfig(**base)


def losses(run_dir):
    return [r["loss"] for r in read_log(Path(run_dir) / "log.jsonl") if r["kind"] == "train"]


# -- synthetic scenes: a real learning problem ------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_run(cache, tmp_path_factory):
    _need_weights()
    cfg = tiny(cache, tmp_path_factory.mktemp("runs") / "syn", dataset="synthetic:400,60,10", cell="lstm",
               embed_size=64, hidden_size=64, epochs=4, min_count=1)
    return train(cfg)


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_synthetic_training_beats_constant_caption(synthetic_run):
    r = synthetic_run
    first, last = losses(r.run_dir)[:10], losses(r.run_dir)[-10:]
    assert sum(last) / 10 < 0.6 * sum(first) / 10
    ds = dataset_for_config(r.config, log=lambda m: None)
    train_caps = [c for rec in ds.split("train") for c in rec.captions]
    refs = {rec.image_id: rec.captions for rec in ds.split("val")}
    # the best constant caption among the 50 commonest training captions
    consts = [c for c, _ in Counter(train_caps).most_common(50)]
    const_cider = max(score_captions({k: c for k in refs}, refs, ["CIDEr"])["CIDEr"] for c in consts)
    best = max(h["CIDEr"] for h in r.history)
    assert best > 2.0 * const_cider and best > const_cider + 0.8, (best, const_cider)
    assert r.best["CIDEr"] == best and r.best_checkpoint.is_file()
    assert [h["CIDEr"] for h in r.history][-1] > r.history[0]["CIDEr"]


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_caption_command_and_bad_files(synthetic_run, tmp_path, capsys):
    ds = dataset_for_config(synthetic_run.config, log=lambda m: None)
    img = ds.split("test")[0].path
    (tmp_path / "notes.jpg").write_text("not an image")
    rc = main(["caption", str(synthetic_run.best_checkpoint), str(img), str(tmp_path / "notes.jpg"),
               str(tmp_path / "absent.png"), "--beam", "3", "--topk", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert str(img) in out and "1. " in out and "2. " in out and "log p = -" in out
    assert "notes.jpg: not an image file" in err and "absent.png: file not found" in err
    res = caption_images(synthetic_run.best_checkpoint, [img], beam=3, topk=3)[0]
    assert len(res.captions) == 3 and res.captions[0][1] >= res.captions[1][1] >= res.captions[2][1]
    assert any(w in res.captions[0][0] for w in ("red", "green", "blue", "yellow", "purple", "orange"))


def test_nan_loss_stops_with_last_good_checkpoint(cache, tmp_path, monkeypatch):
    _need_weights()
    calls = {"n": 0}
    real = ShowTell.loss

    def poisoned(self, *a, **k):
        loss, n, parts = real(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), n, parts

    monkeypatch.setattr(ShowTell, "loss", poisoned)
    cfg = tiny(cache, tmp_path / "nan", dataset="synthetic:12,4,4", min_count=1, epochs=3)  # 60 captions: 2 batches
    with pytest.raises(TrainingDiverged, match="loss is nan at step 4"):
        train(cfg)
    ckpt = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["trainer"]["global_step"] == 2  # the end of epoch 1, the last good state
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # The saved vocabulary is the one of the training captions, built here by hand (vocab docs: lower-case
    # letter/digit runs, every word seen ≥ min_count = 1 times by decreasing count then alphabetically, after
    # the four special tokens), and the saved model decodes with it.
    loaded = load_captioner(tmp_path / "nan" / "best.pt")
    captions = [c for rec in dataset_for_config(cfg, log=lambda m: None).split("train") for c in rec.captions]
    counts = Counter(w for c in captions for w in re.findall(r"[a-z0-9]+", c.lower()))
    expected = ["<pad>", "<start>", "<end>", "<unk>"] + sorted(counts, key=lambda w: (-counts[w], w))
    assert len(counts) > 5 and loaded.vocab.words == expected
    assert loaded.model.cfg.vocab_size == len(expected) and loaded.model.out.out_features == len(expected)
    words = re.findall(r"[a-z0-9]+", captions[0].lower())
    ids = [1] + [expected.index(w) for w in words] + [2, expected.index(words[0])]  # decoding stops at <end>
    assert loaded.vocab.decode(ids) == " ".join(words)


# -- Flickr8k, CI-sized --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flickr_cfg(cache, tmp_path_factory):
    _need_weights()
    _need_flickr()
    root = tmp_path_factory.mktemp("f8k-runs")
    return lambda name, **kw: tiny(cache, root / name, **{
        "dataset": "flickr8k", "max_train_images": 48, "max_val_images": 8, "max_test_images": 8,
        "min_count": 3, "epochs": 2, **kw})


@pytest.mark.slow  # long: CI runs it (make test-slow)
@pytest.mark.data
def test_flickr8k_end_to_end_and_exact_resume(flickr_cfg, capsys):
    full = train(flickr_cfg("full", cell="bn_rhn"))
    n = len(losses(full.run_dir))
    assert n == full.steps and n >= 10
    # stop half-way through, then resume: the same losses as the uninterrupted run, bit for bit
    half = flickr_cfg("half", cell="bn_rhn", max_steps=n // 2 + 1)
    train(half)
    assert len(losses(half.run_dir)) == n // 2 + 1
    rc = main(["train", "--resume", "--run-dir", half.run_dir, "--epochs", "2", "--max-steps", str(10 * n), "--quiet"])
    assert rc == 0
    assert losses(half.run_dir) == losses(full.run_dir)

    # caption a real Flickr8k image from the checkpoint, via the command line
    test_img = FLICKR / "images" / (FLICKR / "Flickr_8k.testImages.txt").read_text().split()[0]
    capsys.readouterr()
    assert main(["caption", str(full.best_checkpoint), str(test_img), "--beam", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(test_img) and len(out) == 4 and out[1].startswith("  1. ")

    # evaluate: COCO-format results and the metrics table
    assert main(["evaluate", str(full.run_dir), "--split", "test", "--metrics", "BLEU-4", "CIDEr", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| BLEU-4 | CIDEr |" in out
    results = json.loads((full.run_dir / "eval" / "results_test.json").read_text())
    assert len(results) == 8 and set(results[0]) == {"image_id", "caption"}
    res, scores = evaluate(full.best_checkpoint, split="val", beam=2, metrics=("CIDEr",))
    assert len(res) == 8 and set(scores) == {"CIDEr"}


@pytest.mark.data
def test_resume_with_another_vocabulary_is_refused(flickr_cfg):
    cfg = flickr_cfg("vocab", max_steps=2)
    train(cfg)
    other = flickr_cfg("vocab", max_steps=4, min_count=1)  # a different vocabulary from the same data
    with pytest.raises(ValueError, match="vocabulary"):
        train(other, resume=True)
    assert load_checkpoint(Path(cfg.run_dir) / "last.pt")["trainer"]["global_step"] == 2  # untouched
    # a checkpoint whose model and vocabulary disagree is reported, not loaded
    ckpt = torch.load(Path(cfg.run_dir) / "last.pt", weights_only=True)
    ckpt["task"]["vocab"]["words"] = ckpt["task"]["vocab"]["words"][:-1]
    ckpt["task"]["vocab"]["fingerprint"] = None
    torch.save(ckpt, Path(cfg.run_dir) / "tampered.pt")
    with pytest.raises(ValueError, match="vocabulary has"):
        load_captioner(Path(cfg.run_dir) / "tampered.pt")


# -- a folder of the user's own images with problems in it ----------------------------------------------------------
@pytest.mark.data
def test_folder_with_corrupt_and_missing_images(cache, tmp_path, capsys):
    _need_weights()
    _need_flickr()
    folder = tmp_path / "mine"
    folder.mkdir()
    rows = []
    tokens = (FLICKR / "Flickr8k.token.txt").read_text().splitlines()[:100]
    for line in tokens:
        key, _, text = line.partition("\t")
        name = key.split("#")[0]
        if not (folder / name).exists():
            shutil.copy(FLICKR / "images" / name, folder / name)
        rows.append((name, text, "train"))
    names = sorted({r[0] for r in rows})
    for n in names[-3:]:
        rows = [(a, b, "val" if a == n else s) for a, b, s in rows]
    (folder / names[0]).write_bytes(b"\xff\xd8\xff garbage, not a JPEG")  # corrupt
    rows.append(("vanished.jpg", "a picture that is not there", "train"))  # absent
    rows.append((names[1], "   ", "train"))  # empty caption
    with open(folder / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        w.writerows(rows)
    logs: list[str] = []
    cfg = tiny(cache, tmp_path / "run", dataset=f"folder:{folder}", min_count=2, max_steps=2)
    from bnrhn.captioning.api import prepare_data

    data = prepare_data(cfg, log=logs.append)
    text = "\n".join(logs)
    assert "vanished.jpg" in text and "empty caption" in text and names[0] in text
    assert names[0] not in {r.image_id for r in data.train.records}
    result = train(cfg, log=logs.append)
    assert result.steps == 2 and result.best_checkpoint.is_file()
    cfg_strict = tiny(cache, tmp_path / "run2", dataset=f"folder:{folder}", strict=True, max_steps=1)
    with pytest.raises(ValueError, match="strict"):
        train(cfg_strict)
    # the command line reports the same problems without a traceback
    rc = main(["train", "--dataset", f"folder:{folder}", "--strict", "--run-dir", str(tmp_path / "run3"),
               "--cache-dir", str(cache), "--quiet"])
    assert rc == 2 and "error:" in capsys.readouterr().err
    # with the corrupt image as the only problem, --strict refuses it by its path (features stage)
    with open(folder / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        w.writerows(r for r in rows if r[0] != "vanished.jpg" and r[1].strip())
    rc = main(["features", "--dataset", f"folder:{folder}", "--strict", "--cache-dir", str(tmp_path / "c2"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and names[0] in err and "Traceback" not in err
    # without --strict the same command skips it and says so
    assert main(["features", "--dataset", f"folder:{folder}", "--cache-dir", str(tmp_path / "c2"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "1 unreadable image(s) skipped" in out.out and names[0] in out.err + out.out


def test_features_command_extracts_once_then_reuses(tmp_path, capsys):
    _need_weights()
    args = ["features", "--dataset", "synthetic:6,2,2", "--cache-dir", str(tmp_path), "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "10 images: features extracted" in first and "pooled 1280-d" in first
    folders = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert folders, "no cache folder written"
    assert main(args) == 0
    assert "10 images: features already cached" in capsys.readouterr().out
    assert main(args + ["--grid"]) == 0  # a grid needs a new extraction
    assert "grid 49x1280" in capsys.readouterr().out  # 7×7 positions × 1280 channels


def test_train_command_config_file_and_existing_run(cache, tmp_path, capsys):
    _need_weights()
    base = ["train", "--dataset", "synthetic:12,4,4", "--min-count", "1", "--embed-size", "16", "--hidden-size", "16",
            "--max-steps", "1", "--cache-dir", str(cache), "--quiet"]
    assert main(base + ["--run-dir", str(tmp_path / "a"), "--cell", "gru", "--cell-option", "bias=false"]) == 0
    capsys.readouterr()
    # an existing run is refused at once (before any data is read), naming the way out
    assert main(base + ["--run-dir", str(tmp_path / "a")]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    # a run's config.json reproduces its settings; flags override them
    assert main(["train", "--config", str(tmp_path / "a" / "config.json"), "--run-dir", str(tmp_path / "b"),
                 "--max-steps", "2", "--quiet"]) == 0
    a = json.loads((tmp_path / "a" / "config.json").read_text())["task"]
    b = json.loads((tmp_path / "b" / "config.json").read_text())["task"]
    assert b["cell"] == "gru" and b["cell_options"] == {"bias": False} and b["max_steps"] == 2
    assert {k: v for k, v in a.items() if k not in ("run_dir", "max_steps")} == \
           {k: v for k, v in b.items() if k not in ("run_dir", "max_steps")}
    # resuming refuses flags that would change the run
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "b"), "--cell", "lstm", "--quiet"]) == 2
    assert "--cell" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["caption", "evaluate"])
def test_max_len_0_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    """``--max-len 0`` used to mean the default (20): now argparse refuses it, naming the flag, and nothing is
    loaded (the checkpoint named does not even exist)."""
    args = [command, str(tmp_path / "absent.pt")] + (["x.jpg"] if command == "caption" else []) + ["--max-len", "0"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert "--max-len: must be at least 1, got 0" in capsys.readouterr().err
