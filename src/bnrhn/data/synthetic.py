"""Synthetic scenes: images of simple coloured shapes with five varied reference captions each.

A deterministic stand-in for a captioning data set, so that training, decoding and evaluation run on a
fresh machine with no download. Scene ``i`` of seed ``s`` depends on ``(s, i)`` only. A scene holds one
or two *groups* of shapes; a group is 1–3 identical shapes (same shape, colour and size), and the
two groups differ. What the captions say, and therefore what a model must read from the image:

- the **shape** (circle, square, triangle, star), **colour** (red, green, blue, yellow, purple,
  orange) and **size** (small, big) of every group,
- the **count** of each group (a / two / three),
- for two groups their **relative position** (left of / right of / above / below: the groups lie in
  separate halves of the canvas).

Each scene gets five references from different templates (word order, "there is", "a picture of",
size words, a position clause...), so that a caption which ignores the image (a constant caption, or
the commonest training caption) scores low on CIDEr while a model that reads the image scores high.

The images are written once as PNG files to a cache folder (with a manifest) and read back like any
other data set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnrhn.data.captions import CaptionDataset, ImageRecord

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 25),
    "purple": (140, 45, 175),
    "orange": (245, 135, 20),
}
SIZES = {"small": 0.085, "big": 0.15}  # radius as a fraction of the image side
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
VERSION = 2  # bump when the generator changes, so cached images are regenerated


@dataclass(frozen=True)
class Group:
    shape: str
    colour: str
    size: str
    count: int

    def phrase(self, with_size: bool) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        words = ([self.size] if with_size else []) + [self.colour, noun]
        count = COUNT_WORDS[self.count]
        if count == "a" and words[0][0] in "aeiou":
            count = "an"
        return " ".join([count] + words)


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    relation: str | None  # position of groups[0] relative to groups[1]: "left of", "right of", "above", "below"
    background: tuple[int, int, int]


def _sample_scene(rng: np.random.Generator) -> Scene:
    n_groups = 1 if rng.random() < 0.4 else 2
    groups: list[Group] = []
    while len(groups) < n_groups:
        g = Group(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                  list(SIZES)[rng.integers(2)],
                  int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])))
        if all((g.shape, g.colour) != (h.shape, h.colour) for h in groups):
            groups.append(g)
    relation = None if n_groups == 1 else ("left of", "right of", "above", "below")[rng.integers(4)]
    grey = int(rng.integers(225, 250))
    return Scene(tuple(groups), relation, (grey, grey, grey))


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five references from different templates (two of them chosen at random from a pool)."""
    g = scene.groups
    if len(g) == 1:
        a = g[0]
        pool = [
            f"{a.phrase(True)}",
            f"there {'is' if a.count == 1 else 'are'} {a.phrase(True)}",
            f"{'one' if a.count == 1 else COUNT_WORDS[a.count]} {a.colour} {a.shape}{'s' if a.count > 1 else ''}",
            f"a picture of {a.phrase(False)}",
            f"{a.phrase(False)} on a plain background",
            f"an image with {a.phrase(True)}",
            f"{a.phrase(True)} and nothing else",
        ]
    else:
        a, b = g
        rel = scene.relation
        inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        rel_phrase = lambda r: f"to the {r}" if r in ("left of", "right of") else r  # noqa: E731
        pool = [
            f"{a.phrase(False)} and {b.phrase(False)}",
            f"{a.phrase(True)} {rel_phrase(rel)} {b.phrase(True)}",
            f"{b.phrase(False)} {rel_phrase(inverse)} {a.phrase(False)}",
            f"there {'is' if a.count == 1 else 'are'} {a.phrase(True)} and {b.phrase(True)}",
            f"a picture of {a.phrase(False)} {rel_phrase(rel)} {b.phrase(False)}",
            f"{b.phrase(True)} and {a.phrase(True)}",
            f"an image with {a.phrase(False)} and {b.phrase(False)}",
        ]
    first = pool[:3]
    rest = [pool[i] for i in rng.permutation(len(pool) - 3)[:2] + 3]
    return first + rest


def _place(scene: Scene, rng: np.random.Generator, size: int) -> list[tuple[Group, float, float, float]]:
    """Centres and radii (pixels) of every shape; group 0 and group 1 in opposite halves per the relation."""
    regions: list[tuple[float, float, float, float]]  # x0, y0, x1, y1 as fractions
    if len(scene.groups) == 1:
        regions = [(0.0, 0.0, 1.0, 1.0)]
    else:
        left, right, top, bottom = (0, 0, 0.5, 1), (0.5, 0, 1, 1), (0, 0, 1, 0.5), (0, 0.5, 1, 1)
        regions = {"left of": [left, right], "right of": [right, left],
                   "above": [top, bottom], "below": [bottom, top]}[scene.relation]
    placed: list[tuple[Group, float, float, float]] = []
    for grp, (x0, y0, x1, y1) in zip(scene.groups, regions):
        r = SIZES[grp.size] * size * (len(scene.groups) == 1 and 1.0 or 0.8)
        r *= 1.0 if grp.count == 1 else 0.8
        for _ in range(grp.count):
            for _attempt in range(200):
                cx = rng.uniform(x0 * size + r + 2, x1 * size - r - 2)
                cy = rng.uniform(y0 * size + r + 2, y1 * size - r - 2)
                if all(math.hypot(cx - px, cy - py) > r + pr + 3 for _, px, py, pr in placed):
                    break
            else:  # crowded: shrink and place anyway (deterministic, rare)
                r *= 0.8
            placed.append((grp, cx, cy, r))
    return placed


