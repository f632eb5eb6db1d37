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


def separation(gammas: torch.Tensor, threshold: float | None = None) -> dict:
    """How well sparsity training split the |gamma| into "off" and "on": NS's bimodal regime.

    `below_1pct`: share of scales under 1% of the largest. `valley`: Otsu's threshold of the
    |gamma| histogram (256 bins), the cut that best separates two groups; `bimodality`: its
    between-group share of the variance (1: two spikes; ~0.64 for a uniform spread, lower for
    one lump). With `threshold`, where the chosen cut falls: its ratio to the valley and the
    share of scales between the two, which a cut above the valley removes from the "on" group.
    """
    g = gammas.abs().double().flatten()
    top = float(g.max())
    out = {"num_scales": int(g.numel()), "max": top, "median": float(g.median())}
    out["below_1pct"] = float((g < 0.01 * top).double().mean()) if top > 0 else 1.0
    hist = torch.histc(g, bins=256, min=0.0, max=max(top, 1e-12))
    p = hist / hist.sum()
    centres = (torch.arange(256, dtype=torch.float64) + 0.5) * max(top, 1e-12) / 256
    w0 = torch.cumsum(p, 0)
    mu0 = torch.cumsum(p * centres, 0)
    mu = mu0[-1]
    between = (mu * w0 - mu0) ** 2 / (w0 * (1 - w0)).clamp(min=1e-12)
    # an empty gap between the groups is a plateau of equal scores: cut in its middle
    best = between[:-1]
    plateau = torch.nonzero(best >= best.max() * (1 - 1e-9)).flatten()
    k = int(plateau[len(plateau) // 2])
    total_var = float((p * (centres - mu) ** 2).sum())
    out["valley"] = float(centres[k] + 0.5 * max(top, 1e-12) / 256)
    out["bimodality"] = float(between[k]) / total_var if total_var > 0 else 0.0
    if threshold is not None:
        lo, hi = sorted((threshold, out["valley"]))
        out["threshold"] = threshold
        out["threshold_over_valley"] = threshold / out["valley"] if out["valley"] > 0 else None
        out["between_threshold_and_valley"] = float(((g > lo) & (g <= hi)).double().mean())
    return out
