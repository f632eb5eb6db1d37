"""The root schema: one YAML file describes a run; each stage reads the sections it needs.

Stage sections are defined with their stage; this file only composes them, so adding a stage
is one field here. Rules that span sections are checked here, once, at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ConfigError, DataConfig, LoggingConfig, RunConfig, TrainConfig
from distill.config import CacheConfig, DistillConfig
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
