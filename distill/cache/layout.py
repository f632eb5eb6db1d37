"""On-disk layout and identity of a logit cache.

    <root>/spec.json                      identity: data, views, teachers, storage (written first)
    <root>/shard-00000-of-00004/          a plain `datasets.load_from_disk` directory
    <root>/shard-00000-of-00004.json      its rows, range, file checksums and accuracy counts
    <root>/parts/shard-00000/part-00003/  resumable pieces of a shard still being written
    <root>/manifest.json                  spec + shards + accuracies, written once complete

Row r of the cache (shards concatenated in order) holds sample r // V, view r % V: sample-major
order makes lookup arithmetic, and every read checks the stored (sample_id, view_id) anyway.
Shards and inference batches are cut at multiples of `batch_size` rows, so a row's teacher
forward pass sees the same batch whatever the number of processes or array tasks, and a
2-process cache is bit-identical to a 1-process one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1
SPEC_FILE, MANIFEST_FILE = "spec.json", "manifest.json"


class CacheError(ValueError):
    """A cache that is missing, incomplete, corrupt, or made for other data or teachers."""


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


@dataclass(frozen=True)
class ShardPlan:
    """Which rows each shard holds: contiguous runs of whole inference batches."""

    num_rows: int
    batch_size: int
    num_shards: int

    def rows(self, index: int) -> tuple[int, int]:
        batches = -(-self.num_rows // self.batch_size)
        lo = batches * index // self.num_shards
        hi = batches * (index + 1) // self.num_shards
        return min(lo * self.batch_size, self.num_rows), min(hi * self.batch_size, self.num_rows)


def row_keys(lo: int, hi: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(lo, hi, dtype=np.int64)
    return rows // views, rows % views


def index_dtype(num_classes: int) -> str:
    """Top-k class indices: int16 while the class count fits (FKD's fp16 indices break past
    2048 classes; int16 is exact to 32767)."""
    return "int16" if num_classes <= 32767 else "int32"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def describe_mismatch(found: dict, expected: dict, prefix: str = "") -> list[str]:
    """Human-readable list of the keys whose values differ."""
    diffs = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_mismatch(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
            diffs += describe_mismatch(
                {f"[{i}]": x for i, x in enumerate(a)},
                {f"[{i}]": x for i, x in enumerate(b)},
                f"{prefix}{key}",
            )
        elif a != b:
            diffs.append(f"{prefix}{key}: cache has {_short(a)}, this run expects {_short(b)}")
    return diffs


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
