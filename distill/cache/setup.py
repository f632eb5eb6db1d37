"""What the cache, verify-cache and distill stages derive alike from one run configuration."""

from __future__ import annotations

import os
from pathlib import Path

from common.config import ConfigError
from common.data import build_splits
from distill.config import TeacherConfig


def cache_root(cfg) -> Path:
    return Path(cfg.cache.dir or Path(cfg.run.out_dir) / "cache")


def teacher_configs(cfg) -> list[TeacherConfig]:
    """cache.teachers, or by default the model the `train` stage of this run produced."""
    if cfg.cache.teachers:
        return cfg.cache.teachers
    default = Path(cfg.run.out_dir) / "train" / "model"
    if not default.is_dir():
        raise ConfigError(
            f"cache.teachers is empty and there is no trained model at {default}: list the "
            f"teacher model directories in cache.teachers (or run `train` first)"
        )
    return [TeacherConfig(path=str(default))]


def cached_splits(cfg):
    """Train/test datasets whose views match what the cache stores."""
    return build_splits(cfg.data, cfg.run.seed, plain_view_zero=cfg.cache.plain_first)


def shard_assignment(cfg, rank: int, world: int) -> tuple[int, list[int]]:
    """(number of shards, the shards this process writes).

    A SLURM array task writes shard SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of
    SLURM_ARRAY_TASK_COUNT; otherwise the processes of one launch share the shards round-robin.
    """
    c = cfg.cache
    env = os.environ
    count = c.num_shards or (
        int(env["SLURM_ARRAY_TASK_COUNT"]) if "SLURM_ARRAY_TASK_COUNT" in env else world
    )
    index = c.shard_index
    if index is None and "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if index is not None:
        if world != 1:
            raise ConfigError(
                "cache.shard_index (or a SLURM array task) runs one process; "
                "launch it without accelerate's multi-process flags"
            )
        if not 0 <= index < count:
            raise ConfigError(
                f"cache.shard_index {index} is outside 0..{count - 1} (cache.num_shards={count})"
            )
        return count, [index]
    return count, list(range(rank, count, world))
