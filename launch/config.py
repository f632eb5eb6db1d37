"""The root schema: one YAML file describes a run; each stage reads the sections it needs.

Stage sections are defined with their stage; this file only composes them, so adding a stage
is one field here. Rules that span sections are checked here, once, at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config import (
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from distill.config import CacheConfig, DistillConfig, TeacherConfig
from launch.pipeline_config import PipelineConfig
from prune.config import FinetuneConfig, PruneConfig, SparsityConfig


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Output directory, seed, precision."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and replayable views (shared by every stage, so caches stay valid)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """wandb and progress bars."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """`train` stage: the teacher ensemble."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """`cache` / `verify-cache` stages: the teacher ensemble's soft targets on disk."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """`distill` / `distill-ce` stages: students on the soft targets, and on labels."""
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    """`sparsity` stage: L1 on BatchNorm scales (network slimming)."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """`prune` stage: global |gamma| threshold, coupled channel removal, smaller model."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """`finetune` stage: train the pruned model (optional KD, or scratch-B)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """The run as a whole: its stages and the export."""

    def __post_init__(self) -> None:
        from launch.graph import BY_NAME, members

        unknown = [s for s in self.pipeline.stages or [] if s not in BY_NAME]
        if unknown or self.pipeline.stages == []:
            raise ConfigError(
                f"`pipeline.stages` has unknown stage(s) {unknown or '(empty list)'}; "
                f"valid: {', '.join(BY_NAME)}"
            )
        members(self)  # distinct member names
        check_names(self)
        check_distillation(self)


def check_names(cfg: Config) -> None:
    """The dataset and every model the run builds exist and, offline, every weight file it
    will load is on disk (all missing files named in one message): a run is refused when its
    configuration is loaded, before `plan` prints a job, `submit` queues one or a stage
    writes a directory, not after a queue wait or hours of teacher training."""
    from common.data.sources import check_dataset
    from common.models import check_model
    from launch.graph import in_run, members

    check_dataset(cfg.data.name)
    stages = set(in_run(cfg))
    models: list[tuple[str, ModelConfig | TeacherConfig]] = []
    if "train" in stages:
        models += [(f"train member {m.name}", m.model) for m in members(cfg)]
    if stages & {"distill", "distill-ce"}:
        models.append(("distill.student", cfg.distill.student))
    models += [(f"cache.teachers[{i}]", t) for i, t in enumerate(cfg.cache.teachers) if t.model]
    missing = []
    for key, m in models:
        name, pretrained = (m.name, m.pretrained) if isinstance(m, ModelConfig) else (m.model, None)
        try:
            absent = check_model(name, pretrained)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        if absent:
            missing.append(f"{key}: {absent}")
        if m.weights is not None and not Path(m.weights).is_file():
            missing.append(f"{key}: the weights file {m.weights} does not exist")
    if missing:
        raise ConfigError(
            f"{len(missing)} weight file(s) this run needs are not there: " + " | ".join(missing)
        )


def check_distillation(cfg: Config) -> None:
    """What the cache must hold for its readers, checked before any stage runs: one weight per
    teacher, and whole rows for a loss that reads every class (DIST) from the cache."""
    from launch.graph import in_run, members

    c = cfg.cache
    count = len(c.teachers) or len(members(cfg))
    if c.ensemble_weights is not None and len(c.ensemble_weights) != count:
        order = "`cache.teachers`" if c.teachers else "`train.members` (the default teachers)"
        raise ConfigError(
            f"`cache.ensemble_weights` has {len(c.ensemble_weights)} weights for {count} "
            f"teachers: give one per teacher, in the order of {order}"
        )
    if c.storage != "topk":
        return
    from distill.losses import LOSSES

    stages, d = set(in_run(cfg)), cfg.distill
    from_cache = []  # (key, loss) of every student that reads the cache
    if d.mode == "cached":
        from_cache += [("distill.kd.loss", d.kd.loss)] if "distill" in stages else []
        from_cache += [("distill.compare", x) for x in d.compare if "distill-loss" in stages]
    for section in ("sparsity", "finetune"):
        sc = getattr(cfg, section)
        if section in stages and sc.kd_from == "cache":
            from_cache.append((f"{section}.kd.loss", sc.kd.loss))
    for key, loss in from_cache:
        if LOSSES[loss].topk_extras is None:
            raise ConfigError(
                f"`{key}: {loss}` correlates every class's probability (over the classes and "
                f"over the batch), and `cache.storage: topk` keeps only the {c.topk} most "
                f"probable: use cache.storage full or int8 (C + 4 bytes a row), or another "
                f"loss in `{key}`"
            )
