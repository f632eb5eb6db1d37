"""DenseNets for CIFAR (Huang et al. 2017, "Densely Connected Convolutional Networks").

Three dense blocks on 32x32/16x16/8x8 maps joined by transitions (BN-ReLU-conv1x1-avgpool2),
then BN-ReLU, global pool, `fc`. Each layer's output is `torch.cat`-ed to its input, so the
forward never assumes a channel count and pruned widths run.

* `cifar_densenet100`: DenseNet-BC, L=100, k=12 (bottleneck layers BN-ReLU-conv1x1(4k)-BN-
  ReLU-conv3x3(k), compression 0.5, 2k-channel stem): 0.77M params (paper: 0.8M).
* `cifar_densenet40`: DenseNet, L=40, k=12 (layers BN-ReLU-conv3x3(k), no compression, 16-channel
  stem), the DenseNet of network slimming (Liu et al. 2017): 1.02M params (paper: 1.0M).

Optional `dropout` after each conv (the paper uses 0.2 only without data augmentation; default
0). Convs Kaiming-normal, BN 1/0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .widths import init_module

__all__ = ["CifarDenseNet", "DenseLayer", "Transition"]


class DenseLayer(nn.Module):
    """[BN-ReLU-conv1x1(4k)]-BN-ReLU-conv3x3(k), output concatenated to the input."""

    def __init__(
        self, in_planes: int, growth_rate: int, bottleneck: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.dropout = dropout
        self.bn1 = nn.BatchNorm2d(in_planes)
        if bottleneck:
            mid = 4 * growth_rate
            self.conv1 = nn.Conv2d(in_planes, mid, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_planes, growth_rate, 3, padding=1, bias=False)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.dropout, training=self.training) if self.dropout > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._drop(self.conv1(F.relu(self.bn1(x))))
        if self.bottleneck:
            out = self._drop(self.conv2(F.relu(self.bn2(out))))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-[dropout]-avgpool2."""

    def __init__(self, in_planes: int, out_planes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.relu(self.bn(x)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return F.avg_pool2d(out, 2)


class CifarDenseNet(nn.Module):
    def __init__(
        self,
        depth: int,
        growth_rate: int = 12,
        bottleneck: bool = True,
        compression: float = 0.5,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        per_layer = 2 if bottleneck else 1
        if (depth - 4) % (3 * per_layer):
            raise ValueError(f"DenseNet depth must be {3 * per_layer}n+4, got {depth}")
        n = (depth - 4) // (3 * per_layer)
        planes = 2 * growth_rate if bottleneck else 16
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth_rate, bottleneck, dropout))
                planes += growth_rate
            setattr(self, f"dense{i + 1}", nn.Sequential(*layers))
            if i < 2:
                out_planes = math.floor(planes * compression)
                setattr(self, f"trans{i + 1}", Transition(planes, out_planes, dropout))
                planes = out_planes
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        self.apply(init_module)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.dense3(out)
        out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


@register_model("cifar_densenet100")
def cifar_densenet100(num_classes: int = 10, dropout: float = 0.0) -> CifarDenseNet:
    """DenseNet-BC-100, k=12 (Huang et al. 2017): 0.77M params."""
    return CifarDenseNet(100, 12, True, 0.5, num_classes, dropout)


@register_model("cifar_densenet40")
def cifar_densenet40(num_classes: int = 10, dropout: float = 0.0) -> CifarDenseNet:
    """DenseNet-40, k=12, no bottleneck/compression (Huang et al. 2017): 1.02M params."""
    return CifarDenseNet(40, 12, False, 1.0, num_classes, dropout)
