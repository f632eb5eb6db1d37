"""On-disk layout and identity of a logit cache.

    <root>/spec.json                      identity: data, views, teachers, storage (written first)
    <root>/shard-00000-of-00004/          a plain `datasets.load_from_disk` directory
    <root>/shard-00000-of-00004.json      its rows, range, file checksums and accuracy counts
    <root>/parts/shard-00000/part-00003/  resumable pieces of a shard still being written
    <root>/manifest.json                  spec + shards + accuracies, written once complete

Row r of the cache (shards concatenated in order) holds sample r // V, view r % V. The keys
are implied by that position, not stored (each shard's record gives its row range): a row is
only its soft target: `logits` [C] (full storage), `logits_q` [C] uint8 + `logits_lo` and
`logits_step` (int8 storage: C + 4 bytes), or `topk_idx` [k] + `topk_logp` [k] (top-k: the k
most probable classes and their log-probabilities; 40 bytes a top-10 view) and the row's
extras (`TOPK_EXTRAS`, one value each: 8 bytes in float16). Any reader
(`datasets.load_from_disk`) finds sample s, view v at row s * V + v.
Shards and inference batches are cut at multiples of `batch_size` rows, so a row's teacher
forward pass sees the same batch whatever the number of processes or array tasks, and a
2-process cache is bit-identical to a 1-process one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import CacheError, ConfigError

CACHE_FORMAT = 3
"""1: keys and targets; 2: + `logit_dtype`, and `layout` apart from the content identity;
3: keys implied by row position, top-k stored as log-probabilities. Top-k rows later gained
`TOPK_EXTRAS` within format 3: `storage.extras` says whether a cache holds them."""
SPEC_FILE, MANIFEST_FILE = "spec.json", "manifest.json"
TOPK_EXTRAS = ("target_logit", "lse", "mean", "std")
"""What a top-k row stores besides its k log-probabilities, all of the ensemble's target
logits z over all C classes at T = 1, in `logit_dtype`: the true class's logit z_y, the
log-sum-exp (the log-probabilities are z - lse), and the mean and (Bessel-corrected) std.
They make exact what a top-k row can make exact: DKD's target term at T = 1, and LS's
standardisation (`distill.losses.topk_target`). `storage.extras` in the manifest lists them;
a top-k cache from before they existed lacks the key and serves only the losses that need
none of them (`check_extras`)."""


def cache_identity(cfg, dataset, teachers: list[dict]) -> dict:
    """Everything that decides a cache's contents, and nothing that only decides how it was
    written (process count, shards, batch and part sizes: those are `layout`). A run may use
    a cache exactly when its request equals the cache's identity, whoever wrote it."""
    c = cfg.cache
    num_classes = dataset.source.num_classes
    if c.storage == "topk" and c.topk > num_classes:
        raise ConfigError(
            f"`cache.topk` {c.topk} is more than the {num_classes} classes of "
            f"`data.name` {cfg.data.name}: lower it (or use cache.storage=full)"
        )
    return {
        "format": CACHE_FORMAT,
        "dataset": dataset.source.fingerprint(),
        "views": {
            "count": c.views,
            "plain_first": c.plain_first,
            "recipe_sha256": dataset.recipe.fingerprint(),
            "seed": dataset.recipe.seed,
        },
        "teachers": teachers,
        "ensemble": c.ensemble,
        # keys only where set, so that caches made before they existed keep their identity
        **({"ensemble_weights": normalised(c.ensemble_weights)} if c.ensemble_weights else {}),
        "storage": {
            "mode": c.storage,
            "k": c.topk if c.storage == "topk" else None,
            "index_dtype": index_dtype(num_classes) if c.storage == "topk" else None,
            "per_teacher": c.per_teacher,
            "logit_dtype": c.logit_dtype,
            **({"extras": list(TOPK_EXTRAS)} if c.storage == "topk" else {}),
        },
        "num_classes": num_classes,
        "precision": cfg.run.mixed_precision,  # the teachers' autocast; verify re-scores so
        "dtype": cfg.run.dtype,  # the teachers' arithmetic (float64: the testing mode)
    }


