"""Report pieces: the metrics table (best in bold, parseable), loss curves, the HTML gallery."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from bnrhn.reports import metrics_table, plot_training_curves, write_gallery
from figure_support import assert_readable, saved_figures  # noqa: F401  (fixture)
from table_support import parse_markdown_table


def test_table_bolds_best_per_row_and_parses_back():
    cols = {
        "lstm": {"BLEU-1": 0.70, "CIDEr": 0.91, "METEOR": 0.248},
        "bn_rhn": {"BLEU-1": 0.71, "CIDEr": (0.96, 0.02), "METEOR": 0.248},
    }
    text = metrics_table(cols, metrics=("BLEU-1", "METEOR", "CIDEr"), extra_rows={"steps": {"lstm": "10", "bn_rhn": "10"}})
    assert "| BLEU-1 | 0.700 | **0.710** |" in text
    assert "| METEOR | **0.248** | **0.248** |" in text  # ties are both bold
    assert "**0.960 ± 0.020**" in text
    parsed = parse_markdown_table(text)
    assert parsed["CIDEr"] == {"lstm": "0.910", "bn_rhn": "0.960 ± 0.020"}
    assert parsed["steps"]["bn_rhn"] == "10"


def test_plot_and_gallery_write_files(tmp_path: Path, saved_figures):
    png = plot_training_curves(
        tmp_path / "loss.png",
        {"lstm": (list(range(1, 101)), [5 - i / 30 for i in range(100)]), "rhn": ([1, 2, 3], [5.0, 4.0, 3.5])},
        {"lstm": ([50, 100], [0.3, 0.5])},
    )
    assert png.stat().st_size > 10_000 and Image.open(png).size[0] > 800
    assert len(saved_figures) == 1
    assert_readable(saved_figures[0])
    src = tmp_path / "a.png"
    Image.new("RGB", (64, 48), "red").save(src)
    page = write_gallery(tmp_path / "g" / "gallery.html", [
        {"image": src, "image_id": "a", "captions": {"lstm": "a red <square>"}, "references": ["red & bright"]},
        {"image": Image.new("RGB", (10, 10)), "image_id": 2, "captions": {"lstm": "black"}, "references": []},
    ])
    html = page.read_text()
    assert "a red &lt;square&gt;" in html and "red &amp; bright" in html
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert len(srcs) == 2 and all((page.parent / s).exists() for s in srcs)
