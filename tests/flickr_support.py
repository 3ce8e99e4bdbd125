"""Flickr8k's human captions by image name, read from ``Flickr8k.token.txt`` (tests that pick photos by what
their captions say)."""

from __future__ import annotations

from pathlib import Path


def captions_by_image(token: Path) -> dict[str, list[str]]:
    """Image file name → its lower-cased captions (``IMAGE.jpg#k<TAB>caption`` lines)."""
    caps: dict[str, list[str]] = {}
    for line in token.read_text().splitlines():
        k, _, t = line.partition("\t")
        caps.setdefault(k.split("#")[0], []).append(t.lower())
    return caps
