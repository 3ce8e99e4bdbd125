"""METEOR 1.5 through the reference jar that pycocoevalcap ships, robustly.

METEOR (Denkowski & Lavie 2014) aligns candidate and references by exact words, stems, WordNet synonyms
and paraphrases; there is no faithful re-implementation, so like coco-caption we drive the reference
``meteor-1.5.jar`` (``-l en -norm``) in ``-stdio`` mode: one ``SCORE ||| ref_1 ||| ... ||| ref_n ||| hyp``
line per image returns that image's sufficient statistics, then one ``EVAL ||| stats_1 ||| ... ||| stats_N``
line returns every image's score and the corpus score (computed by the jar from the summed statistics,
not the mean of the image scores). The numbers are coco-caption's: same jar, same options, same
protocol.

What is different from pycocoevalcap's ``Meteor`` wrapper (the causes of its well-known failures):

- one persistent JVM per (jar, java, memory) shared by every call (the JVM and the paraphrase table take
  ~10 s to load), closed at interpreter exit (``atexit``) or by :meth:`Meteor.close`;
- requests are written by a separate thread while the answers are read, so large batches cannot
  deadlock on full pipes, and stderr is drained continuously (pycocoevalcap never reads it, so a chatty
  JVM blocks forever once the pipe buffer is full);
- answers are parsed strictly: blank lines and lines that are not numbers (JVM warnings printed on
  stdout: pycocoevalcap's "could not convert string to float") are skipped, a line starting with
  ``Error`` is reported with the image it belongs to;
- every field is sanitised: ``|||`` (the field separator) and line breaks inside a caption would
  desynchronise the protocol, so they become spaces and runs of whitespace one space (identity on
  coco-caption-tokenized text);
- when the JVM dies (BrokenPipe, end of output) or does not answer within ``timeout`` seconds, it is
  restarted once and the batch retried; a second failure raises :class:`MeteorError` with the end of
  the JVM's stderr;
- a lock makes concurrent calls from several threads safe;
- the JVM heap is configurable (``max_memory``, default ``2G`` as in coco-caption, or the environment
  variable ``BNRHN_METEOR_MEMORY``);
- Java and the jar are looked up first: when either is missing, :class:`MeteorUnavailable` says which
  and how to fix it (:func:`bnrhn.metrics.score` then warns once and returns the other metrics).
"""

from __future__ import annotations

import atexit
import collections
import os
import queue
import re
import shutil
import subprocess
import threading
import weakref
from collections.abc import Callable, Sequence

__all__ = ["Meteor", "MeteorError", "MeteorUnavailable", "find_meteor_jar", "get_meteor", "close_all"]

_NUMBERS = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?( -?\d+(\.\d+)?([eE][-+]?\d+)?)*$")
_WS = re.compile(r"\s+")
_EOF = object()


class MeteorUnavailable(RuntimeError):
    """Java or the METEOR jar cannot be found."""


class MeteorError(RuntimeError):
    """The METEOR JVM failed (twice) or answered something unusable."""


def find_meteor_jar() -> str | None:
    """Path of ``meteor-1.5.jar``: ``$BNRHN_METEOR_JAR``, else the one installed with pycocoevalcap (its
    ``data/paraphrase-en.gz`` must lie beside it), else None."""
    env = os.environ.get("BNRHN_METEOR_JAR")
    if env:
        return env if os.path.isfile(env) else None
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "meteor", "meteor-1.5.jar")
        if os.path.isfile(path):
            return path
    return None


def sanitize(text: str) -> str:
    """One METEOR field: no ``|||`` and no line break inside, single spaces."""
    return _WS.sub(" ", text.replace("|||", " ")).strip()


