"""The root schema: one YAML file describes a run; each stage reads the sections it needs.

Stage sections are defined with their stage; this file only composes them, so adding a stage
is one field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import DataConfig, LoggingConfig, RunConfig, TrainConfig
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
    """`train` stage: supervised training of one model."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """`cache` / `verify-cache` stages: the teacher ensemble's soft targets on disk."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """`distill` stage: the student trained on the soft targets."""
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    """`sparsity` stage: L1 on BatchNorm scales (network slimming)."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """`prune` stage: global |gamma| threshold, coupled channel removal, smaller model."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """`finetune` stage: train the pruned model (optional live KD, or scratch-B)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """`pipeline` stage: the whole run in one command (steps, CE baseline, export)."""
