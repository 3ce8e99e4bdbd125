"""Frozen image encoders: image file → (pooled vector, spatial grid).

An encoder has a ``name``, a ``feature_size`` F, a ``grid_size`` N (positions of the spatial grid), a
``weights_id`` (sha256 of its weights file, or torchvision's weights name) and a ``preprocess_id``
(the preprocessing in words); these four identify the features in the cache.

Built in: ``mobilenet_v2`` (ImageNet MobileNetV2, pooled 1280-d, grid 7×7×1280, weights found offline,
see :mod:`bnrhn.encoders.weights`) and ``efficientnet_lite2`` (ImageNet EfficientNet-Lite2, 260×260 input,
pooled 1280-d, grid 9×9×1280; also ``efficientnet_lite0`` / ``_lite1``, see :class:`EfficientNetLiteEncoder`
and :mod:`bnrhn.encoders.efficientnet_lite`). With torchvision installed, ``tv:NAME`` is any network of
``torchvision.models`` with its default pretrained weights (taken from torch's hub cache; nothing is
downloaded unless torchvision itself does so).

Preprocessing of ``mobilenet_v2``: RGB, resize to 224×224 (``resize="squash"``, the default: the
whole image stays in view, as captions describe the whole image) or shorter side to 256 and a
224×224 centre crop (``resize="crop"``, ImageNet's evaluation protocol), then per-channel ImageNet
mean/std normalisation. EfficientNet-Lite's is the same at its own size (Lite2: 260, crop from 292) with
its release's normalisation, ``(pixel - 127) / 128``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("squash", "crop")
COMPILE_CHOICES = ("auto", "yes", "no")
# From this many images on, compiling the CNN (about 5 s for MobileNetV2 on 2 cores, once per process) pays
# for itself: docs/performance.md, "Feature extraction" (break-even measured at 2,000–4,000 images).
COMPILE_MIN_IMAGES = 2000
# On CPU a trunk runs over any batch this many images at a time: the early feature maps take megabytes per
# image (MobileNetV2's largest, 96 × 112 × 112 floats, 4.8 MB), so four images' maps stay in a
# last-level cache between layers where 32 images' (154 MB) go out to memory and back at every layer.
# docs/performance.md, "Feature extraction": 154 against 85 images/s (MobileNetV2, eager), 57 against 24
# (EfficientNet-Lite2) on 2 cores with a 32 MB L3; one to eight images were all faster than 32.
CPU_CHUNK = 4


class ImageFileError(ValueError):
    """An image file that is missing or cannot be decoded; the message names the path."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_image(path: str | Path):
    """The image at ``path`` as an RGB PIL image, fully decoded (so truncated files fail here)."""
    p = Path(path)
    if not p.exists():
        raise ImageFileError(p, "file not found")
    if p.is_dir():
        raise ImageFileError(p, "is a directory, not an image file")
    return _decode(p, p)


class ImageTooLarge(ImageFileError):
    """An image with more pixels than the caller allows (a decompression bomb, or just too big)."""


def decode_image_bytes(data: bytes, name: str = "upload", max_pixels: int | None = None):
    """An uploaded image (its file's bytes) as an RGB PIL image, decoded as :func:`load_image` decodes files;
    :class:`ImageTooLarge` when it has more than ``max_pixels`` pixels (checked from the header, before
    decoding: a small file can declare a huge image)."""
    import io

    return _decode(io.BytesIO(data), name, max_pixels, formats=UPLOAD_FORMATS)


