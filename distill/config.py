"""Configuration of the teacher ensemble, the offline logit cache and student distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from common.config import ConfigError, LoopConfig, ModelConfig


@dataclass(kw_only=True)
class TeacherConfig:
    """One teacher: a directory saved by `train` (model.json + model.safetensors), or a
    registry/torchvision model with a local weights file."""

    path: str | None = None
    """Model directory written by a stage, e.g. runs/x/teachers/resnet56/model."""
    model: str | None = None
    """Registry or tv_<torchvision> name, used with `weights` when `path` is not set."""
    weights: str | None = None
    """Local state dict for `model` (safetensors or torch); never downloaded."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Factory arguments for `model`."""

    def __post_init__(self):
        if (self.path is None) == (self.model is None):
            raise ConfigError("each teacher needs exactly one of `path` or `model`")
        if self.model is not None and self.weights is None:
            raise ConfigError(f"teacher `{self.model}` needs `weights` (a local state dict file)")


@dataclass(kw_only=True)
class CacheConfig:
    """`cache` / `verify-cache`: teacher soft targets for V replayable views of every sample."""

    dir: str | None = None
    """Cache root; default `<run.out_dir>/cache`."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """The ensemble; default: the model of the `train` stage (`<run.out_dir>/train/model`)."""
    views: int = 4
    """Augmented views cached per sample (view_id 0..views-1)."""
    plain_first: bool = False
    """View 0 is the un-augmented evaluation view."""
    storage: Literal["full", "topk"] = "full"
    """full: all class logits (float16); topk: k largest (index + float16 value) + logsumexp."""
    topk: int = 10
    """Classes kept per row with storage=topk."""
    ensemble: Literal["probs", "logits"] = "probs"
    """Average teachers in probability space (stored as log of the mean probability) or logits."""
    logit_dtype: Literal["float16", "float32", "float64"] = "float16"
    """Storage precision of logits (float16: 2 bytes per class, relative rounding 4.9e-4;
    float64 with `run.dtype: float64` makes cached targets equal live ones, for tests)."""
    per_teacher: bool = False
    """Also store every teacher's full float16 logits (column t<i>_logits)."""
    batch_size: int = 256
    """Rows (sample x view) per teacher forward pass; also the unit shards are cut in."""
    rows_per_part: int = 16384
    """Rows written per resumable part file: a killed job loses at most one part per process."""
    num_shards: int | None = None
    """Shards of the cache; default: SLURM_ARRAY_TASK_COUNT, else the number of processes."""
    shard_index: int | None = None
    """The one shard this process writes (job arrays); default: SLURM_ARRAY_TASK_ID."""
    verify_samples: int = 64
    """verify-cache: rows re-scored by the teachers and compared with the cache."""

    def __post_init__(self):
        if self.views < 1:
            raise ConfigError(f"cache.views must be >= 1, got {self.views}")
        if self.topk < 1:
            raise ConfigError(f"cache.topk must be >= 1, got {self.topk}")
        if self.batch_size < 1 or self.rows_per_part < self.batch_size:
            raise ConfigError("cache.rows_per_part must be >= cache.batch_size >= 1")


@dataclass(kw_only=True)
class DistillConfig:
    """`distill`: train a student on the ensemble's soft targets."""

    mode: Literal["cached", "online", "ce"] = "cached"
    """cached: soft targets from the cache; online: teachers run every step; ce: labels only."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="cifar_resnet20"))
    """The student network."""
    temperature: float = 4.0
    """KD temperature T."""
    alpha: float = 0.9
    """Weight of the KD term; (1 - alpha) weighs cross-entropy with the labels."""
    seed: int | None = None
    """Seed of the student's initialisation, batch order and view choice (default run.seed);
    the views themselves stay those the cache was built with (run.seed), so several student
    seeds share one cache."""
    topk_tail: Literal["uniform"] = "uniform"
    """How a top-k cache's missing probability mass is spread (see distill/losses.py)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Schedule, batch and checkpoints of the student."""
