"""Per-stage runtime: the accelerator, the stage directory, the resolved config and a logger.

Created once at the top of a stage; rank-0-only objects (the real logger) are decided here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from common.checkpoint import CheckpointManager
from common.config import save_config, to_dict
from common.distributed import build_accelerator, seed_everything
from common.logging import NullLogger, RunLogger


@dataclass
class StageRuntime:
    accelerator: Accelerator
    stage_dir: Path
    logger: NullLogger

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def close(self) -> None:
        self.logger.close()
        self.accelerator.end_training()


def open_stage(
    cfg,
    stage: str,
    stage_dir: Path | None = None,
    wandb_id: str | None = None,
    live_teacher: bool = False,
) -> StageRuntime:
    """Set up processes and the output directory of `stage`; rank 0 writes the config.
    `live_teacher`: the stage runs a frozen teacher next to the model it trains."""
    acc = build_accelerator(cfg.run, live_teacher=live_teacher)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    stage_dir = Path(stage_dir or Path(cfg.run.out_dir) / stage)
    logger: NullLogger = NullLogger()
    if acc.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, stage_dir / "config.yaml")
        logger = RunLogger(
            cfg.logging,
            stage_dir,
            f"{Path(cfg.run.out_dir).name}/{stage}",
            to_dict(cfg),
            run_id=wandb_id or _stored_wandb_id(stage_dir),
        )
    acc.wait_for_everyone()
    return StageRuntime(acc, stage_dir, logger)


def _stored_wandb_id(stage_dir: Path) -> str | None:
    """A restarted stage continues the wandb run of its newest checkpoint."""
    # complete checkpoints only (the manifest is written last), listed without hashing;
    # read-only: keep and is_main are unused by `complete()`
    ckpts = CheckpointManager(stage_dir / "checkpoints", keep=1, is_main=False).complete()
    if not ckpts:
        return None
    return json.loads((ckpts[-1] / "trainer_state.json").read_text()).get("wandb_id")
