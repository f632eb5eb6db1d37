"""`finetune`: train the pruned model in DDP (same trainer), optionally with live KD from the
unpruned model, or as the scratch-B baseline (Liu et al. 2019: the pruned architecture from
random init, epochs scaled by MACs_unpruned / MACs_pruned so the compute budget matches)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from common.checkpoint import build_from_spec, load_model
from common.config import ConfigError
from common.data import build_splits
from common.distributed import place_frozen
from common.precision import DTYPES
from common.runtime import open_stage
from common.trainer import CrossEntropyTask, Trainer
from distill.config import TeacherConfig
from distill.task import KDTask, OnlineTeacher, teacher_test_logits
from distill.teachers import build_ensemble


def scratch_b_epochs(epochs: int, prune_metrics: Path) -> int:
    """epochs * MACs_unpruned / MACs_pruned, from the prune stage's metrics.json."""
    if not prune_metrics.is_file():
        raise ConfigError(
            f"`finetune.scratch_b` needs the prune stage's {prune_metrics} (MACs before/after)"
        )
    m = json.loads(prune_metrics.read_text())
    return max(1, round(epochs * m["before"]["macs"] / m["after"]["macs"]))


def run(cfg, stage: str = "finetune", stage_dir=None) -> dict:
    fc = cfg.finetune
    init = Path(fc.init or Path(cfg.run.out_dir) / "prune" / "model")
    loop = fc.loop
    if fc.scratch_b:
        stage = "scratch_b" if stage == "finetune" else stage
        loop = replace(loop, epochs=scratch_b_epochs(loop.epochs, init.parent / "metrics.json"))
    rt = open_stage(cfg, stage, stage_dir, live_teacher=fc.teacher is not None)
    try:
        model, spec = load_model(init)
        if fc.scratch_b:
            torch.manual_seed(cfg.run.seed)  # same fresh init on every rank
            model = build_from_spec(spec)
            rt.logger.info(f"scratch-B: {loop.epochs} epochs from random init")
        splits = build_splits(cfg.data, cfg.run.seed)
        task = CrossEntropyTask(loop.label_smoothing)
        if fc.teacher is not None:  # live KD from the unpruned model
            acc = rt.accelerator
            ensemble = build_ensemble(
                [TeacherConfig(path=fc.teacher)], splits.num_classes, "logits"
            )
            dtype = DTYPES[cfg.run.dtype]
            ensemble = place_frozen(ensemble.to(dtype), acc, rt.logger.info)
            task = KDTask(
                OnlineTeacher(ensemble),
                fc.kd_temperature,
                fc.kd_alpha,
                teacher_test_logits(
                    ensemble,
                    splits.test,
                    acc.process_index,
                    acc.num_processes,
                    acc.device,
                    dtype=dtype,
                ),
            )
        trainer = Trainer(
            accelerator=rt.accelerator,
            run=cfg.run,
            loop=loop,
            model=model,
            spec=spec,
            splits=splits,
            task=task,
            stage_dir=rt.stage_dir,
            logger=rt.logger,
        )
        metrics = trainer.fit()
        rt.logger.info(f"{stage}: metrics in {rt.stage_dir / 'metrics.json'}")
        return metrics
    finally:
        rt.close()
