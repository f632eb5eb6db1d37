"""ResNeXt-29 for CIFAR (Xie et al. 2017, "Aggregated Residual Transformations", sec. 5.3).

3x3 stem to 64 channels, three stages of three bottleneck blocks (stride 1, 2, 2) with outputs
256/512/1024 (widen factor 4). Each block: conv1x1 to D = cardinality * base_width * (out/256)
channels, grouped conv3x3 (groups = cardinality; carries the stride), conv1x1 to out, BN after
each; the shortcut is conv1x1 + BN where the shape changes. ResNeXt-29 8x64d has 34.43M
parameters at 10 classes (paper: 34.4M). Layout and names follow prlz77/ResNeXt.pytorch.
Convs Kaiming-normal, BN 1/0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .widths import init_module

__all__ = ["CifarResNeXt", "ResNeXtBottleneck"]


class ResNeXtBottleneck(nn.Module):
    def __init__(
        self, in_planes: int, out_planes: int, stride: int, cardinality: int, base_width: int
    ) -> None:
        super().__init__()
        d = cardinality * (base_width * out_planes // 256)
        self.conv_reduce = nn.Conv2d(in_planes, d, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.conv_conv = nn.Conv2d(
            d, d, 3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn = nn.BatchNorm2d(d)
        self.conv_expand = nn.Conv2d(d, out_planes, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        return F.relu(out + self.shortcut(x))


class CifarResNeXt(nn.Module):
    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 8,
        base_width: int = 64,
        widen_factor: int = 4,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"ResNeXt depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i in range(3):
            out_planes = 64 * widen_factor * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(
                    ResNeXtBottleneck(in_planes, out_planes, stride, cardinality, base_width)
                )
                in_planes = out_planes
            setattr(self, f"stage_{i + 1}", nn.Sequential(*blocks))
        self.classifier = nn.Linear(in_planes, num_classes)
        self.apply(init_module)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_1(self.conv_1_3x3(x)))
        out = self.stage_3(self.stage_2(self.stage_1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


@register_model("cifar_resnext29_8x64d")
def cifar_resnext29_8x64d(num_classes: int = 10) -> CifarResNeXt:
    """ResNeXt-29 (8x64d) (Xie et al. 2017): 34.43M params at 10 classes."""
    return CifarResNeXt(29, 8, 64, 4, num_classes)