class _JVM:
    """One running ``java -jar meteor-1.5.jar - - -stdio`` with reader threads on stdout and stderr."""

    def __init__(self, cmd: list[str], cwd: str) -> None:
        # A session of its own: Ctrl-C in the terminal interrupts Python (which then stops this JVM and exits),
        # instead of killing the JVM under it, which the recovery below would take for a crash and restart.
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: collections.deque[str] = collections.deque(maxlen=50)
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        try:
            for raw in self.proc.stdout:
                self.lines.put(raw.decode("utf-8", "replace").strip())
        except (OSError, ValueError):
            pass
        self.lines.put(_EOF)

    def _pump_stderr(self) -> None:
        try:
            for raw in self.proc.stderr:
                self.stderr.append(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    def write_async(self, lines: list[str]) -> threading.Thread:
        """Write lines from a thread (the JVM answers while we write; the reader drains the answers)."""
        error: list[BaseException] = []

        def run():
            try:
                data = "".join(line + "\n" for line in lines).encode("utf-8")
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError) as exc:  # the JVM died: the reader sees EOF
                error.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.error = error  # type: ignore[attr-defined]
        t.start()
        return t

    def read_numbers(self, timeout: float) -> str:
        """The next answer line that is made of numbers, skipping blank or junk lines."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise _Died(f"no answer from the METEOR JVM within {timeout:g} s") from None
            if line is _EOF:
                raise _Died("the METEOR JVM exited")
            if not line:
                continue
            if _NUMBERS.match(line):
                return line
            if line.startswith("Error"):
                raise _Answer(line)
            # anything else is noise (e.g. a JVM warning printed on stdout): skip it

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


class _Died(Exception):
    pass


class _Answer(Exception):
    pass


_LIVE: "weakref.WeakSet[Meteor]" = weakref.WeakSet()


class Meteor:
    """A persistent METEOR 1.5 scorer (see the module docstring).

    >>> m = Meteor()                                    # doctest: +SKIP
    >>> corpus, per_image = m.score(["a dog runs"], [["a dog is running", "the dog runs"]])  # doctest: +SKIP
    """

    def __init__(self, jar: str | None = None, java: str = "java", max_memory: str | None = None,
                 language: str = "en", timeout: float = 600.0) -> None:
        self.jar = jar or find_meteor_jar()
        self.java = shutil.which(java)
        if self.java is None:
            raise MeteorUnavailable(f"METEOR needs Java, but {java!r} is not on PATH "
                                    "(install a JRE >= 8, e.g. `apt-get install default-jre-headless`)")
        if not self.jar or not os.path.isfile(self.jar):
            raise MeteorUnavailable("METEOR needs meteor-1.5.jar: install pycocoevalcap "
                                    "(`pip install pycocoevalcap`) or set BNRHN_METEOR_JAR")
        self.max_memory = max_memory or os.environ.get("BNRHN_METEOR_MEMORY", "2G")
        self.cmd = [self.java, f"-Xmx{self.max_memory}", "-Dfile.encoding=UTF-8", "-jar", self.jar,
                    "-", "-", "-stdio", "-l", language, "-norm"]
        self.timeout = timeout
        self._lock = threading.Lock()
        self._jvm: _JVM | None = None
        self.restarts = 0
        _LIVE.add(self)

    def _ensure(self) -> _JVM:
        if self._jvm is None or not self._jvm.alive():
            if self._jvm is not None:
                self._jvm.close()
            self._jvm = _JVM(self.cmd, cwd=os.path.dirname(os.path.abspath(self.jar)))
        return self._jvm

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]],
              progress: Callable[[int], None] | None = None) -> tuple[float, list[float]]:
        """Corpus METEOR and per-image METEOR of tokenized candidates against their references.

        ``progress``, when given, is called with the number of images scored so far as the answers arrive
        (from 0 again if the JVM had to be restarted)."""
        if len(candidates) != len(references):
            raise ValueError("candidates and references differ in length")
        if not candidates:
            raise ValueError("METEOR of an empty set of images")
        score_lines = []
        for k, (cand, refs) in enumerate(zip(candidates, references)):
            if not refs:
                raise ValueError(f"image #{k} has no references")
            fields = [sanitize(r) for r in refs] + [sanitize(cand)]
            score_lines.append("SCORE ||| " + " ||| ".join(fields))
        with self._lock:
            try:
                try:
                    return self._run(score_lines, progress)
                except _Died:
                    # the JVM died or hung: start a new one and try once more
                    self.restarts += 1
                    self._kill()
                    try:
                        return self._run(score_lines, progress)
                    except _Died as exc:
                        tail = "\n".join(self._jvm.stderr) if self._jvm else ""
                        raise MeteorError(f"{exc} (after one restart). JVM stderr:\n{tail}") from None
            except BaseException:
                # a failed call may leave answers in flight: never reuse that JVM
                self._kill()
                raise

    def _kill(self) -> None:
        if self._jvm is not None:
            self._jvm.proc.kill()
            self._jvm.close()
            self._jvm = None

    def _run(self, score_lines: list[str], progress: Callable[[int], None] | None) -> tuple[float, list[float]]:
        jvm = self._ensure()
        n = len(score_lines)
        writer = jvm.write_async(score_lines)
        stats = []
        every = max(1, n // 200)  # about 200 progress updates whatever the size
        for k in range(n):
            try:
                stats.append(jvm.read_numbers(self.timeout))
            except _Answer as exc:
                raise MeteorError(f"METEOR rejected image #{k}: {exc}; request was: {score_lines[k][:500]}") from None
            if progress is not None and ((k + 1) % every == 0 or k + 1 == n):
                progress(k + 1)
        writer.join()
        writer = jvm.write_async(["EVAL ||| " + " ||| ".join(stats)])
        try:
            per_image = [float(jvm.read_numbers(self.timeout)) for _ in range(n)]
            corpus = float(jvm.read_numbers(self.timeout))
        except _Answer as exc:
            raise MeteorError(f"METEOR rejected the EVAL request: {exc}") from None
        writer.join()
        return corpus, per_image

    def close(self) -> None:
        """Stop the JVM (a later :meth:`score` starts a new one)."""
        with self._lock:
            if self._jvm is not None:
                self._jvm.close()
                self._jvm = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self._jvm is not None:
                self._jvm.close()
        except Exception:
            pass


_SHARED: dict[tuple, Meteor] = {}
_SHARED_LOCK = threading.Lock()


def get_meteor(jar: str | None = None, java: str = "java", max_memory: str | None = None) -> Meteor:
    """The shared persistent scorer for these settings (created on first use)."""
    key = (jar, java, max_memory or os.environ.get("BNRHN_METEOR_MEMORY", "2G"))
    with _SHARED_LOCK:
        m = _SHARED.get(key)
        if m is None:
            m = _SHARED[key] = Meteor(jar=jar, java=java, max_memory=max_memory)
        return m


def close_all() -> None:
    """Stop every METEOR JVM started by this process."""
    for m in list(_LIVE):
        m.close()


atexit.register(close_all)
