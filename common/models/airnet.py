"""A fast CIFAR network after Keller Jordan's airbench (airbench94, github.com/KellerJordan/
cifar10-airbench): a 3x3 stem, then three blocks of conv3x3 -> 2x2 max-pool -> BN -> act ->
conv3x3 -> BN -> act, a global max-pool and a linear head.

Why it is here: per multiply-accumulate it is the most accurate CIFAR family we know of at
short schedules (airbench94 reaches 94% in ~10 epochs), which is what a 2-core CPU can afford.
Its width is the knob: `channels=(64, 256, 256)` is airbench94's (118M MACs at 32x32); half
width costs a quarter of that. Every conv is followed by a BatchNorm, so network slimming can
prune every layer; pooling before BN keeps the removed channels' act(beta) constants exact to
fold. airbench's frozen whitening stem, Lookahead and test-time flips are left out: they are
training-recipe choices, not architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import register_model
from .widths import init_module as _default_init

__all__ = ["CifarAirNet"]

_ACTS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


class AirBlock(nn.Module):
    def __init__(self, cin: int, cout: int, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = _ACTS[act]()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _ACTS[act]()

    def forward(self, x):
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


class CifarAirNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (64, 256, 256),
        stem: int = 24,
        act: str = "relu",
    ) -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        if len(channels) != 3 or any(int(c) < 1 for c in channels) or stem < 1:
            raise ValueError(f"channels must be 3 positive widths and stem >= 1, got {channels}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), _ACTS[act]()
        )
        widths = [stem, *(int(c) for c in channels)]
        self.blocks = nn.Sequential(*(AirBlock(widths[i], widths[i + 1], act) for i in range(3)))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.apply(_default_init)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


@register_model("cifar_airnet")
def cifar_airnet(num_classes: int = 10, **kwargs) -> CifarAirNet:
    """airbench94's widths (64, 256, 256) by default; pass `channels`/`stem` to scale."""
    return CifarAirNet(num_classes, **kwargs)
