"""The one place that knows about processes: Accelerator creation, BN synchronisation, wrapping.

Model, loss and pruning code never import torch.distributed or accelerate; they receive plain
modules and tensors. Stages call `build_accelerator` once and `prepare` once.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
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


TEACHER_PLUGIN = "teacher"
"""Key of the ZeRO-3 plugin that shards a frozen live teacher (see `build_accelerator`)."""


def build_accelerator(run: RunConfig) -> Accelerator:
    """An Accelerator for this machine: CUDA when present, else CPU processes over gloo.

    `cpu=True` is what makes `accelerate launch --multi_gpu` on a CPU machine start a real
    gloo group instead of N processes that each believe they are rank 0 of 1.

    DeepSpeed on CPU is the exception: accelerate ignores DeepSpeed when `cpu=True` (plain DDP),
    and with `cpu=False` and no backend it lets DeepSpeed build a 2-rank group while reporting
    rank 0 of 1 on every process. Passing `backend="gloo"` (and `cpu=False`) gives one gloo
    group that accelerate and DeepSpeed agree on (measured: accelerate 1.15, deepspeed 0.19.8).

    A ZeRO-3 launch config means: shard a frozen live teacher (online distillation, live-KD
    fine-tuning), whose weights are what does not fit, with ZeRO-3, and train the student
    under ZeRO-2 with the same settings. The two configs are held the way accelerate holds
    several models' DeepSpeed configs (`deepspeed_plugins`, one per model; accelerate's
    "deepspeed_multiple_model" guide); `place_frozen` builds the teacher's engine, and the
    trainer refuses a stage that has no live teacher to shard.
    """
    cpu = not torch.cuda.is_available()
    mp = run.mixed_precision
    if cpu and mp == "fp16":
        raise ValueError("run.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    deepspeed = deepspeed_requested()
    pg = {"timeout": timedelta(seconds=COLLECTIVE_TIMEOUT_S)}
    plugins = None
    if deepspeed:
        _let_accelerate_run_deepspeed_without_transformers()
        if cpu:
            pg["backend"] = "gloo"
            # ACCELERATE_USE_CPU=1 (the CPU recipe in README, slurm/stage.sbatch) would make
            # accelerate fall back to plain DDP without a word: DeepSpeed was asked for.
            os.environ.pop("ACCELERATE_USE_CPU", None)
        plugins = _plugins_for_live_teacher()
    return Accelerator(
        cpu=cpu and not deepspeed,
        mixed_precision=mp,
        dynamo_backend="inductor" if run.compile else "no",
        kwargs_handlers=[InitProcessGroupKwargs(**pg)],
        deepspeed_plugins=plugins,
    )


def _plugins_for_live_teacher():
    """{"student": ZeRO-2 copy, "teacher": the launched ZeRO-3 config}, or None (not ZeRO-3).

    The first plugin is the active one, so everything `prepare` does (the trainer) sees the
    student's; the teacher's waits in `accelerator.state` for `place_frozen`."""
    from accelerate.utils import DeepSpeedPlugin

    launched = DeepSpeedPlugin()  # from the launch config (ACCELERATE_DEEPSPEED_CONFIG_FILE)
    if _zero_stage(launched.deepspeed_config) != 3:
        return None
    student = copy.deepcopy(launched.deepspeed_config)
    zero = student.setdefault("zero_optimization", {})
    for key in [k for k in zero if k.startswith("stage3_") or k == "offload_param"]:
        del zero[key]  # parameter sharding settings: the student's weights stay whole
    zero["stage"] = 2
    return {"student": DeepSpeedPlugin(hf_ds_config=student), TEACHER_PLUGIN: launched}


def zero3_for_teacher(accelerator: Accelerator) -> bool:
    """True under a ZeRO-3 launch config: a live teacher is sharded, the student is not."""
    plugins = getattr(accelerator.state, "deepspeed_plugins", None)
    return isinstance(plugins, dict) and TEACHER_PLUGIN in plugins


def _zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _use_torch_autocast(ds_config: dict, mixed_precision: str) -> None:
    """`run.mixed_precision` is the one precision switch, and it means the same under every
    engine: float32 weights, bf16 matmuls under `torch.autocast`. DeepSpeed's own `bf16`
    section instead casts the weights (BatchNorm statistics included) to bf16 and leaves the
    float32 images to meet them ("Input type (float) and weight type (BFloat16) should be the
    same"); its `torch_autocast` section is the DDP behaviour. fp16 would need a loss scaler
    that DeepSpeed attaches to torch autocast only without ZeRO, so it is refused."""
    if mixed_precision == "fp16":
        raise ValueError(
            "run.mixed_precision=fp16 is not supported under DeepSpeed (its torch-autocast "
            "mode scales the fp16 loss only without ZeRO): use run.mixed_precision=bf16"
        )
    ds_config["bf16"] = {"enabled": False}
    ds_config["fp16"] = {"enabled": False}
    ds_config["torch_autocast"] = {"enabled": mixed_precision == "bf16", "dtype": "bfloat16"}


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
    _use_torch_autocast(cfg, accelerator.mixed_precision)
    if _zero_stage(cfg) == 3:
        raise ValueError(
            "the training loop supports DeepSpeed ZeRO stage 0-2 for the trained model "
            "(configs/accelerate/deepspeed_zero1.yaml / deepspeed_zero2.yaml); ZeRO-3 "
            "(deepspeed_zero3.yaml) shards a large frozen live teacher (distill.mode=online, "
            "finetune.teacher) while the student trains under ZeRO-2, see README 'Running "
            "on a cluster'"
        )


def place_frozen(
    module: nn.Module, accelerator: Accelerator, log: Callable[[str], None] = print
) -> nn.Module:
    """A frozen teacher ready to run on this process: on its device, or, under a ZeRO-3
    launch config, a DeepSpeed engine holding 1/world of its weights per process.

    Never DDP-wrapped: it has no gradients to synchronise. ZeRO-3 gathers each layer's weights
    just before the layer runs, so every process must call it the same number of times (the
    trainer's micro-batches are equal per rank; see `distill.task.teacher_test_logits`).
    The module is built whole in host memory on each process first (what `torch.load` needs)
    and only its shard is kept on the device; `offload_param` in the DeepSpeed JSON keeps the
    shards in host memory instead.
    """
    if not zero3_for_teacher(accelerator):
        return module.to(accelerator.device)
    import deepspeed

    if any(p.dtype == torch.float64 for p in module.parameters()):
        # ZeRO-3 partitions half, bfloat16 and float32 weights only (DeepSpeed 0.19 asserts)
        module = module.float()
        log("ZeRO-3 shards float32 weights only: the frozen teacher runs in float32")

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugins[TEACHER_PLUGIN].deepspeed_config)
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    zero = cfg.setdefault("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto"]:
        # Hugging Face templates size these from `model.config.hidden_size`, which a CNN has
        # not: DeepSpeed's own defaults apply instead
        del zero[key]
    # no training happens: batch keys only satisfy DeepSpeed's consistency check
    cfg.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        train_batch_size=accelerator.num_processes,
        gradient_clipping=0.0,
    )
    _use_torch_autocast(cfg, accelerator.mixed_precision)
    engine = deepspeed.initialize(model=module, config=cfg)[0]
    engine.eval()
    local, total = parameter_share(engine.module)
    log(
        f"teacher sharded by ZeRO-3 over {accelerator.num_processes} processes: this process "
        f"holds {local:,} of its {total:,} parameters ({100 * local / total:.1f}%)"
    )
    return engine


def parameter_share(module: nn.Module) -> tuple[int, int]:
    """(parameters stored by this process, parameters in the model): equal unless ZeRO-3
    partitioned the module (`ds_tensor` is this process's slice, `ds_numel` the whole)."""
    local = total = 0
    for p in module.parameters():
        whole = getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else whole
        total += whole
    return local, total


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
