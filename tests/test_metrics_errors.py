"""Bad input gives clear errors naming the image or the entry; unicode and empty strings are fine."""

from __future__ import annotations

import json

import pytest

from bnrhn.cli import main
from bnrhn.metrics import parse_metrics, score
from bnrhn.metrics.files import load_references, load_results, match_references, References

IN_PROCESS = "bleu,rouge,cider"


def test_candidate_without_references_names_the_id():
    with pytest.raises(ValueError, match=r"no references for image id 'img-7'"):
        score({"img-1": "a dog", "img-7": "a cat"}, {"img-1": ["a dog"]}, metrics=IN_PROCESS)


def test_caption_not_a_string_names_the_id():
    with pytest.raises(ValueError, match=r"candidate caption of image 3 is not a string"):
        score({3: 42}, {3: ["a dog"]}, metrics=IN_PROCESS)
    with pytest.raises(ValueError, match=r"reference #1 of image 3 is not a string"):
        score({3: "a dog"}, {3: ["a dog", None]}, metrics=IN_PROCESS)


def test_references_must_be_a_non_empty_list():
    with pytest.raises(ValueError, match=r"references of image 3 must be a list"):
        score({3: "a dog"}, {3: "a dog"}, metrics=IN_PROCESS)
    with pytest.raises(ValueError, match=r"image 3 has an empty list of references"):
        score({3: "a dog"}, {3: []}, metrics=IN_PROCESS)


def test_no_candidates_and_unknown_metric_or_tokenizer():
    with pytest.raises(ValueError, match="no candidate"):
        score({}, {1: ["a"]})
    with pytest.raises(ValueError, match="unknown metric 'spice'"):
        score({1: "a"}, {1: ["a"]}, metrics="bleu,spice")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        score({1: "a"}, {1: ["a"]}, metrics="bleu", tokenizer="nltk")
    assert parse_metrics("CIDEr-D, ROUGE_L,bleu") == ("bleu", "rouge", "cider")


def test_pycocoevalcap_style_single_item_lists_are_accepted():
    a = score({1: ["a dog runs"]}, {1: ["a dog runs fast"]}, metrics=IN_PROCESS)
    b = score({1: "a dog runs"}, {1: ["a dog runs fast"]}, metrics=IN_PROCESS)
    assert a.corpus == b.corpus


def test_unicode_and_empty_strings():
    cands = {1: "", 2: "Un caf\u00e9 \u00e0 Paris \U0001F600", 3: "\u65e5\u672c\u306e\u72ac", 4: "...", 5: "a dog"}
    refs = {1: ["a dog on grass"], 2: ["un caf\u00e9 \u00e0 paris", "a caf\u00e9"], 3: ["\u65e5\u672c\u306e\u72ac"],
            4: ["!!!", "a cat"], 5: ["", "a dog"]}
    result = score(cands, refs, metrics=IN_PROCESS)
    assert result.per_image[1] == {k: 0.0 for k in result.per_image[1]}    # empty candidate scores 0
    assert result.per_image[2]["ROUGE-L"] == pytest.approx(1.0)             # case and emoji do not count
    assert result.per_image[3]["ROUGE-L"] == pytest.approx(1.0)
    assert result.per_image[5]["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= v for v in result.corpus.values())
    json.dumps(result.to_dict(), ensure_ascii=False)                       # serialisable


def test_scores_object():
    result = score({1: "a dog runs", 2: "a cat"}, {1: ["a dog runs fast"], 2: ["a black cat"]}, metrics="rouge,bleu")
    assert list(result) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"]
    assert result["ROUGE-L"] == result.corpus["ROUGE-L"]
    d = result.to_dict()
    assert d["n_images"] == 2 and d["n_references"] == 2
    assert [e["image_id"] for e in d["per_image"]] == [1, 2]
    assert "ROUGE-L" in result.table()


# ----------------------------------------------------------------------------- result and reference files

def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return str(path)


def test_result_file_not_a_list(tmp_path):
    with pytest.raises(ValueError, match="must be a JSON list"):
        load_results(_write(tmp_path, "r.json", {"image_id": 1, "caption": "a"}))


def test_result_entry_problems_name_the_entry(tmp_path):
    with pytest.raises(ValueError, match=r"entry #1 has no 'caption'"):
        load_results(_write(tmp_path, "r.json", [{"image_id": 1, "caption": "a"}, {"image_id": 2}]))
    with pytest.raises(ValueError, match=r"entry #0 \(image_id 5\): the caption is not a string"):
        load_results(_write(tmp_path, "r.json", [{"image_id": 5, "caption": ["a", "b"]}]))
    with pytest.raises(ValueError, match=r"entry #0 is not an object"):
        load_results(_write(tmp_path, "r.json", ["a dog"]))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(_write(tmp_path, "r.json", "[{"))


def test_duplicate_image_ids_name_the_id_and_entries(tmp_path):
    path = _write(tmp_path, "r.json", [{"image_id": 9, "caption": "a"}, {"image_id": 3, "caption": "b"},
                                       {"image_id": 9, "caption": "c"}])
    with pytest.raises(ValueError, match=r"image_id 9 appears twice \(entries #0 and #2\)"):
        load_results(path)


def test_references_matching_by_any_naming():
    refs = References(captions=[["a"], ["b"]], by_key={"imgid": {0: 0, 1: 1}, "filename": {"x.jpg": 0, "y.jpg": 1},
                                                        "stem": {"x": 0, "y": 1}})
    assert match_references(["y", "x"], refs)[:2] == ({"y": ["b"], "x": ["a"]}, "stem")
    assert match_references(["1"], refs) == ({"1": ["b"]}, "imgid", 1)
    with pytest.raises(ValueError, match=r"no references for image id 'z.jpg'"):
        match_references(["x.jpg", "z.jpg"], refs)


def test_reference_file_errors(tmp_path):
    with pytest.raises(ValueError, match="not a COCO caption annotation file"):
        load_references(_write(tmp_path, "a.json", [1, 2]))
    with pytest.raises(ValueError, match=r"annotation #1 has no"):
        load_references(_write(tmp_path, "a.json", {"annotations": [{"image_id": 1, "caption": "a"}, {"id": 2}]}))
    with pytest.raises(ValueError, match="no image with split 'test'"):
        load_references(_write(tmp_path, "k.json", {"images": [{"imgid": 0, "split": "train",
                                                                 "sentences": [{"raw": "a"}]}]}), split="test")
    with pytest.raises(FileNotFoundError):
        load_references(str(tmp_path / "missing.json"))


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    refs = _write(tmp_path, "refs.json", {"annotations": [{"image_id": 1, "caption": "a dog"}]})
    res = _write(tmp_path, "res.json", [{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": "x"}])
    assert main(["score", res, "--references", refs, "--metrics", "bleu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnrhn score: error:") and "image_id 1 appears twice" in err
    res2 = _write(tmp_path, "res2.json", [{"image_id": 2, "caption": "a dog"}])
    assert main(["score", res2, "--references", refs, "--metrics", "bleu"]) == 2
    assert "no references for image id 2" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "nope.json"), "--references", refs]) == 2
    assert "no such file" in capsys.readouterr().err
