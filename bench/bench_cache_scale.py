"""An ImageNet-shaped logit cache on this machine: 1.28M samples x 10 views x 1,000 classes.

    python bench/bench_cache_scale.py --out /tmp/scale          # the full shape (~15 min, 0.5 GB)
    python bench/bench_cache_scale.py --out /tmp/s --samples 20000   # a quick look

The cache is written the way a SLURM job array writes it: one process per shard, started with
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT set (`--parallel` at a time), each running the
real `ShardWriter` (loader, teacher forward, log-softmax and top-k, Arrow parts, merge,
checksums) and the last one writing the manifest. The teacher and the views are stand-ins so
that the benchmark measures the cache itself: a fixed linear map to 1,000 classes of a 1x1
"view" computed for a whole batch at once from (sample_id, view_id). A real cache adds the
teachers' forward pass and the images' decoding, which are the same per row whatever the
storage. Then `verify-cache`'s checks on the directory alone
(streamed checksums, row counts, the recorded source) and random batches read through
`LogitCache.rows`. Reported: bytes, write rows/s, per-task time and peak memory, verify time,
read rows/s, and the same extrapolated to 100 views.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.config import DataConfig
from common.data import ViewDataset
from common.data.sources import ImageSource, Stats
from common.data.views import ViewRecipe
from common.logging import NullLogger
from distill.cache.layout import MANIFEST_FILE, ShardPlan, cache_identity
from distill.cache.reader import LogitCache
from distill.cache.setup import shard_assignment
from distill.cache.verify import check_files_and_keys
from distill.cache.writer import ShardWriter, build_spec, claim_spec, try_write_manifest
from distill.teachers import Ensemble
from launch.config import Config

CLASSES = 1000


class StandIn(ImageSource):
    """`n` samples of 1x1 pixels that differ by sample id, labels id % 1000."""

    def __init__(self, n: int):
        self.labels = np.arange(n) % CLASSES
        self.name, self.split, self.num_classes, self.native_size = "standin", "train", CLASSES, 1
        self.stats = Stats((0.5,) * 3, (0.25,) * 3)

    def image(self, sample_id: int) -> torch.Tensor:
        return pixels(np.array([sample_id]), np.array([0]))[0]


def pixels(sample_ids: np.ndarray, view_ids: np.ndarray) -> torch.Tensor:
    """[B, 3, 1, 1] float views: three hashed bytes of the sample, shifted by the view."""
    h = (sample_ids.astype(np.int64) * 2654435761 + view_ids * 40503) & 0xFFFFFF
    rgb = np.stack([h & 255, (h >> 8) & 255, h >> 16], 1).astype(np.float32) / 255.0
    return torch.from_numpy(rgb - 0.5).view(-1, 3, 1, 1)


class StandInViews(ViewDataset):
    """A batch of views in one vectorised step (the loader calls `__getitems__`)."""

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        sids = np.fromiter((k[0] for k in keys), np.int64, len(keys))
        vids = np.fromiter((k[1] for k in keys), np.int64, len(keys))
        images = pixels(sids, vids).unbind(0)
        labels = self.source.labels[sids].tolist()
        return [
            {"image": x, "label": y, "sample_id": s, "view_id": v}
            for x, y, s, v in zip(images, labels, sids.tolist(), vids.tolist())
        ]


def config(views: int, shards: int) -> Config:
    cfg = Config()
    cfg.data.augment, cfg.data.num_workers = "none", 0
    cfg.cache.views, cfg.cache.storage, cfg.cache.topk = views, "topk", 10
    cfg.cache.batch_size, cfg.cache.rows_per_part, cfg.cache.num_shards = 4096, 262144, shards
    return cfg


def parts(n: int):
    source = StandIn(n)
    dataset = StandInViews(source, ViewRecipe(DataConfig(augment="none"), source, 0))
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, CLASSES))
    with torch.no_grad():
        teacher[1].weight.mul_(20)  # peaked soft targets, as a trained teacher's
    return dataset, Ensemble(
        [teacher], [{"spec": {"name": "standin"}, "weights_sha256": None}], "probs"
    )


def task(root: Path, n: int, views: int, shards: int) -> None:
    """One array task: the shard SLURM_ARRAY_TASK_ID names, through the product's code."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cfg = config(views, shards)
    dataset, ensemble = parts(n)
    spec = build_spec(cache_identity(cfg, dataset, ensemble.identities), cfg, shards, [])
    claim_spec(root, spec)
    _, [index] = shard_assignment(cfg, 0, 1)
    cpu = {"device": torch.device("cpu"), "autocast": torch.no_grad, "logger": NullLogger()}
    writer = ShardWriter.for_config(cfg, root, spec, dataset, ensemble, shards, **cpu)
    writer.write(index)
    try_write_manifest(root, writer.plan)
    print(json.dumps({"shard": index, "seconds": time.perf_counter() - t0, "peak_mb": peak_mb()}))


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def run_array(root: Path, n: int, views: int, shards: int, parallel: int) -> list[dict]:
    env = {**os.environ, "SLURM_ARRAY_TASK_COUNT": str(shards), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--task", "--out", str(root), "--samples", str(n)]
    cmd += ["--views", str(views), "--shards", str(shards)]
    running, results, pending = [], [], list(range(shards))
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop(0)
            e = {**env, "SLURM_ARRAY_TASK_ID": str(i)}
            running.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, text=True))
        proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"array task failed: {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def read_rate(root: Path, batch: int = 256, seconds: float = 10.0) -> float:
    cache = LogitCache(root)
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        r = rng.integers(0, cache.num_rows, size=batch)
        cache.rows(r // cache.views, r % cache.views)
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="cache directory (replaced)")
    p.add_argument("--samples", type=int, default=1_281_167)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--parallel", type=int, default=2, help="array tasks running at once")
    p.add_argument("--task", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    root = Path(args.out)
    if args.task:
        return task(root, args.samples, args.views, args.shards)
    shutil.rmtree(root, ignore_errors=True)
    rows = args.samples * args.views
    t0 = time.perf_counter()
    tasks = run_array(root, args.samples, args.views, args.shards, args.parallel)
    write_s = time.perf_counter() - t0
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    t1 = time.perf_counter()
    check_files_and_keys(LogitCache(root))
    verify_s = time.perf_counter() - t1
    out = {
        "args": vars(args),
        "rows": rows,
        "bytes": manifest["bytes"],
        "bytes_per_view": manifest["bytes"] / rows,
        "write_seconds": write_s,
        "write_rows_per_s": rows / write_s,
        "task_seconds_max": max(t["seconds"] for t in tasks),
        "task_peak_mb_max": max(t["peak_mb"] for t in tasks),
        "verify_seconds": verify_s,
        "verify_mb_per_s": manifest["bytes"] / 1e6 / verify_s,
        "random_read_rows_per_s": read_rate(root),
        "peak_mb_this_process": peak_mb(),
    }
    scale = 100 / args.views
    out["at_100_views"] = {
        "bytes": out["bytes"] * scale,
        "write_seconds_at_this_rate": write_s * scale,
        "verify_seconds": verify_s * scale,
    }
    plan = ShardPlan(rows, 4096, args.shards)
    out["rows_per_shard"] = plan.rows(0)[1] - plan.rows(0)[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
