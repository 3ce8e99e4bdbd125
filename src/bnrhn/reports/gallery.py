"""An HTML gallery of captions: for each image, the image, every model's caption and the human captions.

Images are copied (as JPEG thumbnails) into ``images/`` beside the HTML file and referenced by relative
paths, so the page opens from disk in any browser, and the folder can be moved or zipped whole.
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
"""


def write_gallery(
    path: str | Path,
    items: Sequence[Mapping],
    title: str = "Captions",
    thumbnail: int = 320,
) -> Path:
    """Write ``path`` (HTML). Each item: ``image`` (a path or a PIL image), ``image_id``, ``captions``
    ({model: caption}) and ``references`` (human captions)."""
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
            f"<div class='id'>human captions</div><ul class='refs'>{refs}</ul></div></div>"
        )
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
