"""One runtime per process, one context per stage.

`Runtime` is built once by the entry point: it owns the Accelerator (the process group, the
device, the DeepSpeed plugins) and decides once which process is rank 0. Every stage the
process runs (one, or all of them in a pipeline) gets a `StageContext` from it: its
directory, a logger (the real one on rank 0, a `NullLogger` elsewhere) and the identity of
what it is making, which its checkpoints record. Stages never build or end an Accelerator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from common.checkpoint import CheckpointManager
from common.config import to_dict
from common.distributed import build_accelerator, seed_everything
from common.logging import NullLogger, RunLogger, write_json


@dataclass
class StageContext:
    accelerator: Accelerator
    stage_dir: Path
    logger: NullLogger
    name: str
    """The node's name, e.g. `distill:seed1`."""
    instance: str = ""
    """Its instance within the stage (`seed1`), or "" for single-instance stages."""
    identity: dict = field(default_factory=dict)
    """{"key", "values", "inputs"}: what this node is made from (`launch.freshness`)."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def publish(self, metrics: dict, summary: str) -> dict:
        """The stage's result: `metrics.json` (rank 0 alone writes) and its one-line summary."""
        if self.is_main:
            write_json(self.stage_dir / "metrics.json", metrics)
        self.logger.info(summary)
        return metrics


class Runtime:
    def __init__(self, cfg):
        self.accelerator = build_accelerator(cfg.run)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def open(self, cfg, name: str, instance: str, stage_dir: Path, identity: dict) -> StageContext:
        """Seed, create the directory (rank 0) and the stage's logger; a restarted stage
        continues the wandb run of its newest checkpoint."""
        acc = self.accelerator
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        logger: NullLogger = NullLogger()
        if acc.is_main_process:
            stage_dir.mkdir(parents=True, exist_ok=True)
            logger = RunLogger(
                cfg.logging,
                stage_dir,
                f"{Path(cfg.run.out_dir).name}/{name}",
                to_dict(cfg),
                run_id=stored_wandb_id(stage_dir),
            )
        acc.wait_for_everyone()
        return StageContext(acc, stage_dir, logger, name, instance, identity)

    def close(self, ctx: StageContext) -> None:
        """End a stage: its logger, and the references `prepare` kept to its model and
        optimizer (the next stage of a pipeline runs in the same process)."""
        ctx.logger.close()
        self.accelerator.free_memory()

    def end(self) -> None:
        self.accelerator.end_training()


def stored_wandb_id(stage_dir: Path) -> str | None:
    """The wandb run id in the newest complete checkpoint of `stage_dir`, if any."""
    # complete checkpoints only (the manifest is written last), listed without hashing
    ckpts = CheckpointManager(stage_dir / "checkpoints", keep=1, is_main=False).complete()
    if not ckpts:
        return None
    return json.loads((ckpts[-1] / "trainer_state.json").read_text()).get("wandb_id")
