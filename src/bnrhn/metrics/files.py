"""Reading caption result files and reference annotations for :mod:`bnrhn.commands.score`.

Results: the COCO result format, a JSON list ``[{"image_id": ..., "caption": "..."}, ...]`` with one
caption per image.

References, three formats (detected from the content):

- COCO caption annotations (``captions_val2017.json``): ``{"annotations": [{"image_id", "caption"}, ...]}``;
- Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``): ``{"images": [{"filename",
  "imgid", "cocoid" (COCO only), "split", "sentences": [{"raw", "tokens"}, ...]}, ...]}``; the raw
  sentences are used (tokenized like every reference), or the tokens joined when ``raw`` is absent;
  ``split`` restricts the images (``train``, ``restval``, ``val``, ``test``);
- Flickr8k's ``Flickr8k.token.txt``: ``IMAGE.jpg#k<TAB>caption`` lines (the image is the part before
  ``#``).

Karpathy and Flickr8k files name an image in several ways (``cocoid``, ``imgid``, ``filename``, the file
name without extension): :func:`match_references` keys the references by whichever of these the result
file's ``image_id`` values use. Ids compare as written, or else as strings ("397133" matches 397133).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["load_results", "load_references", "match_references", "References"]


def _load_json(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def load_results(path: str) -> dict[Hashable, str]:
    """image id -> caption from a COCO result file; errors name the offending entry."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a result file must be a JSON list of {{\"image_id\": ..., \"caption\": ...}} "
                         f"entries, got a JSON {type(data).__name__}")
    out: dict[Hashable, str] = {}
    first_seen: dict[Hashable, int] = {}
    for k, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry #{k} is not an object with \"image_id\" and \"caption\": {entry!r:.200}")
        if "image_id" not in entry or "caption" not in entry:
            missing = [key for key in ("image_id", "caption") if key not in entry]
            raise ValueError(f"{path}: entry #{k} has no {' and no '.join(repr(m) for m in missing)}: {entry!r:.200}")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise ValueError(f"{path}: entry #{k}: image_id must be an integer or a string, got {image_id!r}")
        if not isinstance(caption, str):
            raise ValueError(f"{path}: entry #{k} (image_id {image_id!r}): the caption is not a string: {caption!r:.200}")
        if image_id in out:
            raise ValueError(f"{path}: image_id {image_id!r} appears twice (entries #{first_seen[image_id]} and #{k}); "
                             "a result file has one caption per image")
        out[image_id] = caption
        first_seen[image_id] = k
    if not out:
        raise ValueError(f"{path}: the result file is empty")
    return out


@dataclass
class References:
    """Reference captions keyed in every way the source names its images.

    ``by_key[name]`` maps image keys of that kind (``image_id``, ``cocoid``, ``imgid``, ``filename``,
    ``stem``) to the image's index in ``captions``.
    """

    captions: list[list[str]]
    by_key: dict[str, dict[Hashable, int]] = field(default_factory=dict)
    format: str = ""


def load_references(path: str, split: str | None = None) -> References:
    """Read COCO annotations, a Karpathy split file or Flickr8k's token file (see the module docstring)."""
    if path.endswith(".txt"):
        if split:
            raise ValueError("--split applies to Karpathy split JSON files, not to a Flickr8k token file")
        return _load_flickr_tokens(path)
    data = _load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        if split:
            raise ValueError(f"{path}: --split applies to Karpathy split files; COCO annotation files have no "
                             "split field (use the annotation file of the split instead)")
        return _load_coco(path, data)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and \
            any(isinstance(im, dict) and "sentences" in im for im in data["images"]):
        return _load_karpathy(path, data, split)
    raise ValueError(f"{path}: not a COCO caption annotation file ({{\"annotations\": [...]}}) nor a Karpathy split "
                     "file ({\"images\": [{\"sentences\": [...]}]})")


