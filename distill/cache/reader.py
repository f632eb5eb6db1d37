"""Read soft targets by (sample_id, view_id) from memory-mapped shards.

Opening checks the manifest against what the consumer is about to train on (dataset, view
recipe, view count, class count and, when it knows them, the teachers) and refuses a mismatch
with the list of differences, and checks that every shard file is there at its recorded size
and holds its recorded number of rows (a row's position is its key, so a shard of the wrong
length is refused before any row is used). Reads go through Arrow (`with_format("arrow")` +
`to_numpy`), which avoids the torch formatter's silent float16 -> float32 upcast of whole
columns and is about 2x faster; only the requested rows are converted.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from common.errors import CacheError
from distill.cache.layout import (
    MANIFEST_FILE,
    SPEC_FILE,
    check_extras,
    check_format,
    identity_differences,
    mismatch,
    read_json,
    shard_name,
)


class LogitCache:
    def __init__(
        self, root: str | Path, expect: dict | None = None, needs: tuple[str, ...] | None = ()
    ):
        """Open the cache in `root`; with `expect` (a request, `cache_identity`), refuse one
        made for other data, views, teachers or storage, listing the differences; refuse
        top-k rows that lack what the loss reads (`needs`: `DistillLoss.topk_extras`)."""
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_FILE
        if not manifest_path.is_file():
            if (self.root / SPEC_FILE).is_file():
                done = len(list(self.root.glob("shard-*.json")))
                raise CacheError(
                    f"the cache in {self.root} is incomplete ({done} shards finished, no "
                    f"manifest): run the same `cache` command again to finish it"
                )
            raise CacheError(f"no cache at {self.root} (no {MANIFEST_FILE}): run `cache` first")
        self.manifest = read_json(manifest_path)
        check_format(self.root, self.manifest)
        if expect is not None:
            diffs = identity_differences(self.manifest, expect)
            if diffs:
                raise mismatch(
                    self.root,
                    "a cache that does not match this run",
                    diffs,
                    "Run `cache` for this configuration (it writes to another directory "
                    "with `cache.dir: auto`), or point cache.dir at the matching cache.",
                )
        check_extras(self.root, self.manifest, needs)
        self.views = self.manifest["views"]["count"]
        self.num_classes = self.manifest["num_classes"]
        self.storage = self.manifest["storage"]["mode"]
        self.num_rows = self.manifest["num_rows"]
        self._ds = None

    def _dataset(self) -> datasets.Dataset:
        """Opened lazily so the object pickles cheaply into DataLoader workers."""
        if self._ds is None:
            shards = []
            for i, rec in enumerate(self.manifest["shards"]):
                path = self.root / shard_name(i, self.manifest["num_shards"])
                for f, meta in rec["files"].items():
                    if not (path / f).is_file() or (path / f).stat().st_size != meta["bytes"]:
                        raise CacheError(
                            f"cache shard file {path / f} is missing or truncated; "
                            f"run verify-cache, then rebuild the cache"
                        )
                shard = datasets.load_from_disk(str(path))
                if len(shard) != rec["num_rows"]:
                    raise CacheError(
                        f"cache shard {path} holds {len(shard)} rows, its record says "
                        f"{rec['num_rows']}: run verify-cache, then rebuild the cache"
                    )
                shards.append(shard)
            ds = datasets.concatenate_datasets(shards)
            if len(ds) != self.num_rows:
                raise CacheError(f"{self.root} holds {len(ds)} rows, manifest says {self.num_rows}")
            self._ds = ds.with_format("arrow")
        return self._ds

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}

    def rows(self, sample_ids: np.ndarray, view_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Soft targets for each (sample, view): `logits` [B, C] (full and int8 storage) or
        `topk_idx` [B, k], `topk_logp` [B, k] and each stored extra [B] (top-k storage, see
        `layout.TOPK_EXTRAS`), in at least float32."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        view_ids = np.asarray(view_ids, dtype=np.int64)
        if (view_ids < 0).any() or (view_ids >= self.views).any():
            raise CacheError(f"view ids must be in [0, {self.views}) for this cache")
        rows = sample_ids * self.views + view_ids
        if (sample_ids < 0).any() or (rows >= self.num_rows).any():
            raise CacheError(f"sample ids must be in [0, {self.num_rows // self.views})")
        table = self._dataset()[rows.tolist()]
        if self.storage == "int8":
            q = _column(table, "logits_q").float()
            step, lo = _column(table, "logits_step"), _column(table, "logits_lo")
            return {"logits": lo[:, None] + q * step[:, None]}
        if self.storage == "full":
            return {"logits": _column(table, "logits")}
        extras = self.manifest["storage"].get("extras", [])
        return {n: _column(table, n) for n in ["topk_idx", "topk_logp", *extras]}


def _column(table, name: str) -> torch.Tensor:
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        arr = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
    else:
        arr = col.to_numpy(zero_copy_only=False)
    if arr.dtype.kind == "f":  # float16 storage is promoted; float32/float64 kept as stored
        return torch.from_numpy(arr.astype(np.promote_types(arr.dtype, np.float32)))
    return torch.from_numpy(arr.astype(np.int64))