# Formats an upload may have: the photo formats. PIL can open many more (EPS through Ghostscript, among others),
# which a server should not run on files from strangers.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def _decode(source, name, max_pixels: int | None = None, formats: tuple[str, ...] | None = None):
    from PIL import Image, UnidentifiedImageError

    import warnings

    try:
        with warnings.catch_warnings():  # PIL warns between 1× and 2× its pixel limit; the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source, formats=formats)
        with im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(name, f"image too large: {im.width}×{im.height} = {im.width * im.height:,} "
                                          f"pixels, the limit is {max_pixels:,}")
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError:
        what = f"; accepted: {', '.join(formats)}" if formats else ""
        raise ImageFileError(name, f"not an image file (cannot identify the image format{what})") from None
    except Image.DecompressionBombError:
        limit = f"; the limit is {max_pixels:,}" if max_pixels is not None else ""
        raise ImageTooLarge(name, f"image too large: its header declares over {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
                                  f"(a decompression bomb?){limit}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, ImageFileError):
            raise
        raise ImageFileError(name, f"corrupt or unreadable image ({type(exc).__name__}: {exc})") from None


def to_rgb(im):
    """An 8-bit RGB rendering of a PIL image of any mode, the way an image viewer shows it.

    - The EXIF orientation is applied (a portrait phone photo stands upright).
    - 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) are scaled to 0..255 from their range:
      65,535 for 16-bit data (``I`` images whose values fit 16 bits, as 16-bit PNGs decode, too), else
      2³¹ − 1. PIL's own ``convert("RGB")`` clips them at 255, so a 16-bit photo comes out white.
    - Float greyscale (``F``) is read as 0..1 when its values lie in [0, 1], else as 0..255, and clipped.
    - Transparency (``RGBA``, ``LA``, ``PA``, palette or greyscale images with a transparent colour) is
      composited over white; dropping the alpha channel would show whatever colour the transparent
      pixels happen to hold.
    - Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, …) goes through PIL's ``convert("RGB")``.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            scale = 1.0 if a.size and np.nanmin(a) >= 0.0 and np.nanmax(a) <= 1.0 else 1.0 / 255.0
        elif mode == "I" and a.size and a.max() > 65535:
            scale = 1.0 / (2**31 - 1)
        else:
            scale = 1.0 / 65535.0
        a = np.clip(np.nan_to_num(a * scale * 255.0), 0.0, 255.0)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


class ImageEncoder:
    """Interface of a frozen encoder (see the module docstring)."""

    name: str
    feature_size: int
    grid_size: int
    weights_id: str
    preprocess_id: str

    def preprocess(self, image) -> Tensor:
        """A PIL RGB image → the ``[3, H, W]`` input tensor."""
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` → (pooled ``[B, F]``, grid ``[B, N, F]``), float32."""
        raise NotImplementedError

    def prepare_extraction(self, n_images: int, batch_size: int, compile: str, log) -> str:
        """Choose how :meth:`encode` runs for an extraction (see :class:`MobileNetV2Encoder`); "eager"."""
        return "eager"

    def engine(self) -> str:
        """How :meth:`encode` runs the network now: "compiled" or "eager"."""
        return "eager"

    def describe(self) -> dict:
        return {"encoder": self.name, "weights": self.weights_id, "preprocess": self.preprocess_id,
                "feature_size": self.feature_size, "grid_size": self.grid_size}

    def crop_sizes(self) -> tuple[float, float] | None:
        """(shorter side after resizing, side of the centre crop) when :meth:`preprocess` crops; None when it
        squashes the whole image to the input size."""
        return None

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom), in pixels of a ``width`` × ``height`` image, that
        :meth:`preprocess` keeps and the grid covers: the whole image, or the centre crop's square."""
        sizes = self.crop_sizes()
        if sizes is None:
            return 0.0, 0.0, float(width), float(height)
        short, crop = sizes
        side = crop * min(width, height) / short
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side


def imagenet_tensor(image, size: int = 224, resize: str = "squash", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    short: int | None = None) -> Tensor:
    """PIL image → normalised ``[3, size, size]`` float tensor (see the module docstring): pixels scaled to
    0..1, then ``(x - mean) / std`` per channel. ``short``: the shorter side before the centre crop of
    ``resize="crop"`` (default ``size·256/224``).

    The tensor is a ``[3, H, W]`` view of the image's ``H × W × 3`` pixel order (channels-last strides),
    which is the layout the CNN reads: :func:`stack_images` batches such tensors without transposing them.
    """
    from PIL import Image

    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "squash":
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
    else:
        w, h = image.size
        short = round(size * 256 / 224) if short is None else short
        scale = short / min(w, h)
        image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).float().div_(255.0)  # [H, W, 3]
    return x.sub_(torch.tensor(mean)).div_(torch.tensor(std)).permute(2, 0, 1)


