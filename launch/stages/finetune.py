"""`finetune`: train the pruned model in the same loop: on labels, distilled from the cached
soft targets or from a live teacher (by default the unpruned model), or as the scratch-B
baseline (Liu et al. 2019: the pruned architecture from random init, epochs scaled by
MACs_unpruned / MACs_pruned so the compute budget matches)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from common.checkpoint import build_from_spec, load_model
from common.errors import ConfigError
from common.trainer import Trainer
from distill.config import TeacherConfig
from launch.graph import seed_of
from launch.stages.teachers import follow_schedule, labels_or_cached_kd, live_kd


def scratch_b_epochs(epochs: int, prune_metrics: Path) -> int:
    """epochs * MACs_unpruned / MACs_pruned, from the prune stage's metrics.json."""
    if not prune_metrics.is_file():
        raise ConfigError(
            f"`finetune.scratch_b` needs the prune stage's {prune_metrics} (MACs before/after)"
        )
    m = json.loads(prune_metrics.read_text())
    return max(1, round(epochs * m["before"]["macs"] / m["after"]["macs"]))


def run(cfg, inputs, ctx) -> dict:
    fc = cfg.finetune
    seed = seed_of(cfg, ctx.instance)
    model, spec = load_model(inputs["model"])
    loop = fc.loop
    if fc.scratch_b:
        loop = replace(
            loop, epochs=scratch_b_epochs(loop.epochs, inputs["model"].parent / "metrics.json")
        )
        torch.manual_seed(seed)  # same fresh init on every rank
        model = build_from_spec(spec)
        ctx.logger.info(f"scratch-B: {loop.epochs} epochs from random init")
    task, splits, choose = labels_or_cached_kd(cfg, fc, loop, inputs, ctx, seed)
    if fc.kd_from in ("live", "unpruned"):
        teacher = [TeacherConfig(path=str(inputs["teacher"]))]
        task = live_kd(cfg, fc.kd, splits, ctx, teacher, "logits")
    trainer = Trainer(
        ctx=ctx,
        run=replace(cfg.run, seed=seed),  # batch order, choice of views
        loop=loop,
        loop_key="finetune.loop",
        model=model,
        spec=spec,
        splits=splits,
        task=task,
        **({"choose_views": choose} if choose else {}),
    )
    follow_schedule(task, trainer)
    return trainer.fit()
