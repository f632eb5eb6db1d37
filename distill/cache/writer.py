"""Score the teacher ensemble on every (sample, view) and write the soft targets to shards.

Each process (or SLURM array task) owns whole shards and writes them in parts under temporary
names; a part is renamed into place only when complete, so a killed job resumes at the first
missing part and never mistakes a half-written file for data. Padding rows a distributed
sampler would add never exist here: the row ranges are exact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from common.config import to_dict
from common.data import ViewDataset, make_loader
from common.files import file_sha256
from common.logging import NullLogger, write_json
from common.precision import memory_format
from distill.cache.layout import (
    MANIFEST_FILE,
    SPEC_FILE,
    ShardPlan,
    describe_mismatch,
    mismatch,
    read_json,
    row_keys,
    shard_name,
)
from distill.config import TeacherConfig
from distill.teachers import Ensemble

datasets.disable_progress_bars()


def build_spec(identity: dict, cfg, num_shards: int, teachers: list[TeacherConfig]) -> dict:
    """spec.json: the cache's identity, how it is being written, and where its data and
    teachers were read from (`source`, so that `verify-cache --cache DIR` can re-score rows
    with no configuration)."""
    c = cfg.cache
    layout = {"batch_size": c.batch_size, "rows_per_part": c.rows_per_part}
    data = to_dict(cfg.data)
    if data.get("root"):
        data["root"] = str(Path(data["root"]).resolve())
    source = {
        "data": data,
        "seed": cfg.run.seed,
        "teachers": [_absolute(to_dict(t)) for t in teachers],
    }
    return {**identity, "layout": {**layout, "num_shards": num_shards}, "source": source}


def _absolute(teacher: dict) -> dict:
    return {
        k: str(Path(v).resolve()) if k in ("path", "weights") and v else v
        for k, v in teacher.items()
    }


def claim_spec(root: Path, spec: dict) -> None:
    """Write spec.json, or check that an existing cache was started with the same spec (paths
    in `source` may differ: a cache may be finished from another checkout)."""
    path = root / SPEC_FILE
    if path.is_file():
        found = {k: v for k, v in read_json(path).items() if k != "source"}
        diffs = describe_mismatch(found, {k: v for k, v in spec.items() if k != "source"})
        if diffs:
            raise mismatch(
                root,
                "an unfinished cache started with another configuration",
                diffs,
                "Finish it with that configuration, or point cache.dir elsewhere (or "
                "`cache.dir: auto`); kdslim never moves or rebuilds a cache in place.",
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json(path, spec)


class ShardWriter:
    def __init__(
        self,
        *,
        root: Path,
        spec: dict,
        dataset: ViewDataset,
        ensemble: Ensemble,
        plan: ShardPlan,
        views: int,
        device: torch.device,
        autocast,
        num_workers: int,
        rows_per_part: int,
        logger: NullLogger,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        self.root, self.spec, self.dataset, self.ensemble = root, spec, dataset, ensemble
        self.plan, self.views, self.device, self.autocast = plan, views, device, autocast
        self.num_workers, self.log = num_workers, logger
        self.memory_format = memory_format  # the teachers' (run.channels_last)
        self.part_rows = max(plan.batch_size, rows_per_part // plan.batch_size * plan.batch_size)
        self.storage = spec["storage"]
        self.rows_written = 0  # by this process, in this run (resumed parts do not count)
        self.logit_dtype = np.dtype(self.storage["logit_dtype"])
        self.dtype = next(ensemble.parameters()).dtype

    @classmethod
    def for_config(
        cls, cfg, root, spec, dataset, ensemble, num_shards, *, device, autocast, logger
    ) -> ShardWriter:
        """The writer of `cfg.cache`'s request: rows = samples x views, cut into `num_shards`."""
        plan = ShardPlan(len(dataset) * cfg.cache.views, cfg.cache.batch_size, num_shards)
        return cls(
            root=root,
            spec=spec,
            dataset=dataset,
            ensemble=ensemble,
            plan=plan,
            views=cfg.cache.views,
            device=device,
            autocast=autocast,
            num_workers=cfg.data.num_workers,
            rows_per_part=cfg.cache.rows_per_part,
            logger=logger,
            memory_format=memory_format(cfg.run),
        )

    # -- one shard ------------------------------------------------------------------------------

    def write(self, index: int) -> dict:
        """Write shard `index` (resuming from complete parts); returns its record."""
        name = shard_name(index, self.plan.num_shards)
        record_path = self.root / f"{name}.json"
        if record_path.is_file():
            return read_json(record_path)
        lo, hi = self.plan.rows(index)
        parts_dir = self.root / "parts" / name
        starts = list(range(lo, hi, self.part_rows))
        bar = self.log.progress(hi - lo, f"cache {name}", unit="rows")
        stats: list[dict] = []
        for p, start in enumerate(starts):
            part = parts_dir / f"part-{p:05d}"
            end = min(start + self.part_rows, hi)
            if not (part / "stats.json").is_file():
                stats.append(self._write_part(part, start, end, bar))
            else:
                bar.update(end - start)
                stats.append(read_json(part / "stats.json"))
        bar.close()
        return self._finalise(
            index, name, lo, hi, [parts_dir / f"part-{p:05d}" for p in range(len(starts))], stats
        )

    def _write_part(self, part: Path, start: int, end: int, bar) -> dict:
        """Write one part; returns the stats it recorded in its stats.json."""
        sample_ids, view_ids = row_keys(start, end, self.views)
        keys = list(zip(sample_ids.tolist(), view_ids.tolist()))
        bs = self.plan.batch_size
        batches = [keys[i : i + bs] for i in range(0, len(keys), bs)]
        # each column's buffer for the whole part, allocated once and filled batch by batch:
        # collecting per-batch arrays instead interleaves small long-lived allocations with
        # the batch's large temporaries, and glibc's heap then grows by ~3.5 kB a row (2.3 GB
        # for a part of 262,144 ImageNet rows; BENCHMARKS.md, cache at ImageNet scale)
        columns: dict[str, np.ndarray] = {}
        filled = 0
        counts = np.zeros(len(self.ensemble.teachers) + 2, dtype=np.int64)
        with torch.inference_mode():
            for batch in make_loader(self.dataset, batches, self.num_workers):
                images = batch["image"].to(self.device, self.dtype, non_blocking=True)
                images = images.contiguous(memory_format=self.memory_format)
                with self.autocast():
                    target, per = self.ensemble(images)
                target, per = target.cpu(), per.cpu()
                labels = batch["label"]
                counts[:-2] += (per.argmax(-1) == labels).sum(1).numpy()
                counts[-2] += int((target.argmax(-1) == labels).sum())
                counts[-1] += len(labels)
                for k, v in self._encode(target, per, labels).items():
                    if k not in columns:
                        columns[k] = np.empty((end - start, *v.shape[1:]), v.dtype)
                    columns[k][filled : filled + len(v)] = v
                filled += len(labels)
                bar.update(len(labels))
        table = pa.table({k: _arrow(v) for k, v in columns.items()})
        tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset(table).save_to_disk(str(tmp))
        n = len(self.ensemble.teachers)
        stats = {
            "rows": end - start,
            "teacher_correct": counts[:n].tolist(),
            "ensemble_correct": int(counts[n]),
            "count": int(counts[n + 1]),
        }
        write_json(tmp / "stats.json", stats)
        part.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, part)
        self.rows_written += end - start
        return stats

    def _encode(
        self, target: torch.Tensor, per: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """One batch's columns ([B] or [B, K] arrays). No keys: a row's position is its key
        (see layout)."""
        cols = {}
        if self.storage["mode"] == "full":
            cols["logits"] = self._floats(target)
        elif self.storage["mode"] == "int8":
            cols.update(quantize(target))
        else:
            # log-probabilities: the softmax at any temperature ignores the logsumexp, and
            # the tail's mass at T = 1 is what the k values leave of 1
            logp, idx = torch.log_softmax(target, -1).topk(self.storage["k"], dim=-1)
            cols["topk_idx"] = idx.numpy().astype(self.storage["index_dtype"])
            cols["topk_logp"] = self._floats(logp)
            cols.update({k: self._floats(v) for k, v in topk_extras(target, labels).items()})
        if self.storage["per_teacher"]:
            for t in range(per.shape[0]):
                cols[f"t{t}_logits"] = self._floats(per[t])
        return cols

    def _floats(self, values: torch.Tensor) -> np.ndarray:
        """[B, K] values in `cache.logit_dtype`."""
        return values.numpy().astype(self.logit_dtype)

    def _finalise(self, index, name, lo, hi, parts: list[Path], stats: list[dict]) -> dict:
        final = self.root / name
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a previous finalise killed before its record
        merged = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in parts])
        merged.save_to_disk(str(tmp))
        os.replace(tmp, final)
        files = sorted(p.name for p in final.glob("*.arrow"))
        n = len(self.ensemble.teachers)
        record = {
            "name": name,
            "index": index,
            "rows": [lo, hi],
            "num_rows": hi - lo,
            "files": {
                f: {"sha256": file_sha256(final / f), "bytes": (final / f).stat().st_size}
                for f in files
            },
            "teacher_correct": [sum(s["teacher_correct"][t] for s in stats) for t in range(n)],
            "ensemble_correct": sum(s["ensemble_correct"] for s in stats),
            "count": sum(s["count"] for s in stats),
        }
        write_json(self.root / f"{name}.json", record)  # the completion marker, written last
        shutil.rmtree(self.root / "parts" / name, ignore_errors=True)
        return record


