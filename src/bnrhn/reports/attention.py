"""Show, Attend and Tell's attention figure (Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption
Generation with Visual Attention", ICML, Fig. 2 and 3): the image, then one panel per generated word with
the word as its title and the attention map α_t of that step, upsampled to the image and laid over it.

The maps come in at the encoder's grid resolution (7×7 for MobileNetV2); each is upsampled bilinearly to
the picture's size, so the overlay is smooth rather than blocky (Xu et al. upsample by 16 and blur with a
Gaussian). A map is drawn as a grey veil whose brightness follows α: the places the model looked at are
light, the rest darkened — the look of the paper's figures. All panels of a caption share one scale (0 to
the largest α of any of its words), so a word attended everywhere alike stays dim beside a word that looked
at one place.

Nothing here knows about captioners: the caller hands in the picture (the part of the image the encoder
saw), the words and the maps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from bnrhn.reports.plots import pyplot, save_figure


def upsample_map(alpha: np.ndarray, width: int, height: int) -> np.ndarray:
    """A ``[grid_h, grid_w]`` map resized bilinearly to ``[height, width]`` (pixel centres aligned, as in
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``)."""
    from PIL import Image

    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim != 2:
        raise ValueError(f"an attention map must be 2-d [grid_h, grid_w], got shape {alpha.shape}")
    return np.asarray(Image.fromarray(alpha).resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32)


def _picture(image, max_side: int) -> np.ndarray:
    """``image`` (an array ``[H, W, 3]`` / ``[H, W]`` or a PIL image) as uint8 RGB, at most ``max_side`` pixels
    on its longer side (the panels are small; a 12-megapixel photo need not be drawn at full size)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ValueError(f"the image must be an array [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
        if arr.dtype != np.uint8:  # floats in [0, 1]
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        im = Image.fromarray(arr).convert("RGB")
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.BICUBIC)
    return np.asarray(im)


def plot_attention(path: str | Path, image, words: Sequence[str], maps, caption: str | None = None,
                   columns: int = 5, panel_inches: float = 2.2, max_side: int = 448, dpi: int = 100) -> Path:
    """Write the attention figure (PNG) of one caption: ``image`` (the part of the image the encoder saw, as an
    array ``[H, W, 3]``, uint8 or floats in [0, 1], or a PIL image), ``words`` (n words) and ``maps``
    (``[n, grid_h, grid_w]``, one attention map per word). The figure's title is ``caption`` (default: the
    words joined); panels wrap after ``columns`` per row."""
    maps = np.asarray(maps, dtype=np.float32)
    words = [str(w) for w in words]
    if maps.ndim != 3 or maps.shape[0] != len(words):
        raise ValueError(f"maps must be [words, grid_h, grid_w] with one map per word ({len(words)} words), "
                         f"got shape {maps.shape}")
    picture = _picture(image, max_side)
    height, width = picture.shape[:2]
    plt = pyplot()
    panels = 1 + len(words)
    cols = max(1, min(columns, panels))
    rows = math.ceil(panels / cols)
    aspect = height / width
    size = (cols * panel_inches, rows * (panel_inches * aspect + 0.35) + 0.4)  # + room for the titles
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat:
        ax.axis("off")
    flat[0].imshow(picture)
    flat[0].set_title("image", fontsize=10)
    top = float(maps.max()) if maps.size else 0.0
    for ax, word, alpha in zip(flat[1:], words, maps):
        up = upsample_map(alpha, width, height)
        ax.imshow(picture)
        ax.imshow(up, cmap="gray", alpha=0.65, vmin=0.0, vmax=top if top > 0 else 1.0, interpolation="bilinear")
        ax.set_title(word, fontsize=11)
    fig.suptitle(caption if caption is not None else " ".join(words), fontsize=11)
    return save_figure(fig, path, dpi=dpi)
