"""A compact U-Net that trains usefully on a laptop CPU (about 0.7 M parameters at ``width=16``).

Stem at 1/2 resolution, three downsamplings to 1/16, a decoder with skip connections back to
1/2, a 1x1 classifier, and a bilinear upsampling to the input size: ``forward`` returns logits
``[B, C, H, W]``. GroupNorm by default, so training does not depend on the batch size or on how
a batch is split across DDP processes, and train/eval behave the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from segreward.errors import SegrewardError


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(min(8, ch // 4) or 1, ch)
    if kind == "bn":
        return nn.BatchNorm2d(ch)
    if kind == "none":
        return nn.Identity()
    raise SegrewardError(f"unet: unknown norm {kind!r}; use gn, bn or none")


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1, dilation: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=norm == "none"),
                         _norm(norm, cout), nn.ReLU(inplace=True))


class Block(nn.Sequential):
    """Two 3x3 convolutions; the first may downsample."""

    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1):
        super().__init__(ConvNormAct(cin, cout, norm, stride), ConvNormAct(cout, cout, norm))


class UNet(nn.Module):
    """Compact U-Net. ``width`` is the channel count at 1/2 resolution; it doubles per level."""

    output_stride = 1
    classifier_name = "classifier"

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 3, norm: str = "gn",
                 dropout: float = 0.1):
        super().__init__()
        if num_classes < 1 or width < 4:
            raise SegrewardError(f"unet: need num_classes >= 1 and width >= 4, got {num_classes}, {width}")
        self.num_classes = num_classes
        c = [width, 2 * width, 4 * width, 8 * width]
        self.stem = Block(in_channels, c[0], norm, stride=2)          # 1/2
        self.down1 = Block(c[0], c[1], norm, stride=2)               # 1/4
        self.down2 = Block(c[1], c[2], norm, stride=2)               # 1/8
        self.down3 = Block(c[2], c[3], norm, stride=2)               # 1/16
        self.up2 = Block(c[3] + c[2], c[2], norm)
        self.up1 = Block(c[2] + c[1], c[1], norm)
        self.up0 = Block(c[1] + c[0], c[0], norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(c[0], num_classes, 1)

    @staticmethod
    def _up(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, skip], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        s0 = self.stem(x)
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        s3 = self.down3(s2)
        y = self.up2(self._up(s3, s2))
        y = self.up1(self._up(y, s1))
        y = self.up0(self._up(y, s0))
        y = self.classifier(self.dropout(y))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)
