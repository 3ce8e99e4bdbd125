"""METEOR's process handling: junk on stdout, a JVM that dies or hangs, separators inside captions,
concurrent calls, missing Java. The failure modes are played by a fake ``java`` (a Python script speaking
METEOR's stdio protocol), so they are deterministic; the rest uses the real jar."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
import threading
import warnings

import pytest

import importlib

from bnrhn.metrics import score
from bnrhn.metrics.meteor import Meteor, MeteorError, MeteorUnavailable, sanitize
from metrics_support import need_java

meteor_mod = importlib.import_module("bnrhn.metrics.meteor")
score_mod = importlib.import_module("bnrhn.metrics.score")   # (bnrhn.metrics.score is also the function)

FAKE = textwrap.dedent('''\
    #!{python}
    # Plays METEOR 1.5's -stdio protocol. SCORE -> 3 statistics (hypothesis words, words of the first
    # reference, shared words); EVAL -> one score per statistics group, then the corpus score.
    import os, sys, time
    mode = os.environ.get("FAKE_METEOR_MODE", "ok")
    state = os.environ["FAKE_METEOR_STATE"]
    starts = int(open(state).read()) if os.path.exists(state) else 0
    open(state, "w").write(str(starts + 1))
    if mode == "die_once" and starts == 0 or mode == "die_always":
        sys.stdin.readline()
        sys.exit(1)
    if mode == "hang":
        time.sleep(60)
    def out(s):
        if mode == "junk":
            sys.stdout.write("OpenJDK 64-Bit Server VM warning: junk\\n\\n")
        sys.stdout.write(s + "\\n")
        sys.stdout.flush()
    for line in sys.stdin:
        fields = [f.strip() for f in line.rstrip("\\n").split("|||")]
        if fields[0] == "SCORE":
            if mode == "error":
                out("Error: specify hypothesis and at least one reference")
                continue
            hyp, ref = fields[-1].split(), fields[1].split()
            out("%d.0 %d.0 %d.0" % (len(hyp), len(ref), len(set(hyp) & set(ref))))
        elif fields[0] == "EVAL":
            groups = [list(map(float, f.split())) for f in fields[1:]]
            for g in groups:
                out(repr(g[2] / max(g[0], 1.0)))
            out(repr(sum(g[2] for g in groups) / max(sum(g[0] for g in groups), 1.0)))
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    path = tmp_path / "java"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    jar = tmp_path / "meteor-1.5.jar"
    jar.write_bytes(b"")
    monkeypatch.setenv("FAKE_METEOR_STATE", str(tmp_path / "starts"))

    def make(mode="ok", timeout=20.0):
        monkeypatch.setenv("FAKE_METEOR_MODE", mode)
        return Meteor(jar=str(jar), java=str(path), timeout=timeout)

    make.starts = lambda: int((tmp_path / "starts").read_text())
    return make


CANDS = ["a dog runs", "two cats", ""]
REFS = [["a dog is running", "the dog runs"], ["two black cats"], ["a bird"]]


def test_fake_protocol_round_trip(fake):
    m = fake()
    corpus, per_image = m.score(CANDS, REFS)
    assert per_image == [2 / 3, 1.0, 0.0]
    assert corpus == pytest.approx(4 / 5)
    assert m.score(CANDS, REFS) == (corpus, per_image)   # same JVM, second batch
    assert fake.starts() == 1
    m.close()


def test_junk_and_blank_lines_on_stdout_are_skipped(fake):
    m = fake("junk")
    assert m.score(CANDS, REFS)[1] == [2 / 3, 1.0, 0.0]
    m.close()


def test_jvm_death_restarts_once_and_retries(fake):
    m = fake("die_once")
    assert m.score(CANDS, REFS)[1] == [2 / 3, 1.0, 0.0]
    assert m.restarts == 1 and fake.starts() == 2
    m.close()


def test_jvm_that_keeps_dying_raises_a_clear_error(fake):
    m = fake("die_always")
    with pytest.raises(MeteorError, match="exited.*after one restart"):
        m.score(CANDS, REFS)
    assert fake.starts() == 2
    m.close()


def test_hung_jvm_times_out(fake):
    m = fake("hang", timeout=1.0)
    with pytest.raises(MeteorError, match="no answer"):
        m.score(CANDS, REFS)
    m.close()


def test_error_answer_names_the_image(fake):
    m = fake("error")
    with pytest.raises(MeteorError, match=r"rejected image #0"):
        m.score(CANDS, REFS)
    m.close()


def test_failure_inside_score_keeps_the_other_metrics(fake, monkeypatch):
    monkeypatch.setattr(score_mod, "_warned", set())
    m = fake("die_always")
    with pytest.warns(RuntimeWarning, match="METEOR failed"):
        result = score(dict(enumerate(CANDS)), dict(enumerate(REFS)), meteor=m)
    assert "METEOR" not in result.corpus and "after one restart" in result.unavailable["METEOR"]
    assert set(result.corpus) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    m.close()


def test_sanitize():
    assert sanitize("a ||| b\nc\r\n d\u2028e  f ") == "a b c d e f"


def test_missing_java_is_reported_once_and_other_metrics_returned(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))          # no java here
    monkeypatch.setattr(meteor_mod, "_SHARED", {})
    monkeypatch.setattr(score_mod, "_warned", set())
    with pytest.raises(MeteorUnavailable, match="needs Java"):
        Meteor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            result = score({1: "a dog"}, {1: ["a dog runs"]})
    assert sum("METEOR not computed" in str(w.message) for w in caught) == 1
    assert "Java" in result.unavailable["METEOR"]
    assert "BLEU-4" in result.corpus and "CIDEr" in result.corpus


def test_missing_jar(monkeypatch, tmp_path):
    monkeypatch.setenv("BNRHN_METEOR_JAR", str(tmp_path / "nope.jar"))
    if meteor_mod.shutil.which("java") is None:
        pytest.skip("Java is not on PATH")
    with pytest.raises(MeteorUnavailable, match="meteor-1.5.jar"):
        Meteor()


# ------------------------------------------------------------------------------------------- real jar

@pytest.fixture(scope="module")
def real():
    need_java()
    if meteor_mod.find_meteor_jar() is None:
        pytest.skip("meteor-1.5.jar not found (pycocoevalcap not installed)")
    return meteor_mod.get_meteor()


def test_separators_and_newlines_inside_captions(real):
    cands = {1: "a dog ||| runs\nfast", 2: "a cat|||"}
    refs = {1: ["a dog\r\nis running fast", "the dog ||| runs"], 2: ["a cat sits", "|||"]}
    tidy_c = {k: sanitize(v) for k, v in cands.items()}
    tidy_r = {k: [sanitize(s) for s in v] for k, v in refs.items()}
    a = score(cands, refs, metrics="meteor", tokenizer=None)
    b = score(tidy_c, tidy_r, metrics="meteor", tokenizer=None)
    assert "METEOR" in a.corpus and a.corpus == b.corpus and a.per_image == b.per_image


def test_concurrent_calls(real):
    batches = [([f"a dog runs {k}", "two cats"], [["a dog is running"], ["two black cats", "cats"]])
               for k in range(4)]
    expected = [real.score(c, r) for c, r in batches]
    results = [None] * len(batches)

    def run(k):
        results[k] = real.score(*batches[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_restart_after_the_jvm_is_killed_then_close(real):
    expected = real.score(["a dog"], [["a dog runs"]])
    real._jvm.proc.kill()                  # the JVM dies between calls: the next call starts a new one
    real._jvm.proc.wait()
    assert real.score(["a dog"], [["a dog runs"]]) == expected
    proc = real._jvm.proc
    real.close()                           # close() stops it (and atexit calls close on every scorer)
    assert proc.poll() is not None