def render(scene: Scene, rng: np.random.Generator, size: int = 224):
    """A PIL image of ``scene`` (shapes placed at random within their regions, slight rotation)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for grp, cx, cy, r in _place(scene, rng, size):
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[grp.colour])
        if grp.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif grp.shape == "star":  # five points, inner radius 0.45 of the outer
            rot = rng.uniform(-0.3, 0.3) - math.pi / 2
            rr = r * 1.3
            pts = [(cx + rad * math.cos(rot + math.pi * k / 5), cy + rad * math.sin(rot + math.pi * k / 5))
                   for k in range(10) for rad in [rr if k % 2 == 0 else 0.45 * rr]]
            draw.polygon(pts, fill=rgb)
        else:
            n = 4 if grp.shape == "square" else 3
            rot = rng.uniform(-0.3, 0.3) + (math.pi / 4 if n == 4 else -math.pi / 2)
            rr = r * (1.15 if n == 4 else 1.25)
            pts = [(cx + rr * math.cos(rot + 2 * math.pi * k / n), cy + rr * math.sin(rot + 2 * math.pi * k / n))
                   for k in range(n)]
            draw.polygon(pts, fill=rgb)
    return img


def make_scene(seed: int, index: int, size: int = 224):
    """(PIL image, five captions, scene) of scene ``index`` for ``seed``; pure function of its arguments."""
    rng = np.random.default_rng([seed, index, VERSION])
    scene = _sample_scene(rng)
    caps = captions_for(scene, rng)
    return render(scene, rng, size), caps, scene


def synthetic_dataset(
    root: str | Path,
    n_train: int = 1500,
    n_val: int = 150,
    n_test: int = 150,
    seed: int = 0,
    size: int = 224,
    progress: bool = False,
) -> CaptionDataset:
    """The synthetic data set, its images written under ``root`` (reused when already there).

    Scenes ``0..n_train-1`` are the training split, then ``n_val`` validation and ``n_test`` test scenes.
    """
    n = n_train + n_val + n_test
    if min(n_train, n_val, n_test) < 0 or n_train == 0:
        raise ValueError(f"synthetic split sizes must be ≥ 0 with n_train > 0, got {n_train}/{n_val}/{n_test}")
    root = Path(root) / f"v{VERSION}-seed{seed}-size{size}"
    manifest = root / "scenes.jsonl"
    known = _read_manifest(manifest)
    missing = [i for i in range(n) if i not in known or not (root / known[i]["file"]).is_file()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        from bnrhn.folder_lock import FolderLock

        with FolderLock(root, "synthetic scene folder", wait=lambda why: tqdm.write(f"synthetic scenes: {why}")):
            known.update(_read_manifest(manifest))  # what another process wrote while this one waited
            missing = [i for i in range(n) if i not in known or not (root / known[i]["file"]).is_file()]
            _render(root, manifest, missing, known, seed, size, progress)
    records = []
    for i in range(n):
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        records.append(ImageRecord(f"scene{i:06d}", root / known[i]["file"], list(known[i]["captions"]), split))
    return CaptionDataset(f"synthetic(seed={seed})", records, [], str(root))


def _read_manifest(manifest: Path) -> dict[int, dict]:
    known: dict[int, dict] = {}
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                known[int(row["index"])] = row
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from an interrupted run: regenerated
    return known


def _render(root: Path, manifest: Path, missing: list[int], known: dict[int, dict], seed: int, size: int,
            progress: bool) -> None:
    """Draw the scenes ``missing`` into ``root`` and append them to the manifest (under the folder's lock)."""
    from tqdm.auto import tqdm

    with open(manifest, "a", encoding="utf-8") as f:
        for i in tqdm(missing, desc="synthetic scenes", unit="img", disable=not progress, leave=False):
            img, caps, _ = make_scene(seed, i, size)
            name = f"{i:06d}.png"
            tmp = root / (name + ".tmp")
            img.save(tmp, format="PNG")
            tmp.replace(root / name)
            row = {"index": i, "file": name, "captions": caps}
            f.write(json.dumps(row) + "\n")
            known[i] = row