def try_write_manifest(root: Path, plan: ShardPlan) -> dict | None:
    """Once every shard has its record, write the manifest (idempotent: any process that sees
    the last shard finish may do it, with identical content)."""
    records = []
    for i in range(plan.num_shards):
        path = root / f"{shard_name(i, plan.num_shards)}.json"
        if not path.is_file():
            return None
        records.append(read_json(path))
    spec = read_json(root / SPEC_FILE)
    count = sum(r["count"] for r in records)
    teachers = []
    for t, ident in enumerate(spec["teachers"]):
        correct = sum(r["teacher_correct"][t] for r in records)
        teachers.append({**ident, "acc_on_cached_views": correct / max(count, 1)})
    manifest = {
        **spec,
        "teachers": teachers,
        "ensemble_acc_on_cached_views": sum(r["ensemble_correct"] for r in records) / max(count, 1),
        "num_rows": plan.num_rows,
        "num_shards": plan.num_shards,
        "shards": records,
        "bytes": sum(f["bytes"] for r in records for f in r["files"].values()),
        "code_version": code_version(),
    }
    write_json(root / MANIFEST_FILE, manifest)
    shutil.rmtree(root / "parts", ignore_errors=True)
    return manifest


def code_version() -> str:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        rev = out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        rev = "unknown"
    return f"kdslim-0.1.0+{rev}"


