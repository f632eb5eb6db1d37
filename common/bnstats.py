"""BatchNorm running statistics you can trust.

A network's eval-mode output is only as good as its BN running statistics, and two common
situations leave them stale: a pruned network (every layer's input distribution changed when
channels were removed, but the statistics are the unpruned network's) and a short run of a
model with a small BN momentum (torchvision's MobileNetV3 uses 0.01: after ~100 steps the
statistics are still near their initial 0 / 1 and eval-mode outputs saturate to one class).
`recalibrate_bn` re-estimates them from training batches, the "adaptive BN" of EagleEye (Li et
al., ECCV 2020), which makes a pruned network's accuracy before fine-tuning meaningful;
`eval_collapse` detects the second situation so that a run can say so.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.data import ViewDataset, make_loader
from common.precision import cast_floating


def _bn(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, dataset: ViewDataset, num_batches: int, batch_size: int
) -> int:
    """Reset every BN's running statistics and re-estimate them as the cumulative average
    (momentum None) over the first `num_batches` batches of training view 0, in train mode
    with no gradient. The same samples on every process, so replicated models stay equal.
    Returns the number of images used."""
    layers = _bn(model)
    if not layers or num_batches == 0:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    p = next(model.parameters())
    n = min(len(dataset), num_batches * batch_size)
    keys = [(i, 0) for i in range(n)]
    batches = [keys[i : i + batch_size] for i in range(0, n, batch_size)]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        devices = [p.device] if p.is_cuda else []
        with torch.random.fork_rng(devices=devices):  # dropout draws no training RNG
            for batch in make_loader(dataset, batches, 0):
                model(cast_floating(batch, p.dtype, p.device)["image"])
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return n


@torch.no_grad()
def eval_collapse(model: nn.Module, images: torch.Tensor, ratio: float = 1e-3) -> str | None:
    """A warning when the eval-mode logits are (near) constant over `images` while the
    train-mode logits (batch statistics) are not; None otherwise. The model and its
    statistics are left as they were."""
    layers = _bn(model)
    if not layers or len(images) < 2:
        return None
    was_training = model.training
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    try:
        devices = [images.device] if images.is_cuda else []
        with torch.random.fork_rng(devices=devices):  # train-mode dropout draws no training RNG
            model.eval()
            eval_std = float(model(images).float().std(0).mean())
            model.train()
            train_std = float(model(images).float().std(0).mean())
    finally:
        for m, (mean, var, count) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        model.train(was_training)
    if train_std > 0 and eval_std < ratio * train_std:
        momenta = sorted({m.momentum for m in layers if m.momentum is not None})
        return (
            f"eval-mode outputs are constant over a batch (std {eval_std:.2e} against "
            f"{train_std:.2e} in train mode): the BatchNorm running statistics have not caught "
            f"up with the weights. BN momentum {momenta} is the likely cause (torchvision's "
            f"MobileNetV3 uses 0.01): train longer, raise the momentum, or recalibrate the "
            f"statistics before each evaluation (`<stage>.loop.recalibrate_bn: 50`; "
            f"`common.bnstats.recalibrate_bn`)"
        )
    return None
