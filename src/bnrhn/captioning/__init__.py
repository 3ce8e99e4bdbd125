"""Image captioning: configuration, data preparation, the training task and the high-level API.

The API the other commands use (see :mod:`bnrhn.captioning.api`)::

    train(config) -> RunResult
    evaluate(checkpoint, split="test", beam=3) -> (results, scores)
    caption_images(checkpoint, paths, beam=3, topk=3) -> [ImageCaptions]
    caption_images(checkpoint, paths, attention=True)  # + per-word attention maps (Show, Attend and Tell)
    attention_figure(image_captions, "out.png")         # the Xu et al. figure of one image's caption
    load_dataset(spec) -> CaptionDataset          # synthetic, flickr8k, karpathy:PATH, coco:PATH, folder:PATH
"""

from bnrhn.captioning.api import (
    ImageCaptions,
    LoadedCaptioner,
    RunResult,
    attention_figure,
    batchnorm_leak,
    caption_images,
    demo_config,
    evaluate,
    load_captioner,
    scores_table,
    prepare_data,
    train,
)
from bnrhn.captioning.config import CaptionConfig
from bnrhn.captioning.data import DATASET_SPECS, find_data_root, load_dataset
from bnrhn.captioning.scoring import ALL_METRICS, score_captions

__all__ = [
    "CaptionConfig", "demo_config", "train", "evaluate", "caption_images", "load_captioner", "prepare_data", "load_dataset",
    "find_data_root", "DATASET_SPECS", "RunResult", "ImageCaptions", "LoadedCaptioner", "scores_table",
    "score_captions", "ALL_METRICS", "batchnorm_leak", "attention_figure",
]
