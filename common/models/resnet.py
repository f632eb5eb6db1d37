"""CIFAR ResNets (32x32 inputs; adaptive average pooling lets them run on any size >= 8x8).

* `cifar_resnet18`: the kuangliu/pytorch-cifar ResNet-18 (ImageNet BasicBlock [2, 2, 2, 2],
  widths 64-512, 3x3 stride-1 stem, no max-pool): 11.17M parameters at 10 classes. Module
  names follow that repository (conv1, bn1, layer1..4, linear), so its checkpoints load.
* `cifar_resnet20/56/110`: He et al. 2016 ("Deep Residual Learning", sec. 4.2) CIFAR ResNets,
  6n+2 layers, 16/32/64 channels, BasicBlock: 0.27M / 0.86M / 1.73M. Where the shape changes
  the shortcut is a 1x1 conv + BN (option B) instead of the paper's zero-padding (option A),
  so channel-pruning tools can trace and prune it.
* `cifar_resnet164`: 9n+2 bottleneck ResNet (16/32/64 base width, expansion 4), post-activation
  as in He et al. 2016 (He et al. 2016b, "Identity Mappings", Table 2): 1.70M.
* `cifar_preresnet110`: pre-activation BasicBlock ResNet-110 (He et al. 2016b): 1.73M.
* `cifar_preresnet164`: pre-activation bottleneck ResNet-164 (He et al. 2016b), the ResNet used by
  network slimming (Liu et al. 2017, Eric-mingjie/network-slimming): 1.70M.

Pre-activation projection shortcuts are a bare 1x1 conv (their input is already BN-ReLU'd).
Convs are Kaiming-normal initialised, BN weight 1 / bias 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .widths import init_module

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "PreActBasicBlock", "PreActBottleneck"]


def _conv_bn(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU (He et al. 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        out = planes * self.expansion
        self.shortcut = (
            _conv_bn(in_planes, out, stride) if stride != 1 or in_planes != out else nn.Sequential()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        out = planes * self.expansion
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = (
            _conv_bn(in_planes, out, stride) if stride != 1 or in_planes != out else nn.Sequential()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, + shortcut (He et al. 2016b)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        out = planes * self.expansion
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Conv2d(in_planes, out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4), + shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        out = planes * self.expansion
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Conv2d(in_planes, out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


_Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]


class CifarResNet(nn.Module):
    """3x3 stride-1 stem, stages ``layer1..layerN`` (stride 1 then 2), global pool, `linear`.

    Post-activation blocks get a stem conv-BN-ReLU; pre-activation blocks a bare stem conv and
    a final BN-ReLU (`bn`) before pooling.
    """

    def __init__(
        self,
        block: _Block,
        num_blocks: list[int],
        planes: list[int],
        num_classes: int = 10,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        self.preact = block in (PreActBasicBlock, PreActBottleneck)
        in_planes = stem_width if stem_width is not None else planes[0]
        self.conv1 = nn.Conv2d(3, in_planes, 3, stride=1, padding=1, bias=False)
        if not self.preact:
            self.bn1 = nn.BatchNorm2d(in_planes)
        self.num_stages = len(num_blocks)
        for i, (n, p) in enumerate(zip(num_blocks, planes)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, p, 2 if i > 0 and j == 0 else 1))
                in_planes = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        if self.preact:
            self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        self.apply(init_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        if self.preact:
            out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def _he_cifar(block: _Block, depth: int, num_classes: int) -> CifarResNet:
    per_block = 2 if block.expansion == 1 else 3
    if (depth - 2) % (3 * per_block):
        raise ValueError(f"depth {depth} is not {3 * per_block}n+2")
    n = (depth - 2) // (3 * per_block)
    return CifarResNet(block, [n, n, n], [16, 32, 64], num_classes)


@register_model("cifar_resnet18")
def cifar_resnet18(num_classes: int = 10) -> CifarResNet:
    """kuangliu/pytorch-cifar ResNet-18: 11.17M params at 10 classes."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes)


@register_model("cifar_resnet20")
def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    """He et al. 2016 CIFAR ResNet-20 (option-B shortcuts): 0.27M params."""
    return _he_cifar(BasicBlock, 20, num_classes)


@register_model("cifar_resnet56")
def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    """He et al. 2016 CIFAR ResNet-56 (option-B shortcuts): 0.86M params."""
    return _he_cifar(BasicBlock, 56, num_classes)


@register_model("cifar_resnet110")
def cifar_resnet110(num_classes: int = 10) -> CifarResNet:
    """He et al. 2016 CIFAR ResNet-110 (option-B shortcuts): 1.73M params."""
    return _he_cifar(BasicBlock, 110, num_classes)


@register_model("cifar_resnet164")
def cifar_resnet164(num_classes: int = 10) -> CifarResNet:
    """Bottleneck ResNet-164, post-activation (He et al. 2016b): 1.70M params."""
    return _he_cifar(Bottleneck, 164, num_classes)


@register_model("cifar_preresnet110")
def cifar_preresnet110(num_classes: int = 10) -> CifarResNet:
    """Pre-activation ResNet-110, basic blocks (He et al. 2016b): 1.73M params."""
    return _he_cifar(PreActBasicBlock, 110, num_classes)


@register_model("cifar_preresnet164")
def cifar_preresnet164(num_classes: int = 10) -> CifarResNet:
    """Pre-activation bottleneck ResNet-164 (He et al. 2016b; network slimming's): 1.70M."""
    return _he_cifar(PreActBottleneck, 164, num_classes)