def topk_extras(target: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`layout.TOPK_EXTRAS` [B] of ensemble target logits [B, C] over all C classes, from the
    unrounded logits (see layout; the std is Bessel-corrected, as LS standardises)."""
    return {
        "target_logit": target.gather(1, labels.long()[:, None])[:, 0],
        "lse": torch.logsumexp(target, -1),
        "mean": target.mean(-1),
        "std": target.std(-1),
    }


def quantize(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Each row's logits as uint8 steps of its own range: `logits_q` [C] and float16
    `logits_lo`, `logits_step` (the row is lo + q * step, within half a step of the logits).
    Both are rounded to float16 before the steps are taken, so the reader's lo + q * step is
    exactly what the writer aimed at."""
    x = logits.double()
    lo = x.min(-1, keepdim=True).values.half()
    step = ((x.max(-1, keepdim=True).values - lo.double()) / 255).clamp(min=1e-4).half()
    q = torch.round((x - lo.double()) / step.double()).clamp_(0, 255).to(torch.uint8)
    return {
        "logits_q": q.numpy(),
        "logits_lo": lo[:, 0].numpy(),
        "logits_step": step[:, 0].numpy(),
    }


def _arrow(arr: np.ndarray) -> pa.Array:
    """A [N] array as a plain column, a [N, K] one as a fixed-size list column of K."""
    flat = pa.array(arr.reshape(-1), pa.from_numpy_dtype(arr.dtype))
    return flat if arr.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
