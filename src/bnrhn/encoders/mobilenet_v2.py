"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

Written from the paper's architecture (Table 2), with module names chosen so that ``state_dict()`` has
exactly the keys and shapes of torchvision's ImageNet checkpoint ``mobilenet_v2-b0353104.pth``, which
therefore loads with ``strict=True`` (torchvision itself is not needed).

Structure (input 224×224×3):

    conv 3×3, 32, stride 2, BN, ReLU6                                    features.0
    bottlenecks (t = expansion, c = output channels, n = repeats, s = stride of the first):
        t=1 c=16 n=1 s=1 | t=6 c=24 n=2 s=2 | t=6 c=32 n=3 s=2 | t=6 c=64 n=4 s=2
        t=6 c=96 n=3 s=1 | t=6 c=160 n=3 s=2 | t=6 c=320 n=1 s=1          features.1 .. features.17
    conv 1×1, 1280, BN, ReLU6                                            features.18   → 7×7×1280 grid
    global average pool → dropout 0.2 → linear 1000                      classifier

An inverted-residual bottleneck with input channels k, expansion t and output channels c computes

    y = BN(W_project * ReLU6(BN(DW_3×3,s * ReLU6(BN(W_expand * x)))))     (the expansion is skipped when t = 1)
    out = x + y  when s = 1 and k = c,  else y                            (linear bottleneck: no ReLU after project)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FEATURE_SIZE = 1280
GRID = 7  # spatial side of the last feature map for a 224×224 input


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv (no bias) → BN → ReLU6; indices 0/1/2 give torchvision's key names."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1×1) → depthwise 3×3 → linear project (1×1), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_skip = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return x + y if self.use_skip else y


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 (width 1.0). ``features(x)`` gives the ``[B, 1280, 7, 7]`` grid for 224×224 input."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        cin = 32
        blocks: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, stride=2)]
        for t, c, n, s in SETTINGS:
            for k in range(n):
                blocks.append(InvertedResidual(cin, c, s if k == 0 else 1, t))
                cin = c
        blocks.append(_conv_bn_relu6(cin, FEATURE_SIZE, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_SIZE, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits ``[B, 1000]``."""
        return self.classifier(self.features(x).mean((2, 3)))

    def grid_and_pooled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(grid ``[B, H·W, 1280]`` of the last feature map, its global average ``[B, 1280]``)."""
        f = self.features(x)
        grid = f.flatten(2).transpose(1, 2)
        return grid, f.mean((2, 3))


def load_mobilenet_v2(weights_path, map_location="cpu") -> MobileNetV2:
    """MobileNetV2 with the ImageNet weights in ``weights_path`` (torchvision's state-dict format), eval mode."""
    from bnrhn.encoders.weights import load_weights_strictly

    return load_weights_strictly(MobileNetV2(), weights_path, "MobileNetV2", "torchvision ImageNet MobileNetV2",
                                 map_location)
