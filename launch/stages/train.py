"""`train`: one member of the teacher ensemble (any registered model), supervised."""

from __future__ import annotations

import dataclasses

import torch

from common.checkpoint import model_spec
from common.data import build_splits
from common.models import build_model
from common.trainer import CrossEntropyTask, Trainer
from launch.graph import members


def run(cfg, inputs, ctx) -> dict:
    member = next(m for m in members(cfg) if m.name == ctx.instance)
    splits = build_splits(cfg.data, cfg.run.seed)
    m = member.model
    torch.manual_seed(member.seed)
    model = build_model(
        m.name, splits.num_classes, weights=m.weights, pretrained=m.pretrained, **m.kwargs
    )
    trainer = Trainer(
        ctx=ctx,
        run=dataclasses.replace(cfg.run, seed=member.seed),  # init and batch order
        loop=cfg.train.loop,
        loop_key="train.loop",
        model=model,
        spec=model_spec(m.name, splits.num_classes, m.kwargs),
        task=CrossEntropyTask(cfg.train.loop.label_smoothing),
        splits=splits,
    )
    return trainer.fit()
