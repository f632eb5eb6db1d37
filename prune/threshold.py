"""Which channels survive: one global |gamma| threshold and a per-layer floor.

Pure tensor code (no processes): the prune stage computes the threshold on rank 0, broadcasts
it and checks every rank holds the same value.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prune.l1 import require_bn


def all_gammas(model: nn.Module) -> torch.Tensor:
    """|gamma| of every BN channel, concatenated in module order: [N]."""
    layers = require_bn(model, "prune.init")
    return torch.cat([m.weight.detach().abs().flatten().float().cpu() for _, m in layers])


def global_threshold(gammas: torch.Tensor, ratio: float) -> float:
    """NS: sort all |gamma| and take the value at index int(N * ratio); channels with
    |gamma| <= threshold are pruned (NS keeps `gt(threshold)`)."""
    if not 0 < ratio < 1:
        raise ValueError(f"`prune.ratio` must be in (0, 1), got {ratio}")
    if gammas.numel() == 0:
        raise ValueError("no BN channels to threshold; check `prune.init`")
    ordered = torch.sort(gammas.flatten()).values
    return float(ordered[int(gammas.numel() * ratio)])


def layer_keep_masks(
    model: nn.Module, threshold: float, min_channels_ratio: float
) -> dict[str, torch.Tensor]:
    """Per-BN keep mask (bool [C]): |gamma| > threshold, topped up to the floor of
    max(1, ceil(min_channels_ratio * C)) channels with the largest |gamma|."""
    masks = {}
    for name, m in require_bn(model, "prune.init"):
        g = m.weight.detach().abs().float().cpu()
        keep = g > threshold
        floor = max(1, math.ceil(min_channels_ratio * g.numel()))
        if int(keep.sum()) < floor:
            keep = torch.zeros_like(keep)
            keep[torch.topk(g, floor).indices] = True
        masks[name] = keep
    return masks
