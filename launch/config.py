"""The root schema: one YAML file describes a run; each stage reads the sections it needs.

Stage sections are defined with their stage; this file only composes them, so adding a stage
is one field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import DataConfig, LoggingConfig, RunConfig, TrainConfig


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
