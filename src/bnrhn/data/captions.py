"""Caption data sets: readers for the common formats, all producing one record type.

Every reader returns a :class:`CaptionDataset`: a list of :class:`ImageRecord` ``{image_id, path,
captions, split}`` with ``split`` one of ``train``, ``val``, ``test``. Formats:

- Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json``):
  :func:`read_karpathy` (``restval`` counts as ``train``, as in Karpathy's and im2txt's setups);
- Flickr8k's official text release (``Flickr8k.token.txt`` + ``Flickr_8k.{train,dev,test}Images.txt``):
  :func:`read_flickr8k` (``dev`` is ``val``);
- COCO annotation files (``captions_train2014.json``, ``captions_val2017.json``...): :func:`read_coco`;
- a folder of images with a ``captions.csv`` (columns ``image,caption[,split]``) or ``captions.jsonl``
  (``{"image": ..., "caption": ...}`` or ``"captions": [...]`` per line, optional ``"split"``):
  :func:`read_folder`.

Data without a split of its own (a single COCO file, a folder without a split column) is split
deterministically by a hash of the image id (:func:`assign_splits`), so that the same files always
give the same split.

Problems in the data (an empty caption, an image named by the captions but absent on disk) are
collected in ``dataset.problems`` with the file and line, and the affected caption or image is
dropped; with ``strict=True`` the first problem raises ``ValueError`` instead. Corrupt image files are
found later, when features are extracted (see :mod:`bnrhn.encoders.cache`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bnrhn.data.vocab import tokenize

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "valid": "val",
                  "validation": "val", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageRecord:
    """One image and its reference captions."""

    image_id: str
    path: Path | None
    captions: list[str]
    split: str


@dataclass
class CaptionDataset:
    """Records of one data set, plus what was dropped while reading it."""

    name: str
    records: list[ImageRecord]
    problems: list[str] = field(default_factory=list)
    source: str = ""

    def split(self, name: str) -> list[ImageRecord]:
        name = normalize_split(name, "split")
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, int]:
        c = Counter(r.split for r in self.records)
        return {s: c.get(s, 0) for s in SPLITS}

    def summary(self) -> str:
        c = self.counts()
        n_caps = sum(len(r.captions) for r in self.records)
        return (f"{self.name}: {len(self.records)} images ({c['train']} train / {c['val']} val / {c['test']} test), "
                f"{n_caps} captions" + (f"; {len(self.problems)} problem(s) in the data" if self.problems else ""))

    def subset(self, limits: dict[str, int | None]) -> CaptionDataset:
        """The first ``limits[split]`` images of each split (in reading order); None = all."""
        taken: Counter = Counter()
        out = []
        for r in self.records:
            lim = limits.get(r.split)
            if lim is None or taken[r.split] < lim:
                taken[r.split] += 1
                out.append(r)
        return CaptionDataset(self.name, out, list(self.problems), self.source)

    def without(self, image_ids: set[str], reason: str) -> CaptionDataset:
        """A copy without the images ``image_ids`` (e.g. unreadable files), with the reason recorded."""
        if not image_ids:
            return self
        out = [r for r in self.records if r.image_id not in image_ids]
        n_caps = sum(len(r.captions) for r in self.records if r.image_id in image_ids)
        problems = self.problems + [f"{len(image_ids)} image(s) dropped ({reason}) with their {n_caps} caption(s)"]
        return CaptionDataset(self.name, out, problems, self.source)


class _Problems:
    """Collects data problems, or raises on the first one when strict."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.items: list[str] = []

    def __call__(self, msg: str) -> None:
        if self.strict:
            raise ValueError(msg + " (strict mode; drop --strict to skip such entries)")
        self.items.append(msg)


def normalize_split(value: str, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"{where}: unknown split {value!r}; expected one of {sorted(_SPLIT_ALIASES)}")
    return _SPLIT_ALIASES[key]


