"""Configuration of the teacher ensemble, the offline logit cache and student distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from common.config import (
    POSITIVE_INT,
    ConfigError,
    KDConfig,
    LoopConfig,
    LossName,
    ModelConfig,
    Range,
)


@dataclass(kw_only=True)
class TeacherConfig:
    """One teacher: a directory saved by `train` (model.json + model.safetensors), or a
    registry/torchvision model with a local weights file."""

    path: str | None = None
    """Model directory written by a stage, e.g. runs/x/train/cifar_resnet56-s0/model."""
    model: str | None = None
    """Registry, tv_<torchvision> or timm_<timm> name, used with `weights` when `path` is
    not set."""
    weights: str | None = None
    """Local state dict for `model` (safetensors or torch); never downloaded."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Factory arguments for `model`."""

    def __post_init__(self):
        if (self.path is None) == (self.model is None):
            raise ConfigError("each entry of `cache.teachers` needs exactly one of path or model")
        if self.model is not None and self.weights is None:
            raise ConfigError(f"teacher `{self.model}` needs `weights` (a local state dict file)")


@dataclass(kw_only=True)
class CacheConfig:
    """`cache` / `verify-cache`: teacher soft targets for V replayable views of every sample."""

    dir: str | None = None
    """Where the cache lives. None: `<run.out_dir>/cache/data`. `auto`: a directory named by
    the cache's content (data, views, teachers' weights, storage) under `cache.root`, so runs
    and seeds that ask for the same cache share it with no coordination. Any other path: that
    directory. A cache is never moved or rebuilt in place: one made for another request is
    refused with the list of differences."""
    root: str = "runs/caches"
    """Parent of the content-addressed directories of `cache.dir: auto`."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """The ensemble; default: every member of this run's `train` stage."""
    views: Annotated[int, Range(ge=1, le=65535)] = 4
    """Augmented views cached per sample (view_id 0..views-1)."""
    plain_first: bool = False
    """View 0 is the un-augmented evaluation view."""
    storage: Literal["full", "int8", "topk"] = "full"
    """full: all class logits (`logit_dtype`); int8: all class logits as 8-bit steps of a
    per-row range (C + 4 bytes a view; KD loss within 2e-5 of full storage's and gradient
    cosine >= 0.99998 at T = 1..8: BENCHMARKS.md, "Top-k soft targets"); topk: the k most
    probable classes and their log-probabilities (4k bytes, the rest of the mass spread flat:
    exact at T = 1; at T = 4, k = 10 the KD loss is 7-44% low and the gradient cosine
    0.964-0.987 on real 100-class teachers, so prefer int8 where C + 4 bytes fit), plus four
    statistics of the whole row (8 bytes in float16, `layout.TOPK_EXTRAS`) for DKD and LS;
    DIST needs whole rows and is refused on top-k."""
    topk: POSITIVE_INT = 10
    """Classes kept per row with storage=topk (at most the class count)."""
    logit_dtype: Literal["float16", "float32", "float64"] = "float16"
    """Storage precision of logits (float16: 2 bytes per class, relative rounding 4.9e-4;
    float64 with `run.dtype: float64` makes cached targets equal live ones, for tests)."""
    ensemble: Literal["probs", "logits"] = "probs"
    """Average teachers in probability space (stored as log of the mean probability) or logits."""
    ensemble_weights: Annotated[list[float] | None, Range(gt=0)] = None
    """Per-teacher weights of that average, one per teacher in the order of `cache.teachers`
    (default: of `train.members`), normalised to sum 1 where used; None: equal weights. Part
    of the cache's identity (normalised), so a cache averaged with other weights is refused."""
    per_teacher: bool = False
    """Also store every teacher's logits (column t<i>_logits)."""
    batch_size: POSITIVE_INT = 256
    """Rows (sample x view) per teacher forward pass; also the unit shards are cut in."""
    rows_per_part: POSITIVE_INT = 16384
    """Rows written per resumable part file: a killed job loses at most one part per process."""
    num_shards: Annotated[int | None, Range(ge=1)] = None
    """Shards of the cache; default: SLURM_ARRAY_TASK_COUNT, else the number of processes."""
    shard_index: Annotated[int | None, Range(ge=0)] = None
    """The one shard this process writes (job arrays); default: SLURM_ARRAY_TASK_ID."""
    verify_samples: POSITIVE_INT = 64
    """verify-cache: rows re-scored by the teachers and compared with the cache."""

    def __post_init__(self):
        if self.rows_per_part < self.batch_size:
            raise ConfigError(
                f"`cache.rows_per_part` ({self.rows_per_part}) must be >= `cache.batch_size` "
                f"({self.batch_size})"
            )
        shards, index = self.num_shards, self.shard_index
        if shards is not None and index is not None and index >= shards:
            raise ConfigError(f"`cache.shard_index` {index} must be < `cache.num_shards` {shards}")


@dataclass(kw_only=True)
class DistillConfig:
    """`distill` and `distill-ce`: students trained on the ensemble's soft targets, and their
    label-only twins, with every setting but the loss shared."""

    mode: Literal["cached", "online"] = "cached"
    """cached: soft targets from the cache; online: the teachers run every step."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="cifar_resnet20"))
    """The student network."""
    kd: KDConfig = field(default_factory=KDConfig)
    """The distillation loss (`kd.loss`) and its settings."""
    compare: list[LossName] = field(default_factory=list)
    """Other losses, each trained for every seed like the KD students (the same cache, views,
    schedule and seeds; each with its settings from `kd`), in `distill-loss/<loss>-seed<N>/`:
    the report compares each with the CE students and with `kd.loss`, pair by pair."""
    seeds: Annotated[list[int] | None, Range(ge=0)] = None
    """One CE and one KD student per seed (initialisation, batch order, choice among the cached
    views), all against the one cache; default [run.seed]. The report gives every seed, the
    mean and the spread."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Schedule, batch and checkpoints of the students."""

    def __post_init__(self) -> None:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"`distill.seeds` must be distinct seeds, got {self.seeds}")
        if self.kd.loss in self.compare or len(set(self.compare)) != len(self.compare):
            raise ConfigError(
                f"`distill.compare` lists other losses than `distill.kd.loss` "
                f"({self.kd.loss}), each once; got {self.compare}"
            )
