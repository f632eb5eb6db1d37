"""`sparsity`: train a trained model with L1 on every BatchNorm scale (network slimming)."""

from __future__ import annotations

from pathlib import Path

from common.checkpoint import load_model
from common.config import ConfigError
from common.data import build_splits
from common.runtime import open_stage
from common.trainer import CrossEntropyTask, Trainer
from prune.l1 import SparsityTask, require_bn
from prune.plots import gamma_histogram
from prune.threshold import all_gammas


def run(cfg, stage: str = "sparsity", stage_dir=None) -> dict:
    rt = open_stage(cfg, stage, stage_dir)
    try:
        sc = cfg.sparsity
        init = Path(sc.init or Path(cfg.run.out_dir) / "train" / "model")
        model, spec = load_model(init)
        require_bn(model, "sparsity.init")
        splits = build_splits(cfg.data, cfg.run.seed)
        if spec["num_classes"] != splits.num_classes:
            raise ConfigError(
                f"`sparsity.init` {init} has {spec['num_classes']} classes, "
                f"`data.name` {cfg.data.name} has {splits.num_classes}"
            )

        def histogram(epoch: int, m) -> None:
            if rt.is_main:  # every rank holds the same gammas; rank 0 draws
                path = rt.stage_dir / f"gamma_hist_epoch{epoch:03d}.png"
                gamma_histogram(
                    all_gammas(m),
                    path,
                    f"|gamma| after epoch {epoch}" if epoch else "|gamma| before sparsity training",
                    sc.histogram_bins,
                )
                rt.logger.log_image("sparsity/gamma_hist", path, step=task.step)

        task = SparsityTask(
            CrossEntropyTask(sc.loop.label_smoothing),
            s=sc.s,
            schedule=sc.schedule,
            ramp_fraction=sc.ramp_fraction,
            penalty_in_loss=sc.penalty_in_loss,
            total_steps=1,  # set from the trainer below
            steps_per_epoch=1,
            on_epoch_end=histogram,
        )
        trainer = Trainer(
            accelerator=rt.accelerator,
            run=cfg.run,
            loop=sc.loop,
            model=model,
            spec=spec,
            splits=splits,
            task=task,
            stage_dir=rt.stage_dir,
            logger=rt.logger,
        )
        # The schedule of s and the epoch count follow the trainer's step, also on resume.
        task.total_steps = trainer.total_steps
        task.steps_per_epoch = trainer.sampler.steps_per_epoch
        task.step = trainer.state.step
        if task.step == 0:
            histogram(0, trainer.unwrapped)
        metrics = trainer.fit()
        if rt.is_main:  # the end state, also when `loop.max_steps` stops mid-epoch
            path = rt.stage_dir / "gamma_hist_final.png"
            gamma_histogram(all_gammas(trainer.unwrapped), path, "|gamma| final", sc.histogram_bins)
        rt.logger.info(f"{stage}: metrics in {rt.stage_dir / 'metrics.json'}")
        return metrics
    finally:
        rt.close()