def stack_images(tensors: list[Tensor]) -> Tensor:
    """``[3, H, W]`` image tensors → a ``[B, 3, H, W]`` batch in channels-last memory (the layout the CNN
    reads). Tensors from :func:`imagenet_tensor` are copied as they lie; others are transposed once here."""
    return torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)


def _fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold every Conv2d→BatchNorm2d pair of every Sequential in ``module`` (itself included, at any depth)
    into one Conv2d, in place (eval-mode inference only); returns ``module``.

    Uses ``torch.nn.utils.fusion.fuse_conv_bn_eval``; exact up to float rounding. MobileNetV2 has 52 such
    pairs, most of them inside the nested Sequentials of its inverted-residual blocks.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        _fuse_conv_bn(child)
    if isinstance(module, nn.Sequential):
        items, folded, i = list(module), [], 0
        while i < len(items):
            if (isinstance(items[i], nn.Conv2d) and i + 1 < len(items)
                    and isinstance(items[i + 1], nn.BatchNorm2d)):
                folded.append(fuse_conv_bn_eval(items[i], items[i + 1]))
                i += 2
            else:
                folded.append(items[i])
                i += 1
        if len(folded) < len(items):
            module._modules.clear()  # renumber: nn.Sequential has no public way to drop a member
            for j, item in enumerate(folded):
                module.add_module(str(j), item)
    return module


