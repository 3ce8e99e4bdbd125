"""``bnrhn score`` on COCO annotations, Karpathy split JSON and Flickr8k's token file."""

from __future__ import annotations

import json
import os

import pytest

from bnrhn.cli import main
from bnrhn.commands.score import default_output
from bnrhn.metrics import score
from metrics_support import coco_val, flickr8k, need_file, need_java, subset

pytestmark = pytest.mark.data
FAST = "bleu,rouge,cider"


def _results(tmp_path, pairs, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in pairs]), encoding="utf-8")
    return path


def test_coco_annotations(tmp_path, capsys):
    images = subset(coco_val(), 100)
    res = _results(tmp_path, [(i, caps[0].upper() + "!!") for i, caps in images.items()])
    ann = need_file("coco/captions_val2017.json")
    assert main(["score", str(res), "--references", str(ann), "--metrics", FAST]) == 0
    out = capsys.readouterr().out
    assert "100 images scored against" in out and "4900 reference images without a result left out" in out
    assert "CIDEr" in out and "BLEU-4" in out
    written = json.loads((tmp_path / "results.scores.json").read_text())
    direct = score({i: caps[0].upper() + "!!" for i, caps in images.items()}, images, metrics=FAST)
    assert written["corpus"] == pytest.approx(direct.corpus, abs=1e-12)
    assert len(written["per_image"]) == 100 and written["matched_on"] == "image_id"
    assert written["per_image"][0]["image_id"] == list(images)[0]


def _karpathy(tmp_path):
    """A Karpathy-style dataset_flickr8k.json built from the official Flickr8k files."""
    images = []
    for split in ("train", "dev", "test"):
        for name, caps in subset(flickr8k(split), 40).items():
            images.append({"filename": name, "imgid": len(images), "split": "val" if split == "dev" else split,
                           "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]})
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}), encoding="utf-8")
    return path, images


def test_karpathy_split_and_id_namings(tmp_path, capsys):
    path, images = _karpathy(tmp_path)
    test = [im for im in images if im["split"] == "test"]
    refs = {im["filename"]: [s["raw"] for s in im["sentences"]] for im in test}
    cands = {im["filename"]: im["sentences"][0]["raw"][::-1] for im in test}   # any caption will do
    expected = score(cands, refs, metrics=FAST).corpus
    for ids, naming in ((lambda im: im["filename"], "filename"), (lambda im: im["imgid"], "imgid"),
                        (lambda im: im["filename"][:-4], "stem")):
        res = _results(tmp_path, [(ids(im), cands[im["filename"]]) for im in test], name=f"r_{naming}.json")
        out = tmp_path / f"{naming}.json"
        assert main(["score", str(res), "-r", str(path), "--split", "test", "-m", FAST, "--json", str(out)]) == 0
        written = json.loads(out.read_text())
        assert written["matched_on"] == naming and written["reference_images_left_out"] == 0
        assert written["corpus"] == pytest.approx(expected, abs=1e-12)
    capsys.readouterr()
    # a result image outside the split: error naming it
    train = next(im for im in images if im["split"] == "train")
    res = _results(tmp_path, [(train["filename"], "a dog")], name="bad.json")
    assert main(["score", str(res), "-r", str(path), "--split", "test", "-m", FAST]) == 2
    assert repr(train["filename"]) in capsys.readouterr().err


def test_flickr8k_token_file_and_output_options(tmp_path, capsys):
    tokens = need_file("flickr8k/Flickr8k.token.txt")
    test = subset(flickr8k("test"), 50)
    res = _results(tmp_path, [(name, caps[1]) for name, caps in test.items()], name="run.json")
    assert main(["score", str(res), "-r", str(tokens), "-m", "bleu", "--json", "-"]) == 0
    assert not (tmp_path / "run.scores.json").exists()
    assert "BLEU-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["score", str(res), "-r", str(tokens), "--tokenizer", "spacy"])
    assert main(["score", str(res), "-r", str(tokens), "-m", "bleu", "--json", str(res)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert default_output("a/b/results.json") == "a/b/results.scores.json"
    assert default_output("run.txt") == "run.txt.scores.json"


@pytest.mark.slow
def test_all_metrics_with_meteor(tmp_path, capsys):
    need_java()
    images = subset(coco_val(), 30)
    res = _results(tmp_path, [(i, caps[0]) for i, caps in images.items()])
    assert main(["score", str(res), "-r", str(need_file("coco/captions_val2017.json"))]) == 0
    written = json.loads((tmp_path / "results.scores.json").read_text())
    assert set(written["corpus"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert 0.9 < written["corpus"]["METEOR"] <= 1.0      # the candidate is one of the references


def _tiny_files(tmp_path):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": [
        {"id": 1, "image_id": 1, "caption": "a dog runs on the grass"},
        {"id": 2, "image_id": 2, "caption": "a cat sleeps on a bed"}]}))
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 1, "caption": "a dog runs"}, {"image_id": 2, "caption": "a cat"}]))
    return res, refs


