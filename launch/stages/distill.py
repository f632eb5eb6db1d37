"""`distill`, `distill-ce` and `distill-loss`: one student per seed, on the ensemble's soft
targets (cached, or live with `distill.mode=online`) with `kd.loss` or, for `distill-loss`,
each loss of `distill.compare`, or for the baseline on labels alone; every other setting is
shared, and all replay the same cached views, so the loss is the only difference."""

from __future__ import annotations

import dataclasses

import torch

from common.checkpoint import model_spec
from common.models import build_model
from common.trainer import CrossEntropyTask, Trainer
from distill.cache.setup import cached_splits, teacher_configs
from distill.task import replay_cached_views
from launch.graph import loss_of, seed_of
from launch.stages.teachers import cached_kd, follow_schedule, live_kd


def run(cfg, inputs, ctx) -> dict:
    d = cfg.distill
    seed = seed_of(cfg, ctx.instance)
    kd = d.kd
    if ctx.name.startswith("distill-loss"):
        kd = dataclasses.replace(kd, loss=loss_of(ctx.instance))
    splits = cached_splits(cfg)
    if ctx.name.startswith("distill-ce"):
        task = CrossEntropyTask(d.loop.label_smoothing)
        choose = replay_cached_views(cfg.cache.views, seed)
    elif d.mode == "cached":
        task, splits, choose = cached_kd(
            cfg,
            kd,
            splits,
            ctx,
            cache_dir=inputs["cache"],
            trained=inputs["teachers"],
            seed=seed,
            with_test_logits=True,
        )
    else:
        teachers = teacher_configs(cfg, inputs["teachers"])
        c = cfg.cache
        task = live_kd(cfg, kd, splits, ctx, teachers, c.ensemble, c.ensemble_weights)
        choose = replay_cached_views(cfg.cache.views, seed)
    s = d.student
    torch.manual_seed(seed)
    student = build_model(
        s.name, splits.num_classes, weights=s.weights, pretrained=s.pretrained, **s.kwargs
    )
    trainer = Trainer(
        ctx=ctx,
        run=dataclasses.replace(cfg.run, seed=seed),  # init, batch order, choice of views
        loop=d.loop,
        loop_key="distill.loop",
        model=student,
        spec=model_spec(s.name, splits.num_classes, s.kwargs),
        task=task,
        splits=splits,
        choose_views=choose,
    )
    follow_schedule(task, trainer)
    metrics = trainer.fit()
    chosen = metrics["selected"] or {}
    agreement = chosen.get("test_teacher_agreement")
    ctx.logger.info(
        f"{ctx.name}: student test acc {chosen.get('test_acc', float('nan')):.4f} (epoch "
        f"{chosen.get('epoch')}, "
        + ("chosen on val)" if metrics["selection_split"] == "val" else "the last)")
        + (f", agreement with teachers {agreement:.4f}" if agreement is not None else "")
    )
    return metrics
