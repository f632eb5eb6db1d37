"""VGG for CIFAR exactly as in network slimming (Liu et al. 2017; Eric-mingjie/network-slimming).

The network is its width list: ints are conv3x3(bias=False)-BN-ReLU layers of that width, 'M'
a 2x2 max-pool. Then global average pooling and ``nn.Linear(last_width, num_classes)`` (the
reference pools its 2x2 map with AvgPool2d(2), the same thing at 32x32). Network slimming
prunes such a VGG by handing a smaller width list to the same constructor, so a pruned VGG is
just another `cfg`. `cifar_vgg19` has 20.04M parameters at 10 classes (the paper's 20.04M).
Module names (`feature`, `classifier`) match the reference, so its checkpoints load.

Init: convs Kaiming-normal (fan_out; the reference's normal(0, sqrt(2/(k*k*out)))), Linear
normal(0, 0.01) with zero bias, as the reference; BN bias 0 and weight `bn_weight_init`,
default 1 (the reference uses 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import register_model
from .widths import init_module as _default_init

__all__ = ["VGG_CFGS", "CifarVGG"]

# fmt: off
VGG_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512],
}
# fmt: on


class CifarVGG(nn.Module):
    def __init__(
        self, cfg: Sequence[int | str], num_classes: int = 10, bn_weight_init: float = 1.0
    ) -> None:
        super().__init__()
        widths = [c for c in cfg if c != "M"]
        if not widths or any(
            isinstance(c, bool) or not (c == "M" or (isinstance(c, int) and c > 0)) for c in cfg
        ):
            raise ValueError(
                f"VGG cfg must be positive ints and 'M', with at least one int; got {cfg!r}"
            )
        self.cfg = list(cfg)
        self.bn_weight_init = bn_weight_init
        layers: list[nn.Module] = []
        in_planes = 3
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(in_planes, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                ]
                in_planes = c
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_planes, num_classes)
        self.apply(self.init_module)

    def init_module(self, m: nn.Module) -> None:
        """Initialise one module as the reference does (also used by `apply_widths`)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BatchNorm) and m.affine:
            nn.init.constant_(m.weight, self.bn_weight_init)
            nn.init.zeros_(m.bias)
        else:
            _default_init(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(F.adaptive_avg_pool2d(self.feature(x), 1), 1)
        return self.classifier(out)


def _vgg(depth: int, num_classes: int, cfg: Sequence[int | str] | None, bn_weight_init: float):
    return CifarVGG(VGG_CFGS[depth] if cfg is None else cfg, num_classes, bn_weight_init)


@register_model("cifar_vgg11")
def cifar_vgg11(
    num_classes: int = 10, cfg: Sequence[int | str] | None = None, bn_weight_init: float = 1.0
) -> CifarVGG:
    """Network-slimming VGG-11 (BN); `cfg` overrides the width list. 9.23M params."""
    return _vgg(11, num_classes, cfg, bn_weight_init)


@register_model("cifar_vgg16")
def cifar_vgg16(
    num_classes: int = 10, cfg: Sequence[int | str] | None = None, bn_weight_init: float = 1.0
) -> CifarVGG:
    """Network-slimming VGG-16 (BN); `cfg` overrides the width list. 14.73M params."""
    return _vgg(16, num_classes, cfg, bn_weight_init)


@register_model("cifar_vgg19")
def cifar_vgg19(
    num_classes: int = 10, cfg: Sequence[int | str] | None = None, bn_weight_init: float = 1.0
) -> CifarVGG:
    """Network-slimming VGG-19 (BN); `cfg` overrides the width list. 20.04M params."""
    return _vgg(19, num_classes, cfg, bn_weight_init)
