"""Caption data: tokenisation, vocabulary, the four readers, bad input, synthetic scenes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnrhn.data import (
    Vocabulary,
    assign_splits,
    make_scene,
    read_coco,
    read_flickr8k,
    read_folder,
    read_karpathy,
    synthetic_dataset,
    tokenize,
)
from bnrhn.data.vocab import SPECIALS

DATA = Path(os.environ.get("BNRHN_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FLICKR = DATA / "flickr8k"


def _img(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


# -- tokenisation and vocabulary ------------------------------------------------------------------------
def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A dog's ball, on the GRASS!") == ["a", "dog", "s", "ball", "on", "the", "grass"]
    assert tokenize("  tri-colored   dog . ") == ["tri", "colored", "dog"]
    assert tokenize(" . ,; ") == []


def test_vocabulary_min_count_specials_and_order():
    caps = ["a dog runs", "a dog sits", "a cat runs", "the bird"]
    v = Vocabulary.build(caps, min_count=2)
    assert v.words[:4] == list(SPECIALS)
    assert v.words[4:] == ["a", "dog", "runs"]  # count desc, then alphabetical; cat/sits/the/bird dropped
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    ids = v.encode("A cat runs.")
    assert ids == [v.start_id, v.index["a"], v.unk_id, v.index["runs"], v.end_id]
    assert v.decode(ids) == "a <unk> runs"
    assert v.decode(ids, keep_unk=False) == "a runs"
    assert v.encode("a dog runs a dog", max_len=2) == [1, v.index["a"], v.index["dog"], 2]
    assert v.decode([v.index["dog"], v.end_id, v.index["a"]]) == "dog"


def test_vocabulary_roundtrip_and_fingerprint():
    v = Vocabulary.build(["x y z", "x y", "x"], min_count=1)
    w = Vocabulary.from_dict(json.loads(json.dumps(v.to_dict())))
    assert w == v and w.fingerprint == v.fingerprint
    other = Vocabulary.build(["x y z", "x y", "x q"], min_count=1)
    assert other.fingerprint != v.fingerprint
    bad = v.to_dict()
    bad["words"] = bad["words"][:-1]
    with pytest.raises(ValueError, match="fingerprint"):
        Vocabulary.from_dict(bad)
    with pytest.raises(ValueError, match="min-count"):
        Vocabulary.build(["a b"], min_count=5)


# -- readers ------------------------------------------------------------------------------------------------
def test_karpathy_reader(tmp_path):
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        _img(tmp_path / "images" / n)
    data = {"dataset": "flickr8k", "images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"tokens": ["a", "cat"]}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "A bird."}, {"raw": "a small bird"}]},
    ]}
    f = tmp_path / "dataset_flickr8k.json"
    f.write_text(json.dumps(data))
    ds = read_karpathy(f)
    assert ds.name == "flickr8k"
    assert ds.counts() == {"train": 2, "val": 1, "test": 0}  # restval counts as train
    rec = {r.image_id: r for r in ds.records}
    assert rec["b.jpg"].captions == ["a cat"]
    assert rec["c.jpg"].path == tmp_path / "images" / "c.jpg"
    assert rec["c.jpg"].captions == ["A bird.", "a small bird"]


def _hash_split(image_id: str, val: float, test: float) -> str:
    """The documented rule, by hand: u = the first 8 bytes of sha256(id), big-endian, / 2^64; test if u < test,
    val if u < test + val, else train."""
    u = int(hashlib.sha256(image_id.encode()).hexdigest()[:16], 16) / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def test_coco_reader_splits_deterministically(tmp_path):
    ids = (1, 2, 8, 9)
    for i in ids:
        _img(tmp_path / "val2017" / f"{i:012d}.jpg")
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
            "annotations": [{"image_id": 1, "caption": "A man."}, {"image_id": 2, "caption": "A woman."},
                            {"image_id": 1, "caption": "A person."}, {"image_id": 8, "caption": "A dog."},
                            {"image_id": 9, "caption": "A cat."}]}
    f = tmp_path / "captions_val2017.json"
    f.write_text(json.dumps(data))
    ds = read_coco(f)
    assert {r.image_id: r.captions for r in ds.records} == {"1": ["A man.", "A person."], "2": ["A woman."],
                                                            "8": ["A dog."], "9": ["A cat."]}
    # u(id) = 0.420, 0.830, 0.173, 0.099 for ids 1, 2, 8, 9 (sha256 of the id's decimal string)
    assert {r.image_id: r.split for r in ds.records} == {"1": "train", "2": "train", "8": "val", "9": "test"}
    assert {r.image_id: r.split for r in read_coco(f, val_fraction=0.5, test_fraction=0.0).records} == \
        {"1": "val", "2": "train", "8": "val", "9": "val"}
    assert read_coco(f, split="test").counts()["test"] == 4
    names = [str(i) for i in range(2000)]
    s = assign_splits(names, 0.1, 0.1)
    frac = np.mean([v == "test" for v in s.values()])
    assert 0.07 < frac < 0.13 and s == {i: _hash_split(i, 0.1, 0.1) for i in names}
    assert assign_splits(names, 0.3, 0.05) == {i: _hash_split(i, 0.3, 0.05) for i in names}


def test_folder_reader_csv_and_jsonl(tmp_path):
    for n in ("x.png", "y.png", "z.png"):
        _img(tmp_path / n)
    (tmp_path / "captions.csv").write_text(
        "image,caption,split\nx.png,a red square,train\nx.png,\"red, square\",train\ny.png,a blue thing,val\n")
    ds = read_folder(tmp_path)
    assert ds.counts() == {"train": 1, "val": 1, "test": 0}
    assert ds.split("train")[0].captions == ["a red square", "red, square"]
    j = tmp_path / "caps.jsonl"
    j.write_text('{"image": "x.png", "captions": ["one", "two"]}\n\n{"file": "z.png", "caption": "three"}\n')
    ds = read_folder(tmp_path, j)
    assert sorted(r.image_id for r in ds.records) == ["x.png", "z.png"]
    (tmp_path / "bad.csv").write_text("picture,words\nx.png,hello\n")
    with pytest.raises(ValueError, match="header must name an image column"):
        read_folder(tmp_path, tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_folder(tmp_path, tmp_path / "bad.jsonl")


def test_empty_caption_and_absent_image_are_reported_or_refused(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "captions.csv").write_text(
        "image,caption\na.png,a red square\na.png,  ...  \nb.png,a square\nghost.png,a ghost\n")
    ds = read_folder(tmp_path)
    assert sorted(r.image_id for r in ds.records) == ["a.png", "b.png"]
    assert ds.split("train") + ds.split("val") + ds.split("test")
    text = "\n".join(ds.problems)
    assert "captions.csv:3: empty caption for image 'a.png'" in text
    assert "ghost.png" in text and "does not exist" in text and "captions.csv:5" in text
    with pytest.raises(ValueError, match=r"captions.csv:3: empty caption.*strict"):
        read_folder(tmp_path, strict=True)
    (tmp_path / "only_ghosts.csv").write_text("image,caption\nghost.png,boo\n")
    with pytest.raises(ValueError, match="no usable images"):
        read_folder(tmp_path, tmp_path / "only_ghosts.csv")


def test_flickr8k_text_format(tmp_path):
    root = tmp_path / "f8k"
    for n in ("1.jpg", "2.jpg", "3.jpg"):
        _img(root / "images" / n)
    (root / "Flickr8k.token.txt").write_text(
        "1.jpg#0\tA dog runs .\n1.jpg#1\tA dog .\n2.jpg#0\tA cat .\n3.jpg#0\tA bird .\n9.jpg.1#0\tjunk key .\n")
    (root / "Flickr_8k.trainImages.txt").write_text("1.jpg\n2.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("3.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("")
    ds = read_flickr8k(root)
    assert ds.counts() == {"train": 2, "val": 1, "test": 0}
    assert ds.split("train")[0].captions == ["A dog runs .", "A dog ."]
    assert any("in no split file" in p for p in ds.problems)
    (root / "Flickr8k.token.txt").write_text("1.jpg#0 no tab here\n")
    with pytest.raises(ValueError, match=r"Flickr8k.token.txt:1: expected"):
        read_flickr8k(root)
    with pytest.raises(FileNotFoundError, match="token file"):
        read_flickr8k(tmp_path / "nowhere")


@pytest.mark.data
def test_real_flickr8k_split_sizes():
    if not (FLICKR / "Flickr8k.token.txt").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR} (set BNRHN_DATA)")
    ds = read_flickr8k(FLICKR)
    assert ds.counts() == {"train": 6000, "val": 1000, "test": 1000}
    assert sum(len(r.captions) for r in ds.records) == 40000


# -- synthetic scenes ------------------------------------------------------------------------------------------
def test_synthetic_scenes_are_deterministic_and_described():
    img1, caps1, scene = make_scene(3, 17)
    img2, caps2, _ = make_scene(3, 17)
    assert np.array_equal(np.asarray(img1), np.asarray(img2)) and caps1 == caps2
    assert len(caps1) == 5 and len(set(caps1)) == 5
    for g in scene.groups:
        assert all(g.colour in c for c in caps1) and all(g.shape in c for c in caps1)
    img3, caps3, _ = make_scene(3, 18)
    assert not np.array_equal(np.asarray(img1), np.asarray(img3))


def test_synthetic_dataset_is_written_once_and_reused(tmp_path):
    ds = synthetic_dataset(tmp_path, 6, 2, 2)
    assert ds.counts() == {"train": 6, "val": 2, "test": 2}
    assert all(r.path.is_file() for r in ds.records)
    mtimes = [r.path.stat().st_mtime_ns for r in ds.records]
    ds2 = synthetic_dataset(tmp_path, 6, 2, 2)
    assert [r.captions for r in ds2.records] == [r.captions for r in ds.records]
    assert [r.path.stat().st_mtime_ns for r in ds2.records] == mtimes
    # the first scenes do not depend on how many are asked for
    ds3 = synthetic_dataset(tmp_path, 8, 2, 2)
    assert [r.captions for r in ds3.records[:6]] == [r.captions for r in ds.records[:6]]


def test_folder_reader_accepts_excels_byte_order_mark(tmp_path):
    for n in ("x.png", "y.png"):
        _img(tmp_path / n)
    (tmp_path / "captions.csv").write_bytes("image,caption\nx.png,a red square\ny.png,a blue thing\n".encode("utf-8-sig"))
    ds = read_folder(tmp_path)
    assert sorted(r.image_id for r in ds.records) == ["x.png", "y.png"]
    (tmp_path / "captions.csv").unlink()
    (tmp_path / "c.jsonl").write_bytes('{"image": "x.png", "caption": "one"}\n'.encode("utf-8-sig"))
    assert [r.image_id for r in read_folder(tmp_path, tmp_path / "c.jsonl").records] == ["x.png"]


def test_unknown_fraction_flags_captions_without_spaces():
    from bnrhn.data.vocab import Vocabulary, unknown_fraction

    chinese = ["一只狗在草地上奔跑"] * 5 + [f"第{i}只猫睡在床上" for i in range(20)]
    v = Vocabulary.build(chinese, min_count=5)
    assert len(v) == 5 and unknown_fraction(chinese, v) == 0.8  # each caption is one "word"; 20 of 25 rare
    english = ["a dog runs on the grass", "a dog plays in the snow"] * 5
    assert unknown_fraction(english, Vocabulary.build(english, min_count=5)) == 0.0
