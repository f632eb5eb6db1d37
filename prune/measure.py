"""Size and speed of a model: parameters, MACs/FLOPs and measured CPU latency.

Convention: MACs count the multiply-accumulates of Conv2d and Linear layers only, per sample
(batch 1); FLOPs = 2 * MACs. BatchNorm, activations, pooling, additions and SE gating are NOT
counted (they are <1% for these nets). Torch-Pruning's counter reports MACs under the name
"FLOPs"; ours says which is which. MACs do not track latency, so latency is measured.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Conv2d + Linear multiply-accumulates of one forward pass at batch 1."""
    total = 0

    def hook(m: nn.Module, inp, out) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            total += out.numel() // out.shape[0] * k
        elif isinstance(m, nn.Linear):
            total += out.numel() // out.shape[0] * m.in_features  # per sample

    handles = [m.register_forward_hook(hook) for m in model.modules() if _counted(m)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_size, device=_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def latency_ms(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> float:
    """Median wall time (ms) of one eval-mode forward at `batch`, after `warmup` passes,
    with `threads` torch intra-op threads (None: the current setting)."""
    was_training, before = model.training, torch.get_num_threads()
    model.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    x = torch.randn(batch, *input_size, device=_device(model))
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(before)
        model.train(was_training)
    return statistics.median(times)


def _counted(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d | nn.Linear)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