def _load_coco(path: str, data: dict) -> References:
    anns = data["annotations"]
    if not isinstance(anns, list):
        raise ValueError(f"{path}: \"annotations\" must be a list")
    index: dict[Hashable, int] = {}
    captions: list[list[str]] = []
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise ValueError(f"{path}: annotation #{k} has no \"image_id\" or \"caption\": {a!r:.200}")
        if not isinstance(a["caption"], str):
            raise ValueError(f"{path}: annotation #{k} (image_id {a['image_id']!r}): the caption is not a string")
        i = index.setdefault(a["image_id"], len(captions))
        if i == len(captions):
            captions.append([])
        captions[i].append(a["caption"])
    if not captions:
        raise ValueError(f"{path}: no annotations")
    return References(captions, {"image_id": index}, "coco")


def _load_karpathy(path: str, data: dict, split: str | None) -> References:
    captions: list[list[str]] = []
    keys: dict[str, dict[Hashable, int]] = defaultdict(dict)
    splits_seen = set()
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise ValueError(f"{path}: images[{k}] is not an object")
        splits_seen.add(im.get("split"))
        if split and im.get("split") != split:
            continue
        sents = []
        for j, s in enumerate(im.get("sentences") or []):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(s["tokens"])
            if not isinstance(raw, str):
                raise ValueError(f"{path}: images[{k}] sentence #{j} has no \"raw\" string nor \"tokens\" list")
            sents.append(raw)
        if not sents:
            continue
        idx = len(captions)
        captions.append(sents)
        for name in ("cocoid", "imgid", "filename"):
            if name in im:
                keys[name].setdefault(im[name], idx)
        if isinstance(im.get("filename"), str):
            keys["stem"].setdefault(os.path.splitext(im["filename"])[0], idx)
    if not captions:
        if split:
            raise ValueError(f"{path}: no image with split {split!r} (splits in the file: "
                             f"{', '.join(sorted(str(s) for s in splits_seen))})")
        raise ValueError(f"{path}: no image with sentences")
    return References(captions, dict(keys), "karpathy")


def _load_flickr_tokens(path: str) -> References:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    captions: list[list[str]] = []
    keys: dict[str, dict[Hashable, int]] = {"filename": {}, "stem": {}}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "\t" not in line or "#" not in line.split("\t", 1)[0]:
                raise ValueError(f"{path}:{n}: expected IMAGE#k<TAB>caption, got {line[:200]!r}")
            key, caption = line.split("\t", 1)
            name = key.split("#", 1)[0]
            idx = keys["filename"].setdefault(name, len(captions))
            if idx == len(captions):
                captions.append([])
                keys["stem"].setdefault(os.path.splitext(name)[0], idx)
            captions[idx].append(caption)
    if not captions:
        raise ValueError(f"{path}: no captions")
    return References(captions, keys, "flickr8k")


def match_references(candidate_ids: list[Hashable], refs: References) -> tuple[dict[Hashable, list[str]], str, int]:
    """References keyed by the candidates' ids.

    Picks the naming (``image_id``/``cocoid``/``imgid``/``filename``/``stem``) under which every
    candidate id is found; raises ValueError naming the first id that no naming knows. Returns
    (references for the candidates, the naming used, the number of reference images left out because
    they have no candidate).
    """
    best_name, best_missing = None, None
    for name, index in refs.by_key.items():
        as_str = {str(k): v for k, v in index.items()}
        missing = [c for c in candidate_ids if c not in index and str(c) not in as_str]
        if not missing:
            out = {c: refs.captions[index[c] if c in index else as_str[str(c)]] for c in candidate_ids}
            return out, name, len(refs.captions) - len(out)
        if best_missing is None or len(missing) < len(best_missing):
            best_name, best_missing = name, missing
    shown = ", ".join(repr(m) for m in best_missing[:5])
    more = f" (and {len(best_missing) - 5} more)" if len(best_missing) > 5 else ""
    raise ValueError(f"no references for image id {shown}{more}: {len(best_missing)} of {len(candidate_ids)} "
                     f"result image ids are not in the references (closest match: their {best_name!r} field)")