def normalised(weights: list[float]) -> list[float]:
    """Per-teacher weights scaled to sum 1: [1, 2, 1] and [2, 4, 2] average alike, and a cache
    identity records them once."""
    total = math.fsum(weights)
    return [w / total for w in weights]


def identity_of(spec_or_manifest: dict) -> dict:
    """The identity part of a spec.json or manifest.json."""
    keys = ("format", "dataset", "views", "teachers", "ensemble", "storage", "num_classes")
    keys += ("precision", "dtype")
    out = {k: spec_or_manifest.get(k) for k in keys}
    if "ensemble_weights" in spec_or_manifest:  # recorded only where set (`cache_identity`)
        out["ensemble_weights"] = spec_or_manifest["ensemble_weights"]
    # the manifest adds each teacher's accuracy on the cached views: not part of the identity
    out["teachers"] = [
        {k: v for k, v in t.items() if k != "acc_on_cached_views"} for t in out["teachers"] or []
    ]
    return out


def identity_differences(manifest: dict, expected: dict) -> list[str]:
    """What differs between a cache's identity and a request, except the top-k extras a cache
    made before they existed lacks: that cache still serves every loss that needs none of
    them, and `check_extras` refuses it to the others."""
    found = identity_of(manifest)
    if "extras" not in (found["storage"] or {}):
        storage = {k: v for k, v in expected.get("storage", {}).items() if k != "extras"}
        expected = {**expected, "storage": storage}
    return describe_mismatch(found, expected)


def check_extras(root: Path, manifest: dict, needs: tuple[str, ...] | None) -> None:
    """Refuse a top-k cache to a loss that needs what its rows do not hold: the whole vector
    (`needs` None) or extras it was written without."""
    if manifest["storage"]["mode"] != "topk":
        return  # full and int8 rows hold the whole vector: every loss
    if needs is None:
        raise CacheError(
            f"{root} holds top-k rows, and this loss needs every class's logit: use a cache "
            f"with cache.storage full or int8, or another `kd.loss`"
        )
    missing = [n for n in needs if n not in manifest["storage"].get("extras", [])]
    if missing:
        raise CacheError(
            f"{root} holds top-k rows without {', '.join(missing)} (written before kdslim "
            f"stored them), which this `kd.loss` reads: write the cache again with `cache` "
            f"into a new directory (`cache.dir: auto` does; the old cache is left as it is), "
            f"or use `kd.loss: kd`"
        )


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
    """(sample_id, view_id) of rows lo..hi-1."""
    rows = np.arange(lo, hi, dtype=np.int64)
    return rows // views, rows % views


def check_format(root: Path, manifest: dict) -> None:
    """Refuse a cache this version cannot read, saying what to do."""
    found = manifest.get("format")
    if found != CACHE_FORMAT:
        raise CacheError(
            f"{root} is a format-{found} logit cache; this kdslim reads format {CACHE_FORMAT} "
            f"(rows keyed by position, top-k as log-probabilities: 40 bytes a top-10 view at "
            f"1,000 classes). Write the cache again with `cache` (`cache.dir: auto` puts it in "
            f"a new directory); the old one is left as it is."
        )


def index_dtype(num_classes: int) -> str:
    """Top-k class indices: int16 while the class count fits (FKD's fp16 indices break past
    2048 classes; int16 is exact to 32767)."""
    return "int16" if num_classes <= 32767 else "int32"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def mismatch(root: Path, what: str, diffs: list[str], fix: str) -> CacheError:
    """The error for a cache in `root` that is not the one asked for: the differences, listed,
    and what to do (never: move or rebuild the cache in place)."""
    return CacheError(f"{root} holds {what}:\n  " + "\n  ".join(diffs) + f"\n{fix}")


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
