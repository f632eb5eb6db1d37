"""Sparsity regularisation of BatchNorm scales (network slimming, Liu et al. 2017).

`SparsityTask(inner, ...)` wraps any trainer `Task` (cross-entropy now, KD later) and adds the
L1 penalty s*sum|gamma| over every BatchNorm layer. BN layers are matched as `_BatchNorm`, so
torch's `SyncBatchNorm` and our CPU `AllReduceBatchNorm` count too: `isinstance(m,
nn.BatchNorm2d)` silently skips them (the hole in NS main.py and Torch-Pruning's BNScalePruner).

Two equivalent ways to apply it, chosen by `penalty_in_loss`:
- subgradient (default, NS): `grad += s*sign(gamma)` in `after_backward`, which the trainer
  calls once per optimizer step after gradients are all-reduced and unscaled. Gradients are
  already averaged over ranks and gamma is identical on every rank, so this equals the loss
  term, and it is exact under accumulation (not once per micro-batch) and fp16.
- loss term: `s*sum|gamma|` added to every micro-batch loss. The trainer divides each
  micro-batch loss by `grad_accum`, so the accumulated gradient is s*sign(gamma) once per
  step. Needed under DeepSpeed ZeRO, where `param.grad` is not materialised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm with a learnable scale, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.affine and m.weight is not None
    ]


def require_bn(model: nn.Module, key: str) -> list[tuple[str, _BatchNorm]]:
    """`bn_layers`, or a ValueError naming the config key when there is nothing to slim."""
    layers = bn_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer with a learnable scale (gamma): "
            f"network slimming needs one; check `{key}`"
        )
    return layers


def s_at(step: int, total_steps: int, s: float, schedule: str, ramp_fraction: float) -> float:
    """L1 strength at optimizer step `step` (0-based) of `total_steps`."""
    if schedule == "constant":
        return s
    if schedule == "warmup":
        ramp = max(1, round(ramp_fraction * total_steps))
        return s * min(1.0, (step + 1) / ramp)
    if schedule == "decay":
        return s * max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"unknown sparsity.schedule {schedule!r}; use constant, warmup or decay")


def s_for_shrink(shrink: float, learning_rates: list[float]) -> float:
    """The L1 strength whose total shrinkage over a run is `shrink`.

    Each optimizer step moves every |gamma| towards 0 by lr_t x s through the penalty (before
    momentum and weight decay), so a run pulls it by s x sum_t lr_t in total: that total, not
    s, decides whether the scales separate (NS: s = 1e-4 over 125k steps of lr 0.1 -> 0.01 ->
    0.001 gives 0.66). For this run's own schedule, s = shrink / sum_t lr_t."""
    total = float(sum(learning_rates))
    if total <= 0:
        raise ValueError("the learning rates of the run sum to 0: no shrinkage is possible")
    return shrink / total


def l1_of_gammas(model: nn.Module) -> torch.Tensor:
    """sum |gamma| over every BN layer (a scalar with autograd)."""
    return sum(m.weight.abs().sum() for _, m in bn_layers(model))


def add_l1_subgradient(model: nn.Module, s: float) -> int:
    """`grad += s*sign(gamma)` on every BN scale; returns how many layers it reached."""
    reached = 0
    for name, m in bn_layers(model):
        if m.weight.grad is None:
            raise RuntimeError(
                f"BN layer {name!r} has no gradient at the L1 step (DeepSpeed ZeRO frees "
                "param.grad): set `sparsity.penalty_in_loss: true`"
            )
        m.weight.grad.add_(torch.sign(m.weight.detach()), alpha=s)
        reached += 1
    return reached


class SparsityTask:
    """Any task plus L1 on BN scales; see the module docstring for the two modes.

    `on_epoch_end(epoch, model)` (e.g. the |gamma| histogram) is called after the
    `after_backward` of each epoch's last step. `step` counts optimizer steps and must be set
    to the trainer's step after a resume, so the s schedule and epoch counting continue.
    """

    def __init__(
        self,
        inner,
        *,
        s: float,
        total_steps: int,
        steps_per_epoch: int,
        schedule: str = "constant",
        ramp_fraction: float = 0.1,
        penalty_in_loss: bool = False,
        on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    ):
        self.inner, self.s, self.schedule, self.ramp = inner, s, schedule, ramp_fraction
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.penalty_in_loss, self.on_epoch_end = penalty_in_loss, on_epoch_end
        self.step = 0

    def current_s(self) -> float:
        return s_at(self.step, self.total_steps, self.s, self.schedule, self.ramp)

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        terms = dict(self.inner.losses(model, batch))
        if self.penalty_in_loss:
            if not bn_layers(model):
                raise RuntimeError("the L1 penalty reached no BatchNorm layer")
            l1 = self.current_s() * l1_of_gammas(model)
            terms["loss"] = terms["loss"] + l1
            terms["l1"] = l1.detach()
        return terms

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        logs = dict(self.inner.after_backward(model))
        s = self.current_s()
        if not self.penalty_in_loss:
            if add_l1_subgradient(model, s) == 0:
                raise RuntimeError("the L1 subgradient reached no BatchNorm layer")
            with torch.no_grad():
                logs["l1"] = s * l1_of_gammas(model).detach().double()  # read when logged
        logs["s"] = s
        self.step += 1
        if self.on_epoch_end is not None and self.step % self.steps_per_epoch == 0:
            self.on_epoch_end(self.step // self.steps_per_epoch, model)
        return logs

    def eval_terms(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return self.inner.eval_terms(logits, batch)