def assign_splits(image_ids: list[str], val: float = 0.1, test: float = 0.1) -> dict[str, str]:
    """Deterministic split of ``image_ids`` by a hash of each id: a fraction ``val`` and ``test``."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split fractions must be in [0, 1) with val + test < 1, got val={val}, test={test}")
    out = {}
    for i in image_ids:
        u = int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") / 2**64
        out[i] = "test" if u < test else "val" if u < test + val else "train"
    return out


def _finish(name: str, source: str, entries: dict[str, dict], problems: _Problems, check_files: bool) -> CaptionDataset:
    """Build records from ``{image_id: {path, captions: [(caption, where)], split}}``, dropping bad entries."""
    records = []
    for image_id, e in entries.items():
        caps = []
        for text, where in e["captions"]:
            if not tokenize(text):
                problems(f"{where}: empty caption for image {image_id!r}")
                continue
            caps.append(text.strip())
        if not caps:
            problems(f"{source}: image {image_id!r} has no usable caption; dropped")
            continue
        path = e["path"]
        if check_files and (path is None or not Path(path).is_file()):
            problems(f"{e['where']}: image {image_id!r} is referenced by the captions but its file "
                     f"{str(path)!r} does not exist; dropped with its {len(caps)} caption(s)")
            continue
        records.append(ImageRecord(image_id, Path(path) if path is not None else None, caps, e["split"]))
    if not records:
        raise ValueError(f"{source}: no usable images with captions" +
                         (f" (first problem: {problems.items[0]})" if problems.items else ""))
    return CaptionDataset(name, records, problems.items, source)


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


# -- Karpathy split JSON -------------------------------------------------------------------------------
def read_karpathy(json_path: str | Path, images_root: str | Path | None = None, strict: bool = False,
                  check_files: bool = True) -> CaptionDataset:
    """Read Karpathy's ``dataset_{coco,flickr8k,flickr30k}.json``.

    Image paths are ``images_root / filepath / filename`` (``filepath`` exists for COCO only).
    ``images_root`` defaults to ``images/`` beside the JSON file when that folder exists, else the
    JSON file's own folder.
    """
    json_path = Path(json_path)
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: not a Karpathy split file (expected an object with an 'images' list)")
    if images_root is None:
        images_root = json_path.parent / "images" if (json_path.parent / "images").is_dir() else json_path.parent
    images_root = Path(images_root)
    problems = _Problems(strict)
    entries: dict[str, dict] = {}
    for k, img in enumerate(data["images"]):
        where = f"{json_path}: images[{k}]"
        if not isinstance(img, dict) or "filename" not in img or "sentences" not in img:
            raise ValueError(f"{where}: expected an object with 'filename', 'split' and 'sentences'")
        split = normalize_split(img.get("split", "train"), where)
        rel = Path(img.get("filepath", "")) / img["filename"]
        image_id = str(img.get("cocoid", img.get("imgid", img["filename"])))
        caps = []
        for j, s in enumerate(img["sentences"]):
            text = s.get("raw") if isinstance(s, dict) else None
            if text is None and isinstance(s, dict) and "tokens" in s:
                text = " ".join(s["tokens"])
            caps.append((text or "", f"{where}.sentences[{j}]"))
        entries[image_id] = {"path": images_root / rel, "captions": caps, "split": split, "where": where}
    name = str(data.get("dataset", json_path.stem))
    return _finish(name, str(json_path), entries, problems, check_files)


# -- Flickr8k official text release ----------------------------------------------------------------------
def read_flickr8k(root: str | Path, images_root: str | Path | None = None, strict: bool = False,
                  check_files: bool = True) -> CaptionDataset:
    """Read ``Flickr8k.token.txt`` and the ``Flickr_8k.{train,dev,test}Images.txt`` split files in ``root``.

    Images are looked up in ``images_root`` (default: ``root/images`` or ``root/Flicker8k_Dataset``).
    Captions of images that no split file names are ignored (the release's one junk key among them).
    """
    root = Path(root)
    token_file = root / "Flickr8k.token.txt"
    if not token_file.is_file():
        raise FileNotFoundError(f"Flickr8k token file not found: {token_file} (expected the official text release in {root})")
    split_of: dict[str, str] = {}
    for split, fname in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                         ("test", "Flickr_8k.testImages.txt")):
        p = root / fname
        if not p.is_file():
            raise FileNotFoundError(f"Flickr8k split file not found: {p}")
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                split_of[line.strip()] = split
    if images_root is None:
        images_root = next((root / d for d in ("images", "Flicker8k_Dataset", "Flickr8k_Dataset") if (root / d).is_dir()),
                           root / "images")
    images_root = Path(images_root)
    problems = _Problems(strict)
    entries: dict[str, dict] = {name: {"path": images_root / name, "captions": [], "split": split,
                                       "where": f"{root / 'Flickr_8k.*Images.txt'}"} for name, split in split_of.items()}
    unsplit: set[str] = set()
    with open(token_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, text = line.partition("\t")
            if not sep:
                raise ValueError(f"{token_file}:{lineno}: expected 'IMAGE.jpg#k<TAB>caption', got {line[:60]!r}")
            name = key.split("#", 1)[0]
            if name not in entries:
                unsplit.add(name)
                continue
            entries[name]["captions"].append((text, f"{token_file}:{lineno}"))
            entries[name]["where"] = f"{token_file}:{lineno}"
    ds = _finish("flickr8k", str(root), entries, problems, check_files)
    if unsplit:
        ds.problems.append(f"{token_file}: captions of {len(unsplit)} image name(s) in no split file ignored "
                           f"(e.g. {sorted(unsplit)[0]!r})")
    return ds


# -- COCO annotation files --------------------------------------------------------------------------------
def read_coco(captions_json: str | Path, images_root: str | Path | None = None, split: str | None = None,
              strict: bool = False, check_files: bool = True, val_fraction: float = 0.1,
              test_fraction: float = 0.1) -> CaptionDataset:
    """Read a COCO ``captions_*.json`` file (``images`` with ``id``/``file_name``, ``annotations`` with
    ``image_id``/``caption``).

    ``split``: the split of every image; None = split by image-id hash into train/val/test with
    ``val_fraction`` and ``test_fraction``. ``images_root`` defaults to the folder named after the file
    (``captions_val2017.json`` → ``val2017/``) beside it or in ``../images``.
    """
    captions_json = Path(captions_json)
    data = _read_json(captions_json)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(data.get("images"), list):
        raise ValueError(f"{captions_json}: not a COCO captions file (expected 'images' and 'annotations' lists)")
    if images_root is None:
        sub = captions_json.stem.split("_", 1)[-1]  # captions_val2017 → val2017
        cands = [captions_json.parent / sub, captions_json.parent.parent / "images" / sub,
                 captions_json.parent.parent / sub, captions_json.parent / "images"]
        images_root = next((c for c in cands if c.is_dir()), cands[0])
    images_root = Path(images_root)
    problems = _Problems(strict)
    entries: dict[str, dict] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(f"{captions_json}: images[{k}]: expected an object with 'id' and 'file_name'")
        entries[str(img["id"])] = {"path": images_root / img["file_name"], "captions": [], "split": None,
                                   "where": f"{captions_json}: images[{k}]"}
    for k, ann in enumerate(data["annotations"]):
        where = f"{captions_json}: annotations[{k}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{where}: expected an object with 'image_id' and 'caption'")
        e = entries.get(str(ann["image_id"]))
        if e is None:
            problems(f"{where}: caption for image id {ann['image_id']!r}, which 'images' does not list; ignored")
            continue
        e["captions"].append((str(ann["caption"]), where))
    if split is not None:
        split = normalize_split(split, "split")
        for e in entries.values():
            e["split"] = split
    else:
        splits = assign_splits(list(entries), val_fraction, test_fraction)
        for i, e in entries.items():
            e["split"] = splits[i]
    return _finish(captions_json.stem, str(captions_json), entries, problems, check_files)


# -- a folder of images + CSV / JSONL ------------------------------------------------------------------------
_IMAGE_COLS = ("image", "file", "filename", "file_name", "image_path", "path")
_CAPTION_COLS = ("caption", "text", "sentence", "description")


def read_folder(folder: str | Path, captions_file: str | Path | None = None, strict: bool = False,
                check_files: bool = True, val_fraction: float = 0.1, test_fraction: float = 0.1) -> CaptionDataset:
    """Read a folder of images with captions in a CSV or JSONL file.

    ``captions_file`` defaults to ``captions.csv``, ``captions.jsonl`` or ``captions.tsv`` in ``folder``.
    CSV/TSV: a header row with an image column (``image``/``file``/``filename``) and a caption column
    (``caption``/``text``), optional ``split``; one row per caption. JSONL: one object per line with
    ``image`` and ``caption`` (a string) or ``captions`` (a list), optional ``split``. Image names are
    relative to ``folder``. Without a split column the images are split by hash (:func:`assign_splits`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder not found: {folder}")
    if captions_file is None:
        found = [folder / n for n in ("captions.csv", "captions.jsonl", "captions.tsv") if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no captions.csv, captions.jsonl or captions.tsv in {folder}; "
                                    "pass the captions file explicitly")
        captions_file = found[0]
    captions_file = Path(captions_file)
    if not captions_file.is_file():
        raise FileNotFoundError(f"captions file not found: {captions_file}")
    problems = _Problems(strict)
    entries: dict[str, dict] = {}

    def add(image: str, caps: list[str], split: str | None, where: str) -> None:
        image = image.strip()
        if not image:
            problems(f"{where}: empty image name")
            return
        e = entries.setdefault(image, {"path": folder / image, "captions": [], "split": None, "where": where})
        e["captions"].extend((c, where) for c in caps)
        if split:
            s = normalize_split(split, where)
            if e["split"] not in (None, s):
                raise ValueError(f"{where}: image {image!r} is in split {s!r} here but {e['split']!r} earlier")
            e["split"] = s

    if captions_file.suffix.lower() in (".jsonl", ".json"):
        with open(captions_file, encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark is not a column name
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{captions_file}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object per line")
                image = next((obj[k] for k in _IMAGE_COLS if k in obj), None)
                if image is None:
                    raise ValueError(f"{where}: no image field (one of {', '.join(_IMAGE_COLS)})")
                if "captions" in obj:
                    if not isinstance(obj["captions"], list):
                        raise ValueError(f"{where}: 'captions' must be a list of strings")
                    caps = [str(c) for c in obj["captions"]]
                else:
                    cap = next((obj[k] for k in _CAPTION_COLS if k in obj), None)
                    if cap is None:
                        raise ValueError(f"{where}: no caption field ('caption' or 'captions')")
                    caps = [str(cap)]
                add(str(image), caps, obj.get("split"), where)
    else:
        delim = "\t" if captions_file.suffix.lower() == ".tsv" else ","
        with open(captions_file, encoding="utf-8-sig", newline="") as f:  # Excel writes a byte-order mark
            reader = csv.DictReader(f, delimiter=delim)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            icol = next((cols[c] for c in _IMAGE_COLS if c in cols), None)
            ccol = next((cols[c] for c in _CAPTION_COLS if c in cols), None)
            if icol is None or ccol is None:
                raise ValueError(f"{captions_file}:1: the header must name an image column ({'/'.join(_IMAGE_COLS[:3])}) "
                                 f"and a caption column ({'/'.join(_CAPTION_COLS[:2])}); got {reader.fieldnames}")
            scol = cols.get("split")
            for row in reader:
                where = f"{captions_file}:{reader.line_num}"
                add(row.get(icol) or "", [row.get(ccol) or ""], row.get(scol) if scol else None, where)
    if not entries:
        raise ValueError(f"{captions_file}: no captions found")
    unsplit = [i for i, e in entries.items() if e["split"] is None]
    if unsplit:
        if len(unsplit) < len(entries):
            raise ValueError(f"{captions_file}: some images have a split and {len(unsplit)} do not "
                             f"(e.g. {unsplit[0]!r}); give every image a split or none")
        for i, s in assign_splits(unsplit, val_fraction, test_fraction).items():
            entries[i]["split"] = s
    return _finish(folder.name, str(captions_file), entries, problems, check_files)
