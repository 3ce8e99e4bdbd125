"""--device and --precision: names checked, a missing device refused before any work, mixed precision
trains; CUDA against CPU where a GPU is present (marked ``cuda``: skipped here otherwise)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bnrhn.captioning import CaptionConfig, caption_images, evaluate, train
from bnrhn.cli import build_parser, main
from bnrhn.devices import resolve_device
from bnrhn.training import read_log

NO_CUDA = not torch.cuda.is_available()
cuda = pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU on this machine")

# every command that computes, with the arguments it needs besides --device
COMMANDS = {
    "train": ["train", "--run-dir", "{tmp}/run"],
    "compare": ["compare", "--out", "{tmp}/cmp", "--budget", "2"],
    "demo": ["demo", "--out", "{tmp}/demo"],
    "evaluate": ["evaluate", "{tmp}/missing.pt"],
    "caption": ["caption", "{tmp}/missing.pt", "{tmp}/photo.jpg"],
    "features": ["features", "--cache-dir", "{tmp}/cache"],
    "lm train": ["lm", "train", "--run-dir", "{tmp}/lm"],
    "lm evaluate": ["lm", "evaluate", "{tmp}/missing.pt"],
    "lm sample": ["lm", "sample", "{tmp}/missing.pt"],
    "lm experiment": ["lm", "experiment", "seed-report", "--out", "{tmp}/exp"],
    "analyze batchnorm": ["analyze", "batchnorm", "{tmp}/missing.pt"],
    "analyze gradients": ["analyze", "gradients", "--out", "{tmp}/grad"],
    "analyze gradients --task": ["analyze", "gradients", "--task", "adding", "--out", "{tmp}/grad"],
    "analyze jacobian": ["analyze", "jacobian", "--out", "{tmp}/jac"],
    "analyze gates": ["analyze", "gates", "--out", "{tmp}/gates"],
}


def _args(name: str, tmp: Path, device: str) -> list[str]:
    return [a.format(tmp=tmp) for a in COMMANDS[name]] + ["--device", device]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_takes_device_cpu(name, tmp_path):
    args = build_parser().parse_args(_args(name, tmp_path, "cpu"))
    assert args.device == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_device_cuda_without_cuda_fails_clearly_before_any_work(name, tmp_path, capsys):
    assert main(_args(name, tmp_path, "cuda")) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "cannot use CUDA" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []  # no run folder, cache or report started


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    if NO_CUDA:
        assert resolve_device("auto") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(ValueError, match="device must be one of"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="device must be one of"):
        CaptionConfig(device="tpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        CaptionConfig(precision="int8")


@pytest.fixture(scope="module")
def cache(feature_cache):
    return feature_cache


def _config(cache, run_dir, **kw) -> CaptionConfig:
    base = dict(dataset="synthetic:100,10,10", embed_size=32, hidden_size=32, batch_size=20, max_steps=6,
                validate_every=3, min_count=1, progress=False, cache_dir=str(cache), run_dir=str(run_dir),
                cell="bn_rhn", device="cpu")
    return CaptionConfig(**{**base, **kw})


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_log(Path(run_dir) / "log.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32_on_the_cpu(cache, tmp_path, precision):
    """autocast on the CPU: the run finishes, its losses are finite and follow the fp32 run's (16-bit products
    change the numbers a little, not the course)."""
    train(_config(cache, tmp_path / "fp32"), log=lambda m: None)
    result = train(_config(cache, tmp_path / precision, precision=precision), log=lambda m: None)
    assert result.steps == 6
    ours, ref = _losses(tmp_path / precision), _losses(tmp_path / "fp32")
    assert all(math.isfinite(v) for v in ours)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 0.05 * ref[0]
    assert ours != ref  # autocast did change the arithmetic


# -- on a GPU --------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.cuda
def test_cuda_captions_equal_cpu_captions_of_a_trained_checkpoint(cache, tmp_path):
    result = train(_config(cache, tmp_path / "run", cell="lstm", max_steps=60, validate_every=30), log=lambda m: None)
    images = sorted((Path(cache) / "synthetic").rglob("*.png"))[:8]
    for method in ("greedy", "beam"):
        on_cpu = caption_images(result.best_checkpoint, images, method=method, topk=1, device="cpu")
        on_gpu = caption_images(result.best_checkpoint, images, method=method, topk=1, device="cuda")
        assert [r.captions[0][0] for r in on_cpu] == [r.captions[0][0] for r in on_gpu]
    _, cpu_scores = evaluate(result.best_checkpoint, device="cpu", max_images=10)
    _, gpu_scores = evaluate(result.best_checkpoint, device="cuda", max_images=10)
    assert cpu_scores == pytest.approx(gpu_scores, abs=1e-6)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_and_exact_resume(cache, tmp_path, precision):
    straight = train(_config(cache, tmp_path / "straight", device="cuda", precision=precision), log=lambda m: None)
    train(_config(cache, tmp_path / "resumed", device="cuda", precision=precision, max_steps=3), log=lambda m: None)
    train(_config(cache, tmp_path / "resumed", device="cuda", precision=precision), resume=True, log=lambda m: None)
    assert straight.steps == 6
    assert _losses(tmp_path / "straight") == pytest.approx(_losses(tmp_path / "resumed"), rel=1e-6)