class FrozenTrunkEncoder(ImageEncoder):
    """A built-in encoder: a frozen CNN ``trunk`` (conv→BN pairs folded, channels-last) whose last feature
    map ``[B, F, g, g]`` is the grid and its mean the pooled vector; on CPU it runs CPU_CHUNK images at a
    time whatever the batch, and it is compiled for large extractions.
    Subclasses set ``trunk``, ``runner`` (= ``trunk``), ``device`` and the :class:`ImageEncoder` attributes."""

    trunk: nn.Module
    device: torch.device

    def chunk_size(self, batch_size: int) -> int:
        """How many images of a ``batch_size`` batch the trunk runs at a time: CPU_CHUNK on CPU, all elsewhere."""
        return max(1, min(CPU_CHUNK, batch_size) if self.device.type == "cpu" else batch_size)

    def prepare_extraction(self, n_images: int, batch_size: int, compile: str, log) -> str:
        """Choose how :meth:`encode` runs the CNN for an extraction of ``n_images`` in batches of
        ``batch_size``: ``compile`` = ``"auto"`` (compiled from COMPILE_MIN_IMAGES images on, on CPU),
        ``"yes"`` or ``"no"``. Returns ``"compiled"`` or ``"eager"`` (also when compiling is not possible
        here: :mod:`bnrhn.encoders.compiled` says why in one line)."""
        from bnrhn.encoders.compiled import CompiledTrunk

        if compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {compile!r}")
        wanted = compile == "yes" or (compile == "auto" and n_images >= COMPILE_MIN_IMAGES and self.device.type == "cpu")
        if not wanted:
            self.runner = self.trunk
            return "eager"
        chunk = self.chunk_size(batch_size)
        reusable = isinstance(self.runner, CompiledTrunk) and self.runner.engine == "compiled"
        if not reusable or self.runner.batch_size != chunk:  # a fallback is not kept: each extraction tries
            self.runner = CompiledTrunk(self.trunk, chunk, log)
        return self.runner.engine

    def engine(self) -> str:
        return getattr(self.runner, "engine", "eager")  # a CompiledTrunk falls back to "eager" when it fails

    @torch.inference_mode()
    def encode(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        parts = batch.split(self.chunk_size(batch.shape[0]))  # an image's features depend on that image alone
        f = (self.runner(parts[0]) if len(parts) == 1 else torch.cat([self.runner(p) for p in parts])).float()
        grid = f.flatten(2).transpose(1, 2).contiguous()
        return f.mean((2, 3)), grid


class MobileNetV2Encoder(FrozenTrunkEncoder):
    """The built-in ImageNet MobileNetV2: pooled 1280-d, grid 7×7×1280 (for 224×224 input)."""

    def __init__(self, weights: str | Path | None = None, resize: str = "squash", device: str = "cpu",
                 fuse: bool = True) -> None:
        import copy

        from bnrhn.encoders.mobilenet_v2 import FEATURE_SIZE, GRID, load_mobilenet_v2
        from bnrhn.encoders.weights import file_sha256, find_mobilenet_weights

        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        path = find_mobilenet_weights(weights)
        self.weights_path = path
        self.model = load_mobilenet_v2(path)
        trunk = self.model.features
        if fuse:
            trunk = _fuse_conv_bn(copy.deepcopy(trunk))
        self.device = torch.device(device)
        # channels_last lets oneDNN run the depthwise convolutions much faster on CPU.
        self.trunk = trunk.to(self.device, memory_format=torch.channels_last).eval()
        self.runner = self.trunk  # the eager trunk, or its compiled form (prepare_extraction)
        self.name = "mobilenet_v2"
        self.feature_size = FEATURE_SIZE
        self.grid_size = GRID * GRID
        self.weights_id = file_sha256(path)
        self.resize = resize
        self.preprocess_id = f"rgb(exif,16-bit,alpha-on-white),{'resize224' if resize == 'squash' else 'resize256,centercrop224'},bilinear,imagenet-mean-std"

    def preprocess(self, image) -> Tensor:
        return imagenet_tensor(image, 224, self.resize)

    def crop_sizes(self) -> tuple[float, float] | None:
        return (256.0, 224.0) if self.resize == "crop" else None


# The released EfficientNet-Lite weights expect pixels (0..255) as (x - 127) / 128 (the TensorFlow Lite
# release's normalisation), i.e. 0..1 pixels with mean 127/255 and std 128/255 on every channel. Checked on
# real photos (docs/captioning.md, "Image features"): with ImageNet's mean/std instead, Lite2 classifies Flickr8k's
# dog photos as dogs less often (73 % instead of 86 % of 96 photos) and less confidently.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
EFFICIENTNET_LITE_NAMES = {f"efficientnet_{v}": v for v in ("lite0", "lite1", "lite2")}


class EfficientNetLiteEncoder(FrozenTrunkEncoder):
    """The built-in ImageNet EfficientNet-Lite0/1/2 (:mod:`bnrhn.encoders.efficientnet_lite`): pooled 1280-d,
    grid g×g×1280 at the variant's own input size (Lite0 224 → 7×7, Lite1 240 → 8×8, Lite2 260 → 9×9).

    Preprocessing: RGB, resize to the input size (``squash``) or shorter side to size + 32 and a centre crop
    (``crop``, the TensorFlow EfficientNet evaluation protocol), bilinear, ``(pixel - 127) / 128``."""

    def __init__(self, variant: str = "lite2", weights: str | Path | None = None, resize: str = "squash",
                 device: str = "cpu", fuse: bool = True) -> None:
        from bnrhn.encoders.efficientnet_lite import (FEATURE_SIZE, FeatureTrunk, grid_side, input_size,
                                                      load_efficientnet_lite)
        from bnrhn.encoders.weights import file_sha256, find_efficientnet_lite_weights

        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        path = find_efficientnet_lite_weights(variant, weights)
        self.weights_path = path
        self.model = load_efficientnet_lite(path, variant)
        self.device = torch.device(device)
        self.trunk = FeatureTrunk(self.model, fold=fuse).to(self.device, memory_format=torch.channels_last).eval()
        self.runner = self.trunk  # the eager trunk, or its compiled form (prepare_extraction)
        self.variant = variant
        self.size = input_size(variant)
        self.name = f"efficientnet_{variant}"
        self.feature_size = FEATURE_SIZE
        self.grid_size = grid_side(variant) ** 2
        self.weights_id = file_sha256(path)
        self.resize = resize
        s = self.size
        sizes = f"resize{s}" if resize == "squash" else f"resize{s + 32},centercrop{s}"
        self.preprocess_id = f"rgb(exif,16-bit,alpha-on-white),{sizes},bilinear,tf-lite-127-128"

    def preprocess(self, image) -> Tensor:
        return imagenet_tensor(image, self.size, self.resize, LITE_MEAN, LITE_STD, short=self.size + 32)

    def crop_sizes(self) -> tuple[float, float] | None:
        return (float(self.size + 32), float(self.size)) if self.resize == "crop" else None


class TorchvisionEncoder(ImageEncoder):
    """Any ``torchvision.models`` network with its default ImageNet weights (``tv:resnet50``...).

    The grid is the input of the network's last ``AdaptiveAvgPool2d`` (ResNets, RegNets, MobileNetV3,
    EfficientNets, ConvNeXt...), or the output of its ``features`` block when it pools functionally
    (MobileNetV2, DenseNet without the final ReLU); the pooled vector is the grid's mean.
    """

    def __init__(self, arch: str, device: str = "cpu") -> None:
        try:
            import torchvision  # noqa: F401
            from torchvision import models
        except ImportError:
            raise ValueError(
                f"encoder 'tv:{arch}' needs torchvision, which is not installed; use the built-in "
                "'mobilenet_v2' encoder or install torchvision"
            ) from None
        try:
            weights_enum = models.get_model_weights(arch)
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"unknown torchvision model {arch!r}; see torchvision.models.list_models()") from None
        weights = weights_enum.DEFAULT
        try:
            net = models.get_model(arch, weights=weights)
        except Exception as exc:  # noqa: BLE001 — offline download failures come in many types
            raise FileNotFoundError(
                f"cannot load torchvision weights {weights} for {arch!r} ({type(exc).__name__}: {exc}); "
                "put the weights file in torch's hub cache ($TORCH_HOME/hub/checkpoints) first"
            ) from None
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self._transform = weights.transforms()
        self._pool = next((m for m in reversed(list(net.modules())) if isinstance(m, nn.AdaptiveAvgPool2d)), None)
        if self._pool is None and not hasattr(net, "features"):
            raise ValueError(f"torchvision model {arch!r} has neither an AdaptiveAvgPool2d nor a 'features' block")
        self.name = f"tv:{arch}"
        self.weights_id = f"torchvision:{weights}"
        self.preprocess_id = repr(self._transform).replace("\n", " ")
        size = getattr(self._transform, "crop_size", [224])
        dummy = torch.zeros(1, 3, int(size[0]), int(size[0]))
        pooled, grid = self.encode(dummy)
        self.feature_size = pooled.shape[1]
        self.grid_size = grid.shape[1]

    def preprocess(self, image) -> Tensor:
        return self._transform(image)

    def crop_sizes(self) -> tuple[float, float] | None:
        short, crop = getattr(self._transform, "resize_size", None), getattr(self._transform, "crop_size", None)
        return (float(short[0]), float(crop[0])) if short and crop else None

    @torch.inference_mode()
    def encode(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        batch = batch.to(self.device)
        if self._pool is not None:
            grabbed: list[Tensor] = []
            handle = self._pool.register_forward_pre_hook(lambda mod, args: grabbed.append(args[0]))
            try:
                self.net(batch)
            finally:
                handle.remove()
            f = grabbed[-1]
        else:
            f = self.net.features(batch)
        f = f.float()
        grid = f.flatten(2).transpose(1, 2).contiguous()
        return grid.mean(1), grid


def build_encoder(name: str = "mobilenet_v2", weights: str | Path | None = None, resize: str = "squash",
                  device: str = "cpu") -> ImageEncoder:
    """The encoder called ``name``: ``mobilenet_v2`` or ``efficientnet_lite0/1/2`` (built in; ``weights``: their
    weights file, else found offline) or ``tv:ARCH`` (torchvision)."""
    if name in ("mobilenet_v2", "mobilenetv2"):
        return MobileNetV2Encoder(weights, resize=resize, device=device)
    if name in EFFICIENTNET_LITE_NAMES:
        return EfficientNetLiteEncoder(EFFICIENTNET_LITE_NAMES[name], weights, resize=resize, device=device)
    if name.startswith("tv:") or name.startswith("torchvision:"):
        return TorchvisionEncoder(name.split(":", 1)[1], device=device)
    raise ValueError(f"unknown encoder {name!r}; use 'mobilenet_v2', 'efficientnet_lite2' (or _lite0, _lite1) "
                     "or 'tv:ARCH' (any torchvision.models network)")