def test_score_never_overwrites_an_input(tmp_path, capsys):
    res, refs = _tiny_files(tmp_path)
    before = refs.read_bytes()
    assert main(["score", str(res), "-r", str(refs), "-m", "bleu", "--json", str(refs)]) == 2
    assert "would overwrite" in capsys.readouterr().err and refs.read_bytes() == before
    link = tmp_path / "same_file.json"
    os.link(refs, link)  # another name of the references file
    assert main(["score", str(res), "-r", str(refs), "-m", "bleu", "--json", str(link)]) == 2
    assert "references" in capsys.readouterr().err and refs.read_bytes() == before
    sym = tmp_path / "sym.json"
    sym.symlink_to(res)
    assert main(["score", str(res), "-r", str(refs), "-m", "bleu", "--json", str(sym)]) == 2
    assert "result file" in capsys.readouterr().err
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["score", str(res), "-r", str(refs), "-m", "bleu", "--json", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["score", str(res), "-r", str(refs), "-m", "bleu", "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_score_output_is_written_through_a_unique_temporary_file(tmp_path, capsys):
    res, refs = _tiny_files(tmp_path)
    out = tmp_path / "scores.json"
    users = tmp_path / "scores.json.tmp"  # a file of the user's that a fixed temporary name would destroy
    users.write_text("keep me")
    assert main(["score", str(res), "-r", str(refs), "-m", "bleu", "--json", str(out)]) == 0
    assert users.read_text() == "keep me"
    assert json.loads(out.read_text())["corpus"]["BLEU-1"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs.json", "res.json", "scores.json", "scores.json.tmp"]


@pytest.mark.slow
def test_ctrl_c_during_meteor_stops_at_once(tmp_path):
    """SIGINT to the whole process group (what Ctrl-C in a terminal sends) while METEOR scores: exit 130 within
    seconds, and no JVM left running (it used to die with the group, be restarted, and finish first)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    need_java()
    rng = random.Random(0)
    words = "a dog cat man woman runs plays sits on in the grass snow street beach ball red blue".split()
    sent = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    refs = tmp_path / "refs.json"
    n = 12000  # METEOR needs tens of seconds for these on 2 cores: the interrupt lands while it scores
    refs.write_text(json.dumps({"images": [{"id": i} for i in range(n)], "annotations": [
        {"id": 5 * i + k, "image_id": i, "caption": sent(40)} for i in range(n) for k in range(5)]}))
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": i, "caption": sent(40)} for i in range(n)]))
    # A terminal's Ctrl-C reaches a process whose SIGINT is not ignored; a job started in the background of a
    # non-interactive shell (how CI scripts often run) inherits SIGINT ignored, and Python keeps it ignored.
    # The child gets the terminal's disposition back, so that what is tested is our handling, not the shell's.
    proc = subprocess.Popen([sys.executable, "-m", "bnrhn", "score", str(res), "-r", str(refs), "-m", "meteor",
                             "--tokenizer", "none", "--json", "-"], start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not _java_children(proc.pid):
        time.sleep(0.2)
    assert _java_children(proc.pid), "METEOR's JVM did not start"
    time.sleep(2)  # scoring under way
    jvms = _java_children(proc.pid)
    assert proc.poll() is None, "scoring finished before the interrupt: the test's workload is too small"
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=30)
    assert rc == 130 and time.time() - t0 < 10, (rc, proc.stderr.read()[-500:])
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{pid}") and "java" in open(f"/proc/{pid}/cmdline").read() for pid in jvms)


def _java_children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline") as f:
                    cmd = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid and "java" in cmd:
                out.append(int(entry))
    return out
