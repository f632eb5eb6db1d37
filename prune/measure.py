"""Size and speed of a model: parameters, MACs/FLOPs and measured CPU latency.

Convention: MACs count the multiply-accumulates of convolutions and matrix products (Conv2d,
Linear, any matmul) only, per sample (batch 1); FLOPs = 2 * MACs. BatchNorm, activations,
pooling, additions and SE gating are NOT counted (they are <1% for these nets). Both come from
`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per MAC of those ops and
nothing else; tests/test_flops.py checks it against a count of every Conv2d and Linear module
on every registered architecture, pruned and unpruned. Torch-Pruning's counter reports MACs
under the name "FLOPs"; ours says which is which. MACs do not track latency, so latency is
measured, with `torch.utils.benchmark.Timer` (its warm-up, thread setting and blocked timing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

MIN_RUN_TIME = 0.2
"""Seconds of timed calls per latency (torch's default for `blocked_autorange`)."""


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one eval-mode forward pass at batch 1 (FLOPs / 2)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=_device(model)))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def median_ms(fn: Callable[[], object], threads: int, repeats: int = 1) -> float:
    """Median wall time (ms) of one `fn()` with `threads` torch intra-op threads.

    `Timer.blocked_autorange` warms up while it sizes its blocks (calls per timer reading,
    so that reading the clock costs < 0.01% of a block), then times blocks for MIN_RUN_TIME;
    the median is over blocks, per call. A model slower than MIN_RUN_TIME / `repeats` is
    timed again until `repeats` calls were timed in all.
    """
    timer = _timer_class()("fn()", globals={"fn": fn}, num_threads=threads)
    runs = [timer.blocked_autorange(min_run_time=MIN_RUN_TIME)]
    timed = runs[0].number_per_run * len(runs[0].raw_times)
    if timed < repeats:
        runs.append(timer.blocked_autorange(min_run_time=(repeats - timed) * runs[0].median))
    return runs[0].merge(runs)[0].median * 1e3


def latency_ms(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> float:
    """Median wall time (ms) of one eval-mode forward at `batch` (`median_ms`), after
    `warmup` more untimed passes, timing at least `repeats` passes, with `threads` torch
    intra-op threads (None: the current setting)."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch, *input_size, device=_device(model))
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            return median_ms(lambda: model(x), threads or torch.get_num_threads(), repeats)
    finally:
        model.train(was_training)


def _timer_class():
    """`torch.utils.benchmark.Timer`, imported without the warning its import logs on a
    machine with a CUDA_HOME but no CUDA runtime (irrelevant to timing on the CPU)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
