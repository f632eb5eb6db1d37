"""`train`: supervised training of any registered model (teachers, CE baselines)."""

from __future__ import annotations

from common.checkpoint import model_spec
from common.data import build_splits
from common.models import build_model
from common.runtime import open_stage
from common.trainer import CrossEntropyTask, Trainer


def run(cfg, stage: str = "train", stage_dir=None) -> dict:
    rt = open_stage(cfg, stage, stage_dir)
    try:
        splits = build_splits(cfg.data, cfg.run.seed)
        m = cfg.train.model
        model = build_model(m.name, splits.num_classes, weights=m.weights, **m.kwargs)
        trainer = Trainer(
            accelerator=rt.accelerator,
            run=cfg.run,
            loop=cfg.train.loop,
            model=model,
            spec=model_spec(m.name, splits.num_classes, m.kwargs),
            splits=splits,
            task=CrossEntropyTask(cfg.train.loop.label_smoothing),
            stage_dir=rt.stage_dir,
            logger=rt.logger,
        )
        metrics = trainer.fit()
        rt.logger.info(f"{stage}: metrics in {rt.stage_dir / 'metrics.json'}")
        return metrics
    finally:
        rt.close()
