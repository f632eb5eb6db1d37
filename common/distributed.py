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


def deepspeed_requested() -> bool:
    """True under `accelerate launch` with a DeepSpeed config (configs/accelerate/deepspeed_*)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(run: RunConfig) -> Accelerator:
    """An Accelerator for this machine: CUDA when present, else CPU processes over gloo.

    `cpu=True` is what makes `accelerate launch --multi_gpu` on a CPU machine start a real
    gloo group instead of N processes that each believe they are rank 0 of 1.

    DeepSpeed on CPU is the exception: accelerate ignores DeepSpeed when `cpu=True` (plain DDP),
    and with `cpu=False` and no backend it lets DeepSpeed build a 2-rank group while reporting
    rank 0 of 1 on every process. Passing `backend="gloo"` (and `cpu=False`) gives one gloo
    group that accelerate and DeepSpeed agree on (measured: accelerate 1.15, deepspeed 0.19.8).
    """
    cpu = not torch.cuda.is_available()
    mp = run.mixed_precision
    if cpu and mp == "fp16":
        raise ValueError("run.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    deepspeed = deepspeed_requested()
    pg = {"timeout": timedelta(seconds=COLLECTIVE_TIMEOUT_S)}
    if deepspeed:
        _let_accelerate_run_deepspeed_without_transformers()
        if cpu:
            pg["backend"] = "gloo"
            # ACCELERATE_USE_CPU=1 (the CPU recipe in README, slurm/stage.sbatch) would make
            # accelerate fall back to plain DDP without a word: DeepSpeed was asked for.
            os.environ.pop("ACCELERATE_USE_CPU", None)
    return Accelerator(
        cpu=cpu and not deepspeed,
        mixed_precision=mp,
        kwargs_handlers=[InitProcessGroupKwargs(**pg)],
    )


def _let_accelerate_run_deepspeed_without_transformers() -> None:
    """accelerate 1.15 `DeepSpeedPlugin.set_deepspeed_weakref` imports `transformers` even when
    nothing uses it (PackageNotFoundError: transformers); it only registers the config for
    transformers' own ZeRO-3 model init (`zero3_init_flag`, unused here). Skip it when
    transformers is absent; with transformers installed accelerate's code runs unchanged."""
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        return
    from accelerate.utils import dataclasses as acc_dataclasses

    plugin = acc_dataclasses.DeepSpeedPlugin
    if getattr(plugin.set_deepspeed_weakref, "_kdslim_patched", False):
        return
    original = plugin.set_deepspeed_weakref

    def set_deepspeed_weakref(self):
        if self.zero3_init_flag:
            return original(self)  # accelerate's own clear error: needs transformers
        return None

    set_deepspeed_weakref._kdslim_patched = True
    plugin.set_deepspeed_weakref = set_deepspeed_weakref


def configure_deepspeed(
    accelerator: Accelerator,
    *,
    micro_batch: int,
    grad_accum: int,
    global_batch: int,
    clip_grad_norm: float | None,
) -> None:
    """Fill the batch keys of the active DeepSpeed config before `prepare`.

    Our trainer feeds its own replay sampler and never passes a dataloader to `prepare`, so
    accelerate cannot infer `train_micro_batch_size_per_gpu` ("auto"); DeepSpeed also owns
    accumulation (it steps at its own boundary and divides the loss by its
    `gradient_accumulation_steps`) and gradient clipping. A number already in the config must
    agree with the run config: a silent mismatch would change the optimisation.
    """
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    want = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": global_batch,
        "gradient_clipping": float(clip_grad_norm or 0.0),
    }
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have not in ("auto", None, value):
            raise ValueError(
                f"DeepSpeed config sets {key}={have}, but the run needs {value} (from "
                f"loop.batch_size / grad_accum / processes / optim.clip_grad_norm): set it to "
                f'"auto" in the DeepSpeed JSON (configs/accelerate/ds_zero*.json)'
            )
        cfg[key] = value
    # our optimizers are plain torch ones (SGD/AdamW): ZeRO refuses them without this
    cfg["zero_allow_untested_optimizer"] = True
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ValueError(
            "the training loop supports DeepSpeed ZeRO stage 0-2 for the trained model "
            "(configs/accelerate/deepspeed_zero1.yaml / deepspeed_zero2.yaml); ZeRO-3 "
            "(deepspeed_zero3.yaml) is for sharding a large frozen teacher in online "
            "distillation, see README 'Running on a cluster'"
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
