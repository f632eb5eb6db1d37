"""The teacher side of every distilling stage, set up one way for `distill`, `sparsity` and
`finetune`: soft targets from the cache (replaying exactly the views the teachers scored), or
teachers run live and frozen; plus their logits on the test split, for agreement metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from common.config import KDConfig
from common.data import Splits, build_splits
from common.distributed import place_frozen
from common.files import ENSEMBLE_PREDICTIONS, save_predictions
from common.precision import DTYPES
from common.runtime import StageContext
from common.trainer import CrossEntropyTask
from distill.cache import LogitCache
from distill.cache.setup import cached_splits, request, teacher_configs
from distill.config import TeacherConfig
from distill.losses import build_loss
from distill.task import (
    CachedTargetDataset,
    CachedTeacher,
    KDTask,
    OnlineTeacher,
    replay_cached_views,
    teacher_test_logits,
)
from distill.teachers import Ensemble, build_ensemble


def live_ensemble(
    cfg, teachers: list[TeacherConfig], ctx: StageContext, num_classes: int, mode, weights=None
):
    """The ensemble on this process's device in the run's precision (sharded under ZeRO-3)."""
    ensemble = build_ensemble(teachers, num_classes, mode, weights).to(DTYPES[cfg.run.dtype])
    return place_frozen(ensemble, ctx.accelerator, ctx.logger.info)


def test_logits(cfg, ensemble: Ensemble, splits: Splits, ctx: StageContext):
    """The ensemble's test logits on this process's share (the rows of the others are zero),
    and, in the stage directory, its prediction for every test image (`ENSEMBLE_PREDICTIONS`:
    what the ensemble-against-member comparison pairs)."""
    acc = ctx.accelerator
    logits = teacher_test_logits(
        ensemble,
        splits.test,
        acc.process_index,
        acc.num_processes,
        acc.device,
        dtype=DTYPES[cfg.run.dtype],
    )
    full = logits.float().to(acc.device)
    if acc.num_processes > 1:  # each row is one process's, zero elsewhere
        full = acc.reduce(full, reduction="sum")
    if ctx.is_main:  # (runtime.open made the stage directory)
        table = {
            "sample_id": np.arange(len(splits.test)),
            "label": np.asarray(splits.test.source.labels, dtype=np.int64),
            "pred": full.argmax(1).cpu().numpy(),
        }
        save_predictions(ctx.stage_dir / ENSEMBLE_PREDICTIONS, table)
    return logits


def cached_kd(
    cfg,
    kd: KDConfig,
    splits: Splits,
    ctx: StageContext,
    *,
    cache_dir: Path,
    trained: list[Path],
    seed: int,
    with_test_logits: bool,
) -> tuple[KDTask, Splits, object]:
    """(task, splits with cached targets, view chooser) for a student distilled from the cache
    in `cache_dir`, which must be the cache this configuration asks for."""
    teachers = teacher_configs(cfg, trained)
    extras = build_loss(kd.loss).topk_extras
    cache = LogitCache(cache_dir, request(cfg, teachers), needs=extras)
    logits = None
    if with_test_logits:
        c = cfg.cache
        ensemble = live_ensemble(
            cfg, teachers, ctx, splits.num_classes, c.ensemble, c.ensemble_weights
        )
        logits = test_logits(cfg, ensemble, splits, ctx)
    splits = dataclasses.replace(splits, train=CachedTargetDataset(splits.train, cache))
    task = KDTask(CachedTeacher(splits.num_classes, extras or ()), kd, logits)
    return task, splits, replay_cached_views(cfg.cache.views, seed)


def labels_or_cached_kd(
    cfg, section, loop, inputs, ctx, seed: int
) -> tuple[object, Splits, object]:
    """(task, splits, view chooser) of a stage that trains on labels, or with
    `section.kd_from: cache` on the cached soft targets (replaying the teachers' views, chosen
    with `seed`)."""
    if section.kd_from != "cache":
        return CrossEntropyTask(loop.label_smoothing), build_splits(cfg.data, cfg.run.seed), None
    return cached_kd(
        cfg,
        section.kd,
        cached_splits(cfg),
        ctx,
        cache_dir=inputs["cache"],
        trained=inputs["teachers"],
        seed=seed,
        with_test_logits=False,
    )


def live_kd(
    cfg,
    kd: KDConfig,
    splits: Splits,
    ctx: StageContext,
    teachers: list[TeacherConfig],
    mode,
    weights=None,
) -> KDTask:
    """A task whose soft targets come from `teachers` run on each batch, frozen, averaged by
    `mode` with `weights` (as `cache.ensemble` and `cache.ensemble_weights`)."""
    ensemble = live_ensemble(cfg, teachers, ctx, splits.num_classes, mode, weights)
    return KDTask(OnlineTeacher(ensemble), kd, test_logits(cfg, ensemble, splits, ctx))


def follow_schedule(task, trainer) -> None:
    """Tell a KD task where its trainer's schedule stands (step, steps per epoch, epochs), so
    a loss that follows it (DKD's warm-up) continues where a resumed run stopped. Other
    tasks keep no schedule."""
    if isinstance(task, KDTask):
        task.start(trainer.state.step, trainer.sampler.steps_per_epoch, trainer.loop.epochs)
