"""Every PIL image mode is read as the picture a viewer shows: each file below is compared with an 8-bit
RGB rendering of the same picture (``bnrhn.encoders.load_image``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bnrhn.encoders import load_image


def picture(h=24, w=32) -> np.ndarray:
    """A greyscale ramp with a dark square: 8-bit values 0..255."""
    y, x = np.mgrid[0:h, 0:w]
    a = (x * 255 // (w - 1)).astype(np.uint8)
    a[4:12, 4:12] = 20
    return a


def rgb_of(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def read(path) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.int16)


def close(a, b, tol=1):
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= tol


def test_16_bit_png_is_not_white(tmp_path):
    g = picture()
    path = tmp_path / "g16.png"
    Image.fromarray(g.astype(np.uint16) * 257).save(path)  # a 16-bit greyscale PNG
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # what PIL decodes it as (I;16 or I)
    assert close(read(path), rgb_of(g))


def test_32_bit_integer_and_float_images(tmp_path):
    g = picture()
    wide = tmp_path / "i32.tif"
    Image.fromarray((g.astype(np.int64) * (2**31 - 1) // 255).astype(np.int32), "I").save(wide)
    assert close(read(wide), rgb_of(g))
    unit = tmp_path / "f01.tif"
    Image.fromarray(g.astype(np.float32) / 255.0, "F").save(unit)
    assert close(read(unit), rgb_of(g))
    byte_range = tmp_path / "f255.tif"
    Image.fromarray(g.astype(np.float32), "F").save(byte_range)
    assert close(read(byte_range), rgb_of(g))


def test_transparency_is_composited_on_white(tmp_path):
    g = picture()
    alpha = np.full(g.shape, 255, np.uint8)
    alpha[:, :8] = 0  # the left stripe is transparent: a viewer shows white there
    expect = rgb_of(g).copy()
    expect[:, :8] = 255
    la = tmp_path / "la.png"
    Image.fromarray(np.stack([g, alpha], axis=2), "LA").save(la)
    assert close(read(la), expect)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([rgb_of(g), alpha[..., None]], axis=2), "RGBA").save(rgba)
    assert close(read(rgba), expect)
    # a palette image whose colour 0 is transparent
    pal = Image.fromarray(rgb_of(g)).quantize(colors=16)
    idx = np.asarray(pal).copy()
    idx[:, :8] = 0
    pal2 = Image.fromarray(idx, "P")
    pal2.putpalette(pal.getpalette())
    path = tmp_path / "p.png"
    pal2.save(path, transparency=0)
    got = read(path)
    assert bool((got[:, :8] == 255).all())
    palette = np.asarray(pal.getpalette()[: 3 * 16]).reshape(16, 3)
    opaque = idx[:, 8:] != 0
    assert close(got[:, 8:][opaque], palette[idx[:, 8:][opaque]])


def test_cmyk_and_palette_without_transparency(tmp_path):
    rgb = np.stack([picture(), picture()[::-1], np.full((24, 32), 90, np.uint8)], axis=2)
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=100)
    assert close(read(cmyk), rgb, tol=8)  # JPEG's loss only
    p = tmp_path / "p.png"
    Image.fromarray(rgb).quantize(colors=256).save(p)
    assert close(read(p), rgb, tol=40)  # palette quantisation error only


@pytest.mark.parametrize("orientation,turn", [(6, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180),
                                              (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    upright = np.stack([picture(24, 32)] * 3, axis=2)
    stored = Image.fromarray(upright).transpose(_inverse(turn))  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, exif=exif, quality=100)
    got = read(path)
    assert got.shape == upright.shape and close(got, upright, tol=10)


def _inverse(turn):
    return {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
            Image.Transpose.ROTATE_180: Image.Transpose.ROTATE_180}[turn]
