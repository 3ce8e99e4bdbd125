"""An HTML gallery of captions: for each image, the image, every model's caption and the human captions.

Images are copied (as JPEG thumbnails) into ``images/`` beside the HTML file and referenced by relative
paths, so the page opens from disk in any browser, and the folder can be moved or zipped whole.

An item may name attention figures (Show, Attend and Tell models, :mod:`bnrhn.reports.attention`): they are
shown under its captions, each a link to the full-size file, referenced by its path relative to the page
(so they belong in the page's folder or below it).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; }
.item { display: flex; gap: 1.5em; margin-bottom: 1.6em; padding-bottom: 1.2em; border-bottom: 1px solid #ddd; }
.item img { width: 224px; height: auto; border-radius: 4px; flex: none; }
table { border-collapse: collapse; }
td { padding: 0.15em 0.8em 0.15em 0; vertical-align: top; }
td.model { font-weight: 600; white-space: nowrap; }
.refs { color: #555; margin: 0.4em 0 0 0; padding-left: 1.2em; }
.id { color: #888; font-size: 0.85em; }
.item img.attention { width: auto; max-width: 100%; max-height: 360px; border-radius: 0; }
figure { margin: 0.6em 0 0 0; }
figcaption { color: #555; font-size: 0.85em; }
"""


def write_gallery(
    path: str | Path,
    items: Sequence[Mapping],
    title: str = "Captions",
    thumbnail: int = 320,
) -> Path:
    """Write ``path`` (HTML). Each item: ``image`` (a path or a PIL image), ``image_id``, ``captions``
    ({model: caption}), ``references`` (human captions) and, optionally, ``attention``: the attention figure
    of its caption (the PNG file's path), or {model: path} for several models."""
    path = Path(path)
    img_dir = path.parent / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for k, item in enumerate(items):
        image = item["image"]
        img = image if isinstance(image, Image.Image) else Image.open(image)
        img = img.convert("RGB")
        img.thumbnail((thumbnail, thumbnail))
        name = f"{k:04d}.jpg"
        img.save(img_dir / name, quality=90)
        rows = "".join(
            f"<tr><td class='model'>{html.escape(str(m))}</td><td>{html.escape(str(c))}</td></tr>"
            for m, c in item["captions"].items()
        )
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in item.get("references", []))
        parts.append(
            f"<div class='item'><img src='images/{name}' alt='{html.escape(str(item.get('image_id', name)))}'>"
            f"<div><div class='id'>{html.escape(str(item.get('image_id', '')))}</div><table>{rows}</table>"
            + (f"<div class='id'>human captions</div><ul class='refs'>{refs}</ul>" if refs else "")
            + _attention_figures(item.get("attention"), path.parent) + "</div></div>"
        )
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _attention_figures(figures, folder: Path) -> str:
    """The HTML of an item's attention figures (see :func:`write_gallery`), linked relative to ``folder``."""
    if not figures:
        return ""
    if not isinstance(figures, Mapping):
        figures = {"": figures}
    out = []
    for model, figure in figures.items():
        href = html.escape(_relative(Path(figure), folder), quote=True)
        label = f"attention of {model}" if model else "attention"
        out.append(f"<figure><a href='{href}'><img class='attention' src='{href}' alt='{html.escape(label)}'></a>"
                   f"<figcaption>{html.escape(label)} (per word, Xu et al. 2015)</figcaption></figure>")
    return "".join(out)


def _relative(figure: Path, folder: Path) -> str:
    """The URL of the file ``figure`` (a path as any other: absolute or from the working folder) relative to the
    page's ``folder``."""
    import os
    from urllib.parse import quote

    return quote(Path(os.path.relpath(figure.resolve(), folder.resolve())).as_posix())
