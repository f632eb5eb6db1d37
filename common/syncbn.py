"""BatchNorm with statistics synchronised across processes, for CPU (gloo) runs.

`torch.nn.SyncBatchNorm` only runs on CUDA, so without this a CPU multi-process run normalises
each rank's slice separately and cannot equal the single-process run it stands for. Here the
batch mean and variance are all-reduced (two passes, numerically like the local computation)
with the differentiable `torch.distributed.nn.functional.all_reduce`, so gradients also flow
across ranks exactly as in one process with the whole batch.

It subclasses `_BatchNorm` (so network-slimming code that matches `_BatchNorm` sees it) and keeps
the same parameter and buffer names (so state dicts load into a plain model).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients (all-reduced)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class AllReduceBatchNorm(_BatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()  # statistics in at least float32
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=xf.dtype)
        total = all_reduce(torch.cat([xf.sum(dims), count]))  # [C + 1]
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n  # biased, as BN normalises
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        return out.to(x.dtype)


def convert_allreduce_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `_BatchNorm` in `module` by `AllReduceBatchNorm`, keeping its state."""
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        new = AllReduceBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        ref = module.running_mean if module.weight is None else module.weight
        if ref is not None:  # same device and precision (float64 in the testing mode)
            new = new.to(ref.device, ref.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_allreduce_batchnorm(child))
    return module


__all__ = ["AllReduceBatchNorm", "convert_allreduce_batchnorm"]
