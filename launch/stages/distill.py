"""`distill`: train the student on the ensemble's soft targets (cached or live), or on labels
alone (`distill.mode=ce`, the baseline), in the shared DDP loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from common.checkpoint import model_spec
from common.config import ConfigError
from common.distributed import place_frozen
from common.models import build_model
from common.precision import DTYPES
from common.runtime import open_stage
from common.trainer import CrossEntropyTask, Trainer
from distill.cache import LogitCache, consumer_expectation
from distill.cache.setup import cache_root, cached_splits, teacher_configs
from distill.task import (
    CachedTargetDataset,
    CachedTeacher,
    KDTask,
    OnlineTeacher,
    replay_cached_views,
    teacher_test_logits,
)
from distill.teachers import build_ensemble

STAGE_DIRS = {"cached": "distill", "online": "distill-online", "ce": "distill-ce"}


def run(cfg) -> dict:
    d = cfg.distill
    rt = open_stage(cfg, STAGE_DIRS[d.mode], live_teacher=d.mode == "online")
    acc = rt.accelerator
    seed = cfg.run.seed if d.seed is None else d.seed
    try:
        splits = cached_splits(cfg)
        num_classes = splits.num_classes
        task, choose = CrossEntropyTask(d.loop.label_smoothing), None
        if d.mode != "ce":
            ensemble = _teachers(cfg, num_classes, required=d.mode == "online")
            identities = test_logits = None
            if ensemble is not None:
                identities = ensemble.identities
                dtype = DTYPES[cfg.run.dtype]
                ensemble = place_frozen(ensemble.to(dtype), acc, rt.logger.info)
                test_logits = teacher_test_logits(
                    ensemble,
                    splits.test,
                    acc.process_index,
                    acc.num_processes,
                    acc.device,
                    dtype=dtype,
                )
            if d.mode == "cached":
                ensemble = None  # identities and test logits were all it was needed for
                cache = LogitCache(
                    cache_root(cfg),
                    consumer_expectation(splits.train, cfg.cache.views, identities),
                )
                splits = dataclasses.replace(splits, train=CachedTargetDataset(splits.train, cache))
                teacher = CachedTeacher(num_classes)
            else:
                teacher = OnlineTeacher(ensemble)
            task = KDTask(teacher, d.temperature, d.alpha, test_logits)
            choose = replay_cached_views(cfg.cache.views, seed)
        s = d.student
        torch.manual_seed(seed)
        student = build_model(s.name, num_classes, weights=s.weights, **s.kwargs)
        trainer = Trainer(
            accelerator=acc,
            run=dataclasses.replace(cfg.run, seed=seed),
            loop=d.loop,
            model=student,
            spec=model_spec(s.name, num_classes, s.kwargs),
            task=task,
            splits=splits,
            stage_dir=rt.stage_dir,
            logger=rt.logger,
            **({"choose_views": choose} if choose else {}),
        )
        metrics = trainer.fit()
        last = metrics["last"] or {}
        rt.logger.info(
            f"{rt.stage_dir.name}: student test acc {last.get('test_acc', float('nan')):.4f}"
            + (
                f", agreement with teachers {last['test_teacher_agreement']:.4f}"
                if "test_teacher_agreement" in last
                else ""
            )
            + f"; metrics in {rt.stage_dir / 'metrics.json'}"
        )
        return metrics
    finally:
        rt.close()


def _teachers(cfg, num_classes: int, required: bool):
    """The ensemble for online targets and for test-split agreement metrics. Cached mode can
    run without it (the cache suffices), but then the cache's teachers cannot be re-checked."""
    try:
        cfgs = teacher_configs(cfg)
    except ConfigError:
        if required:
            raise
        return None
    if not required and not all(Path(c.path or c.weights).exists() for c in cfgs):
        return None
    return build_ensemble(cfgs, num_classes, cfg.cache.ensemble)
