"""`sparsity`: train a trained model with L1 on every BatchNorm scale (network slimming).

s is either given, or derived from the total shrinkage the run should apply
(`sparsity.shrink`, see `prune.l1.s_for_shrink`) for this run's own learning-rate schedule, so
a 5-epoch run lands in the same regime as NS's 160 epochs. Training can keep distilling from
the cached soft targets (`kd_from: cache`), so the student's accuracy is not traded away while
its scales separate.
"""

from __future__ import annotations

import dataclasses

from common.checkpoint import load_model
from common.errors import ConfigError
from common.logging import write_json
from common.optim import lr_at
from common.trainer import Trainer
from launch.graph import seed_of
from launch.stages.teachers import follow_schedule, labels_or_cached_kd
from prune.config import DEFAULT_SHRINK
from prune.l1 import SparsityTask, require_bn, s_for_shrink
from prune.plots import gamma_histogram
from prune.threshold import all_gammas, separation


def run(cfg, inputs, ctx) -> dict:
    sc = cfg.sparsity
    seed = seed_of(cfg, ctx.instance)
    model, spec = load_model(inputs["model"])
    require_bn(model, "sparsity.init")
    inner, splits, choose = labels_or_cached_kd(cfg, sc, sc.loop, inputs, ctx, seed)
    if spec["num_classes"] != splits.num_classes:
        raise ConfigError(
            f"the model {inputs['model']} has {spec['num_classes']} classes, "
            f"`data.name` {cfg.data.name} has {splits.num_classes}"
        )

    def histogram(epoch: int, m) -> None:
        if ctx.is_main:  # every rank holds the same gammas; rank 0 draws
            path = ctx.stage_dir / f"gamma_hist_epoch{epoch:03d}.png"
            title = f"|gamma| after epoch {epoch}" if epoch else "|gamma| before sparsity training"
            gamma_histogram(all_gammas(m), path, title, sc.histogram_bins)
            ctx.logger.log_image("sparsity/gamma_hist", path, step=task.step)

    task = SparsityTask(
        inner,
        s=0.0,  # set below, once the trainer knows the schedule
        schedule=sc.schedule,
        ramp_fraction=sc.ramp_fraction,
        penalty_in_loss=sc.penalty_in_loss,
        total_steps=1,
        steps_per_epoch=1,
        on_epoch_end=histogram,
    )
    trainer = Trainer(
        ctx=ctx,
        run=dataclasses.replace(cfg.run, seed=seed),  # batch order, choice of views
        # the last epoch, always: it is the sparsest, and what pruning is for
        loop=dataclasses.replace(sc.loop, selection_split="none"),
        loop_key="sparsity.loop",
        model=model,
        spec=spec,
        task=task,
        splits=splits,
        **({"choose_views": choose} if choose else {}),
    )
    # The schedule of s and the epoch count follow the trainer's step, also on resume.
    spe = trainer.sampler.steps_per_epoch
    lrs = [lr_at(t, sc.loop.epochs * spe, spe, sc.loop.optim) for t in range(trainer.total_steps)]
    shrink = sc.shrink if sc.s is None else sc.s * sum(lrs)
    if sc.s is None and sc.shrink is None:
        shrink = DEFAULT_SHRINK
    task.s = sc.s if sc.s is not None else s_for_shrink(shrink, lrs)
    task.total_steps, task.steps_per_epoch, task.step = trainer.total_steps, spe, trainer.state.step
    follow_schedule(inner, trainer)
    start = separation(all_gammas(trainer.unwrapped))
    ctx.logger.info(
        f"sparsity: s = {task.s:.3g}, total shrinkage s x sum(lr) = {shrink:.3g} over "
        f"{trainer.total_steps} steps; median |gamma| now {start['median']:.3g}"
    )
    if task.step == 0:
        histogram(0, trainer.unwrapped)
    metrics = trainer.fit()
    gammas = all_gammas(trainer.evaluated)  # the weights it reports (their average, if kept)
    metrics.update(
        s=task.s, shrink=shrink, separation={"before": start, "after": separation(gammas)}
    )
    if ctx.is_main:  # the end state, also when `loop.max_steps` stops mid-epoch
        gamma_histogram(
            gammas, ctx.stage_dir / "gamma_hist_final.png", "|gamma| final", sc.histogram_bins
        )
        write_json(ctx.stage_dir / "metrics.json", metrics)
    return metrics
