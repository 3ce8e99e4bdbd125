"""Frozen CNN image encoders (MobileNetV2, EfficientNet-Lite) and the on-disk feature cache."""

from bnrhn.encoders.base import (
    ImageEncoder,
    EfficientNetLiteEncoder,
    ImageFileError,
    MobileNetV2Encoder,
    TorchvisionEncoder,
    build_encoder,
    imagenet_tensor,
    load_image,
    stack_images,
)
from bnrhn.encoders.cache import FeatureSet, default_cache_root, extract_features
from bnrhn.encoders.efficientnet_lite import EfficientNetLite, load_efficientnet_lite
from bnrhn.encoders.mobilenet_v2 import MobileNetV2, load_mobilenet_v2
from bnrhn.encoders.weights import find_efficientnet_lite_weights, find_mobilenet_weights

__all__ = [
    "ImageEncoder", "ImageFileError", "MobileNetV2Encoder", "TorchvisionEncoder", "build_encoder",
    "imagenet_tensor", "load_image", "stack_images", "FeatureSet", "default_cache_root", "extract_features",
    "MobileNetV2", "load_mobilenet_v2", "find_mobilenet_weights",
    "EfficientNetLiteEncoder", "EfficientNetLite", "load_efficientnet_lite", "find_efficientnet_lite_weights",
]
