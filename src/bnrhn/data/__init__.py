"""Data: caption data sets (readers, vocabulary, synthetic scenes); character corpora in ``bnrhn.data.text``."""

from bnrhn.data.captions import (
    CaptionDataset,
    ImageRecord,
    assign_splits,
    read_coco,
    read_flickr8k,
    read_folder,
    read_karpathy,
)
from bnrhn.data.synthetic import make_scene, synthetic_dataset
from bnrhn.data.vocab import Vocabulary, tokenize

__all__ = [
    "CaptionDataset", "ImageRecord", "assign_splits", "read_coco", "read_flickr8k", "read_folder", "read_karpathy",
    "make_scene", "synthetic_dataset", "Vocabulary", "tokenize",
]
