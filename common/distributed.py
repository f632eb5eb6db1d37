"""The one place that knows about processes: Accelerator creation, BN synchronisation, wrapping.

Model, loss and pruning code never import torch.distributed or accelerate; they receive plain
modules and tensors. Stages call `build_accelerator` once and `prepare` once.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from common.config import RunConfig
from common.syncbn import convert_allreduce_batchnorm

COLLECTIVE_TIMEOUT_S = int(os.environ.get("KDSLIM_COLLECTIVE_TIMEOUT_S", "600"))
"""How long a collective waits for a dead peer before the survivors fail instead of hanging."""


def build_accelerator(run: RunConfig) -> Accelerator:
    """An Accelerator for this machine: CUDA when present, else CPU processes over gloo.

    `cpu=True` is what makes `accelerate launch --multi_gpu` on a CPU machine start a real
    gloo group instead of N processes that each believe they are rank 0 of 1.
    """
    cpu = not torch.cuda.is_available()
    mp = run.mixed_precision
    if cpu and mp == "fp16":
        raise ValueError("run.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    return Accelerator(
        cpu=cpu,
        mixed_precision=mp,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)),
        ],
    )


def synchronise_batchnorm(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Make BatchNorm statistics global across processes (before `prepare`).

    CUDA: torch's SyncBatchNorm. CPU: our all-reduce BatchNorm (SyncBatchNorm refuses CPU).
    One process: unchanged.
    """
    if accelerator.num_processes == 1:
        return model
    if accelerator.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_allreduce_batchnorm(model)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Same initial weights on every rank; the data pipeline has its own stateless seeding."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
