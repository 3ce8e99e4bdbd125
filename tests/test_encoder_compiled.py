"""The compiled CNN for feature extraction (bnrhn.encoders.compiled): the same features as the eager CNN
to float16 precision, and the eager CNN with one line of explanation wherever compiling is impossible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bnrhn.encoders import build_encoder, extract_features, find_mobilenet_weights
from bnrhn.encoders.base import COMPILE_MIN_IMAGES


@pytest.fixture(scope="module")
def encoder():
    try:
        find_mobilenet_weights()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return build_encoder("mobilenet_v2")


def _photos(tmp_path, n=5):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / "img" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _extract(paths, encoder, folder, compile, logs):
    return extract_features(paths, encoder, folder, grid=True, batch_size=2, progress=False, log=logs.append,
                            compile=compile)


def test_without_a_compiler_the_cnn_runs_uncompiled_and_says_so(encoder, tmp_path, monkeypatch):
    paths = _photos(tmp_path)
    eager = _extract(paths, encoder, tmp_path / "eager", "no", [])
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    logs: list[str] = []
    fs = _extract(paths, encoder, tmp_path / "hidden", "yes", logs)
    assert sum("no C++ compiler" in m and "uncompiled" in m for m in logs) == 1
    assert fs.meta["cnn"] == "eager" and eager.meta["cnn"] == "eager"
    assert np.array_equal(np.asarray(fs.pooled), np.asarray(eager.pooled))
    assert np.array_equal(np.asarray(fs.grid), np.asarray(eager.grid))


def test_a_compilation_that_fails_falls_back_to_the_eager_cnn(encoder, tmp_path, monkeypatch):
    def broken_compile(module, **kwargs):
        def run(x):
            raise RuntimeError("simulated backend failure\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    paths = _photos(tmp_path)
    logs: list[str] = []
    fs = _extract(paths, encoder, tmp_path / "broken", "yes", logs)
    assert sum("torch.compile failed (RuntimeError: simulated backend failure)" in m for m in logs) == 1
    assert fs.meta["cnn"] == "eager"
    eager = _extract(paths, encoder, tmp_path / "eager", "no", [])
    assert np.array_equal(np.asarray(fs.pooled), np.asarray(eager.pooled))


def test_auto_compiles_only_large_extractions_on_cpu(encoder, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # no compilation cost here
    assert encoder.prepare_extraction(COMPILE_MIN_IMAGES - 1, 32, "auto", print) == "eager"
    assert encoder.prepare_extraction(COMPILE_MIN_IMAGES, 32, "auto", print) == "compiled"
    assert encoder.prepare_extraction(10, 32, "yes", print) == "compiled"
    assert encoder.prepare_extraction(10**6, 32, "no", print) == "eager"
    with pytest.raises(ValueError, match="compile must be one of"):
        encoder.prepare_extraction(10, 32, "always", print)


@pytest.mark.slow
def test_compiled_features_equal_the_eager_ones_to_float16_precision(encoder, tmp_path):
    """A real Inductor compilation (about a minute on 2 cores); 5 images in batches of 2, so the last
    batch is padded to the compiled shape."""
    paths = _photos(tmp_path)
    eager = _extract(paths, encoder, tmp_path / "eager", "no", [])
    logs: list[str] = []
    fs = _extract(paths, encoder, tmp_path / "compiled", "yes", logs)
    assert fs.meta["cnn"] == "compiled", logs
    for a, b in ((eager.pooled, fs.pooled), (eager.grid, fs.grid)):
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        # float16 precision at the features' scale (ReLU6: values in [0, 6]): two float16 steps at the value,
        # and 2⁻¹⁰ absolute where the value is near 0 and float16's own steps are tiny
        tol = 2 * np.spacing(np.abs(a).astype(np.float16)).astype(np.float32) + 2.0**-10
        assert np.all(np.abs(a - b) <= tol), float(np.abs(a - b).max())
        assert np.abs(a - b).mean() < 1e-4


def test_the_compiled_trunk_freezes_its_weights():
    """Inductor's freezing is in effect (weights become constants of the compiled code, which is what lets it
    prepack them for oneDNN and fuse the ReLU6 clamps): after the first call, a change to the eager module's
    weights no longer reaches the compiled trunk. Passing the flag only as ``torch.compile(options=...)``
    froze nothing (Dynamo reads it while tracing), and this test failed."""
    from torch import nn

    from bnrhn.encoders.compiled import CompiledTrunk, compiler_available

    if compiler_available():
        pytest.skip(compiler_available())
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6()).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    logs: list[str] = []
    compiled = CompiledTrunk(trunk, batch_size=2, log=logs.append)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    before = compiled(x)  # an ordinary tensor, outside inference mode
    assert compiled.engine == "compiled", logs
    with torch.inference_mode():
        torch.testing.assert_close(before, trunk(x))
        trunk[0].weight.mul_(-1)  # an eager run sees this; frozen compiled code does not
        assert not torch.allclose(trunk(x), before)
        torch.testing.assert_close(compiled(x), before)  # an inference tensor
        torch.testing.assert_close(compiled(x[:1]), before[:1])  # a short batch, padded
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # compiled once
