"""The MAC count the reports give (`prune.measure.count_macs`: torch's FlopCounterMode, FLOPs
/ 2) equals a count of every Conv2d's and Linear's multiply-accumulates taken by module hooks
(the counter it replaced), on every registered architecture, unpruned and pruned: so the
library counts exactly the convention the reports state (conv and matmul MACs; BatchNorm,
activations, pooling and additions not counted) and nothing is lost in a pruned network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.models import build_model, list_models
from prune.measure import count_macs
from prune.shrink import slim
from prune.threshold import all_gammas, global_threshold, layer_keep_masks
from tests.test_prune import randomise_bn

SIZE = (3, 16, 16)  # the smallest input every registered network accepts
SLOW = {"cifar_densenet100", "cifar_resnet164", "cifar_preresnet164"}  # 3-8 s each to slim


def module_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Conv2d + Linear multiply-accumulates at batch 1, from each module's output shape."""
    total = 0

    def hook(m: nn.Module, inp, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            per_output = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        else:
            per_output = m.in_features
        total += out[0].numel() * per_output

    counted = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in counted]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.extended] * (n in SLOW)) for n in list_models()]
)
def test_flop_counter_counts_every_conv_and_linear_mac(name):
    torch.manual_seed(0)
    model = randomise_bn(build_model(name, 10))
    macs = count_macs(model, SIZE)
    assert macs == module_macs(model, SIZE) > 0
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.5), 0.1)
    pruned, _, _ = slim(model, masks, torch.randn(2, *SIZE))
    assert count_macs(pruned, SIZE) == module_macs(pruned, SIZE) < macs
