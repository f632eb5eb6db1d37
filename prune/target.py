"""The global |gamma| threshold for what a user asks to remove: a share of the channels (NS's
rule), or of the MACs or parameters of the network that results.

Channels are not what a user gets: on residual networks a coupled channel stays while any of
its BatchNorms keeps it, so NS's `ratio=0.7` removes 34% of ResNet-56's channels, and MACs
fall unevenly across layers of different resolution. For `macs`/`params` the threshold is
found by bisection over the sorted |gamma|, slimming the network for each candidate (the
coupling rule and per-layer floors included), so the target is met by the smallest threshold
that meets it: one channel group less would miss it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.errors import ConfigError
from prune.measure import count_macs, count_params
from prune.shrink import slim
from prune.threshold import all_gammas, global_threshold, layer_keep_masks


def measure_fn(target: str, input_shape: tuple[int, int, int]) -> Callable[[nn.Module], int]:
    if target == "macs":
        return lambda m: count_macs(m, input_shape)
    return count_params


def removed_share(model, threshold, floor, example, measure, base, round_to=1) -> float:
    """Share of `measure` the network loses when pruned at `threshold`."""
    masks = layer_keep_masks(model, threshold, floor)
    pruned, _, _ = slim(model, masks, example, round_to, floor)
    return 1.0 - measure(pruned) / base


def threshold_for(
    model: nn.Module,
    target: str,
    ratio: float,
    floor: float,
    example: torch.Tensor,
    round_to: int = 1,
) -> float:
    """The global threshold (channels with |gamma| <= it are removed) for `ratio` of `target`
    (`channels`, `macs` or `params`), widths rounded to multiples of `round_to`."""
    gammas = all_gammas(model)
    if target == "channels":
        return global_threshold(gammas, ratio)
    measure = measure_fn(target, tuple(example.shape[1:]))
    base = measure(model)
    candidates = torch.unique(gammas).tolist()  # ascending
    lo, hi = 0, len(candidates) - 1
    most = removed_share(model, candidates[hi], floor, example, measure, base, round_to)
    if most < ratio:
        raise ConfigError(
            f"`prune.ratio` {ratio} of the {target} cannot be removed: with the per-layer "
            f"floor `prune.min_channels_ratio` {floor} at most {most:.3f} can; lower the ratio "
            f"or the floor"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        share = removed_share(model, candidates[mid], floor, example, measure, base, round_to)
        if share >= ratio:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])
