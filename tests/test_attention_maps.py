"""Attention you can see (issue 14): Show, Attend and Tell's per-word attention maps from the model, the
Python API and ``bnrhn caption --attention DIR``; the figure; the gallery that shows it; Show and Tell refused.

A tiny captioner with random weights and a 4×4 grid, saved as a checkpoint, and a tiny stand-in encoder (mean
colours of a 4×4 grid of cells) keep every test to about a second; the encoder is swapped in where the API
builds its encoder, so the checkpoint → encoder → decoding → maps → figure path is the real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnrhn.captioning import CaptionConfig, attention_figure, caption_images
from bnrhn.captioning import api
from bnrhn.captioning.task import CHECKPOINT_KIND
from bnrhn.cli import main
from bnrhn.data.vocab import Vocabulary
from bnrhn.models import CaptionerConfig, build_captioner
from bnrhn.encoders.base import (IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, EfficientNetLiteEncoder, ImageEncoder,
                                 MobileNetV2Encoder)
from bnrhn.reports import write_gallery
from bnrhn.reports.attention import plot_attention, upsample_map
from bnrhn.training import save_checkpoint

from figure_support import saved_figures  # noqa: F401  (a fixture)

GRID, FEATURES = 4, 6
WORDS = ["a", "red", "green", "blue", "circle", "square", "left", "right", "of", "the"]


class TinyEncoder(ImageEncoder):
    """Stands in for MobileNetV2: a 4×4 grid of 6-d features (mean colour and mean squared colour per cell)."""

    name, weights_id, preprocess_id, resize = "tiny", "tiny-weights", "tiny", "squash"
    feature_size, grid_size = FEATURES, GRID * GRID

    def preprocess(self, image) -> torch.Tensor:
        x = np.asarray(image.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(x).permute(2, 0, 1)

    def encode(self, batch: torch.Tensor):
        g = torch.nn.functional.avg_pool2d(batch, 2)  # [B, 3, 4, 4]
        grid = torch.cat([g, g.square()], 1).flatten(2).transpose(1, 2).contiguous()  # [B, 16, 6], row-major
        return grid.mean(1), grid

    def describe(self) -> dict:
        return {"encoder": self.name, "weights": self.weights_id, "preprocess": self.preprocess_id,
                "feature_size": self.feature_size, "grid_size": self.grid_size}


@pytest.fixture(autouse=True)
def tiny_encoder(monkeypatch):
    monkeypatch.setattr(api, "build_encoder", lambda *a, **k: TinyEncoder())


def tiny_model(model="show_attend_tell", cell="lstm", seed=0):
    vocab = Vocabulary(WORDS)
    torch.manual_seed(seed)
    m = build_captioner(CaptionerConfig(model=model, vocab_size=len(vocab), feature_size=FEATURES,
                                        grid_size=GRID * GRID, embed_size=8, hidden_size=9, attention_size=5,
                                        cell=cell, dropout=0.2))
    with torch.no_grad():  # sharper attention than the initial weights give, and no early <end>
        if model == "show_attend_tell":
            m.att_score.weight.mul_(8.0)
        m.out.bias[vocab.end_id] = -4.0
    return m.eval(), vocab


def save_tiny(path: Path, model="show_attend_tell", cell="lstm") -> Path:
    m, vocab = tiny_model(model, cell)
    task = {"kind": CHECKPOINT_KIND, "config": CaptionConfig(model=model, cell=cell, max_len=5).to_dict(),
            "vocab": vocab.to_dict(), "model_config": m.cfg.to_dict(), "encoder": TinyEncoder().describe()}
    return save_checkpoint(path, {"model": m.state_dict(), "task": task})


def write_images(folder: Path, n=3, size=(40, 30)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        p = folder / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _batch(B=4, L=7, vocab=len(WORDS), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, GRID * GRID, FEATURES, generator=g, dtype=dtype)
    lengths = torch.tensor([L, 3, 5, 2][:B])
    tok = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tok[i, :n] = torch.cat([torch.tensor([1]), torch.randint(4, vocab, (n - 2,), generator=g), torch.tensor([2])])
    return f, tok, lengths


# -- the model ----------------------------------------------------------------------------------------------
def test_maps_are_distributions_over_the_grid_and_leave_the_mode_alone():
    m, _ = tiny_model(cell="bn_lstm")
    m.double().train()
    f, tok, lengths = _batch(dtype=torch.float64)
    maps = m.attention_maps(f, tok, lengths)
    assert m.training  # put back in the mode it was in
    assert maps.shape == (4, tok.shape[1] - 1, GRID * GRID) and maps.dtype == torch.float64
    real = torch.arange(tok.shape[1] - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    assert torch.allclose(maps[real].sum(-1), torch.ones(int(real.sum()), dtype=torch.float64), atol=1e-12)
    assert bool((maps[real] >= 0).all()) and bool((maps[~real] == 0).all())
    assert float(maps[real].max()) > 2.0 / (GRID * GRID)  # not uniform: the maps say something
    # eval mode regardless of the model's: the same maps as from a model in eval mode
    m.eval()
    assert torch.equal(m.attention_maps(f, tok, lengths), maps)


@pytest.mark.parametrize("cell", ["lstm", "bn_lstm"])
def test_maps_equal_the_alpha_of_step_by_step_greedy_decoding(cell):
    """Reading a decoded caption again teacher-forced gives exactly the α each decoding step used."""
    m, vocab = tiny_model(cell=cell)
    if cell == "bn_lstm":  # batch-norm population statistics that are not the initial ones
        m.train()
        for _ in range(3):
            m.loss(*_batch())
        m.eval()
    f, _, _ = _batch()
    B, steps = f.shape[0], 6
    with torch.no_grad():
        state = m.start(f)
        tokens = torch.full((B,), vocab.start_id, dtype=torch.long)
        words, alphas = [], []
        for _ in range(steps):
            logp, state = m.step(tokens, state)
            alphas.append(state.extra["alpha"])
            tokens = logp.argmax(-1)
            words.append(tokens)
    words, alphas = torch.stack(words, 1), torch.stack(alphas, 1)  # [B, steps], [B, steps, N]
    seqs = []
    for b in range(B):
        w = words[b].tolist()
        n = w.index(vocab.end_id) if vocab.end_id in w else len(w)
        seqs.append(w[:n])
    maps = api.caption_attention(m, f, [[s] for s in seqs], (GRID, GRID))
    for b, s in enumerate(seqs):
        got = maps[b][0]
        assert got.shape == (len(s), GRID, GRID)
        want = alphas[b, : len(s)].reshape(len(s), GRID, GRID).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# -- the Python API -----------------------------------------------------------------------------------------
def test_caption_images_returns_the_maps_of_every_caption(tmp_path):
    ckpt = save_tiny(tmp_path / "sat.pt")
    images = write_images(tmp_path / "photos", n=2)
    plain = caption_images(ckpt, images, beam=3, topk=2, log=lambda m: None)
    assert all(r.attention is None for r in plain)
    res = caption_images(ckpt, images, beam=3, topk=2, attention=True, log=lambda m: None)
    assert [r.captions for r in res] == [r.captions for r in plain]  # the captions do not change
    for r in res:
        assert len(r.attention) == 2 and r.attention_box == (0.0, 0.0, 40.0, 30.0)
        for (text, _), maps in zip(r.captions, r.attention):
            n = len(text.split())
            assert n > 0 and maps.shape == (n, GRID, GRID) and maps.dtype == np.float32
            np.testing.assert_allclose(maps.astype(np.float64).sum((1, 2)), np.ones(n), atol=1e-5)


def test_greedy_maps_through_the_api_equal_the_decoding_steps(tmp_path):
    ckpt = save_tiny(tmp_path / "sat.pt")
    images = write_images(tmp_path / "photos", n=2)
    res = caption_images(ckpt, images, method="greedy", topk=1, attention=True, log=lambda m: None)
    loaded = api.load_captioner(ckpt)
    enc = TinyEncoder()
    _, grid = enc.encode(torch.stack([enc.preprocess(Image.open(p)) for p in images]))
    grid = grid.half().float()  # as decoding reads it
    with torch.no_grad():
        state = loaded.model.start(grid)
        tokens = torch.full((2,), loaded.vocab.start_id, dtype=torch.long)
        alphas = []
        for _ in range(5):
            logp, state = loaded.model.step(tokens, state)
            alphas.append(state.extra["alpha"])
            logp[:, [loaded.vocab.pad_id, loaded.vocab.start_id, loaded.vocab.unk_id]] = float("-inf")
            tokens = logp.argmax(-1)
    for b, r in enumerate(res):
        maps = r.attention[0]
        want = torch.stack(alphas, 1)[b, : maps.shape[0]].reshape(-1, GRID, GRID).numpy()
        np.testing.assert_allclose(maps, want, rtol=0, atol=1e-6)


def test_show_and_tell_is_refused_naming_the_model(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "st.pt", model="show_tell")
    images = write_images(tmp_path / "photos", n=1)
    with pytest.raises(ValueError, match=r"show_tell model \(Show and Tell\), which has no attention"):
        caption_images(ckpt, images, attention=True, log=lambda m: None)
    out_dir = tmp_path / "att"
    assert main(["caption", str(ckpt), *images, "--attention", str(out_dir), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "bnrhn caption: error:" in err and "show_tell" in err and "Show, Attend and Tell" in err
    assert out == "" and not out_dir.exists()  # refused before any captioning or writing


# -- bnrhn caption --attention --------------------------------------------------------------------------------
def test_cli_writes_one_figure_per_image_and_a_gallery_of_them(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "sat.pt")
    images = write_images(tmp_path / "photos", n=2) + write_images(tmp_path / "more", n=1)  # two img0.png
    (tmp_path / "notes.png").write_text("not an image")
    out_dir = tmp_path / "att"
    rc = main(["caption", str(ckpt), *images, str(tmp_path / "notes.png"), "--attention", str(out_dir),
               "--device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert rc == 1 and "notes.png" in err  # the unreadable file is reported; the others are drawn
    names = ["img0.attention.png", "img1.attention.png", "img0-2.attention.png"]
    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(names)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [Path(x["attention"]).name for x in lines if "attention" in x] == names
    for name in names:
        with Image.open(out_dir / name) as im:
            assert im.format == "PNG" and im.width > 200
    page = (out_dir / "gallery.html").read_text()
    for name in names:
        assert f"src='{name}'" in page and f"href='{name}'" in page
    assert page.count("<img class='attention'") == 3 and (out_dir / "images" / "0002.jpg").is_file()


def test_cli_never_overwrites_without_the_option(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "sat.pt")
    images = write_images(tmp_path / "photos", n=1)
    out_dir = tmp_path / "att"
    out_dir.mkdir()
    mine = out_dir / "img0.attention.png"
    mine.write_bytes(b"the user's own file")
    assert main(["caption", str(ckpt), *images, "--attention", str(out_dir), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "already holds" in err and "img0.attention.png" in err and "--overwrite" in err and out == ""
    assert mine.read_bytes() == b"the user's own file" and not (out_dir / "gallery.html").exists()
    assert main(["caption", str(ckpt), *images, "--attention", str(out_dir), "--device", "cpu", "--overwrite"]) == 0
    assert mine.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "attention: " in capsys.readouterr().out


# -- the figure and the gallery ---------------------------------------------------------------------------
def test_figure_has_the_image_and_one_titled_panel_per_word(tmp_path, saved_figures):  # noqa: F811
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    maps = rng.random((3, GRID, GRID)).astype(np.float32)
    maps /= maps.sum((1, 2), keepdims=True)
    path = plot_attention(tmp_path / "fig.png", image, ["a", "red", "circle"], maps)
    assert path.is_file()
    fig = saved_figures[-1]
    titles = [ax.get_title() for ax in fig.axes if ax.has_data()]
    assert titles == ["image", "a", "red", "circle"] and fig._suptitle.get_text() == "a red circle"
    overlay = [ax for ax in fig.axes if ax.has_data()][1].get_images()[1].get_array()
    assert overlay.shape == (60, 90)  # the map upsampled to the picture
    with pytest.raises(ValueError, match="one map per word"):
        plot_attention(tmp_path / "bad.png", image, ["a", "red"], maps)


def test_upsampling_is_smooth_and_aligned():
    m = np.zeros((GRID, GRID), dtype=np.float32)
    m[0, GRID - 1] = 1.0  # top right
    up = upsample_map(m, 80, 40)
    assert up.shape == (40, 80)
    assert np.unravel_index(up.argmax(), up.shape)[0] < 10 and np.unravel_index(up.argmax(), up.shape)[1] >= 70
    values = np.unique(np.round(up, 4))
    assert len(values) > 10  # bilinear ramps, not 16 flat blocks
    np.testing.assert_allclose(upsample_map(np.full((GRID, GRID), 0.25, np.float32), 30, 20), 0.25, atol=1e-6)


@pytest.mark.parametrize("cls,settings,mean,std", [
    (MobileNetV2Encoder, {"resize": "crop"}, IMAGENET_MEAN, IMAGENET_STD),
    (MobileNetV2Encoder, {"resize": "squash"}, IMAGENET_MEAN, IMAGENET_STD),
    (EfficientNetLiteEncoder, {"resize": "crop", "size": 260}, LITE_MEAN, LITE_STD),
    (EfficientNetLiteEncoder, {"resize": "squash", "size": 260}, LITE_MEAN, LITE_STD),
])
def test_the_crop_box_is_what_the_preprocessing_keeps(cls, settings, mean, std):
    """An image whose red channel is its x coordinate and green its y: the preprocessed tensor's border pixels
    name the region the encoder kept, which must be the box the figure lays the maps over."""
    enc = object.__new__(cls)  # the preprocessing needs no weights
    enc.__dict__.update(settings)
    width, height = 256, 192
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    image = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    x = enc.preprocess(image).numpy()
    red = (x[0] * std[0] + mean[0]) * 255.0
    green = (x[1] * std[1] + mean[1]) * 255.0
    left, top, right, bottom = enc.crop_box(width, height)
    n = x.shape[-1]  # the input side: pixel centres lie half a pixel inside the kept region
    half = (right - left) / n / 2
    assert red[:, 0].mean() == pytest.approx(left + half - 0.5, abs=1.0)
    assert red[:, -1].mean() == pytest.approx(right - half - 0.5, abs=1.0)
    assert green[0].mean() == pytest.approx(top + (bottom - top) / n / 2 - 0.5, abs=1.0)
    assert green[-1].mean() == pytest.approx(bottom - (bottom - top) / n / 2 - 0.5, abs=1.0)


def test_attention_figure_needs_the_maps(tmp_path):
    ckpt = save_tiny(tmp_path / "sat.pt")
    images = write_images(tmp_path / "photos", n=1)
    r = caption_images(ckpt, images, topk=1, log=lambda m: None)[0]
    with pytest.raises(ValueError, match="attention=True"):
        attention_figure(r, tmp_path / "x.png")


def test_gallery_embeds_attention_figures_per_model(tmp_path):
    fig_dir = tmp_path / "attention" / "lstm"
    fig_dir.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(fig_dir / "a b.png")
    img = tmp_path / "photo.png"
    Image.new("RGB", (20, 20), "red").save(img)
    page = write_gallery(tmp_path / "gallery.html", [
        {"image": img, "image_id": "1", "captions": {"lstm": "a red square"}, "references": ["red"],
         "attention": {"lstm": fig_dir / "a b.png"}},
        {"image": img, "image_id": "2", "captions": {"lstm": "a red square"}, "references": []},
    ]).read_text()
    assert "src='attention/lstm/a%20b.png'" in page and "attention of lstm" in page
    assert page.count("<figure>") == 1 and page.count("human captions") == 1


@pytest.mark.slow  # a comparison run; CI runs it
def test_compare_gallery_of_show_attend_tell_embeds_each_cells_figures(tmp_path):
    """The comparison's gallery (bnrhn compare / demo) shows every cell's attention figure of each image."""
    from bnrhn.experiments.compare import CellRun, CompareSettings, _write_gallery

    folder = tmp_path / "data"
    images = write_images(folder, n=3)
    (folder / "captions.csv").write_text("image,caption,split\n" + "".join(
        f"{Path(p).name},a red circle,{split}\n" for p, split in zip(images, ("train", "test", "test"))))
    base = CaptionConfig(dataset=f"folder:{folder}", model="show_attend_tell", cache_dir=str(tmp_path / "cache"),
                         device="cpu", progress=False)
    out = tmp_path / "experiment"
    first = {}
    for cell in ("lstm", "gru"):
        run_dir = out / "runs" / f"{cell}-seed0"
        save_tiny(run_dir / "best.pt", cell=cell)
        first[cell] = CellRun(cell, 0, run_dir, {}, 1, 0.0, 0.0, 0.0, 1, "steps", [], [], {})
    records = api.dataset_for_config(base, lambda m: None).split("test")
    for run in first.values():
        run.captions = {r.image_id: "a red circle" for r in records}
    settings = CompareSettings(cells=list(first), base=base, out_dir=out, budget_steps=1, gallery_size=2)
    _write_gallery(settings, first, out, lambda m: None)
    page = (out / "gallery.html").read_text()
    figures = sorted(out.glob("attention/*/*.png"))
    assert len(figures) == 4  # 2 images × 2 cells
    for f in figures:
        assert f"src='{f.relative_to(out).as_posix()}'" in page
    assert page.count("<figcaption>attention of lstm") == 2 and page.count("<figcaption>attention of gru") == 2
