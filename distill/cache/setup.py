"""What the cache, verify-cache and distill stages derive alike from one run configuration."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from common.config import ConfigError
from common.data import build_splits
from distill.cache.layout import cache_identity
from distill.config import TeacherConfig
from distill.teachers import teacher_identity


def teacher_configs(cfg, trained: list[Path]) -> list[TeacherConfig]:
    """`cache.teachers` when the configuration names them, else the model directories of the
    ensemble this run trained (`trained`, from the stage graph)."""
    if cfg.cache.teachers:
        return cfg.cache.teachers
    if not trained:
        raise ConfigError("no teachers: list model directories in `cache.teachers`")
    return [TeacherConfig(path=str(p)) for p in trained]


def request(cfg, teachers: list[TeacherConfig]) -> dict:
    """The identity of the cache this configuration asks for (see `cache_identity`)."""
    dataset = cached_splits(cfg).train
    idents = [teacher_identity(t, dataset.source.num_classes) for t in teachers]
    return cache_identity(cfg, dataset, idents)


def cache_root(cfg, teachers: list[TeacherConfig]) -> Path:
    """Where the cache lives: `cache.dir`; None: `<run.out_dir>/cache/data`; `auto`: a
    directory named by the hash of the request under `cache.root`, so equal requests share
    one cache whichever run makes it first."""
    c = cfg.cache
    if c.dir is None:
        return Path(cfg.run.out_dir) / "cache" / "data"
    if c.dir == "auto":
        text = json.dumps(request(cfg, teachers), sort_keys=True, default=str)
        return Path(c.root) / hashlib.sha256(text.encode()).hexdigest()[:16]
    return Path(c.dir)


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
