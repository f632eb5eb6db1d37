"""Numeric precision of a run: the float64 testing mode and "at least float32" arithmetic.

`run.dtype: float64` runs model, optimizer state, BatchNorm statistics (and their all-reduce),
soft targets and losses in float64. It is a debugging and testing mode (several times slower
on CPU, unsupported by most GPU kernels): with float64, an N-process run equals the 1-process
run it stands for to ~1e-12, so equivalence tests can assert equality instead of a float32
tolerance that happens to hold for one CPU's kernels.

Losses are computed in at least float32 (never in bf16/fp16 under autocast), and in float64
when the inputs are float64.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def memory_format(run) -> torch.memory_format:
    """`run.channels_last` as the memory format models and their images are laid out in."""
    return torch.channels_last if run.channels_last else torch.contiguous_format


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32, or unchanged when it is already float64."""
    return t if t.dtype == torch.float64 else t.float()


def match_state_precision(model: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Make `model` float64 when every floating tensor of `state` is: a state dict saved by a
    float64 run keeps its precision instead of being rounded to float32 on load."""
    if {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float64}:
        model.double()
    return model


def cast_floating(batch: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Move a batch to `device`; floating tensors (images, soft targets) become `dtype`,
    integer ones (labels, ids, top-k indices) keep theirs."""
    return {
        k: (v.to(device, dtype, non_blocking=True) if v.is_floating_point() else v.to(device))
        if torch.is_tensor(v)
        else v
        for k, v in batch.items()
    }
