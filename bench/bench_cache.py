"""Benchmark the logit cache: writer throughput against the bare ensemble forward pass, bytes
per view for full and top-k storage, and random-access read rate against a training step.

    python bench/bench_cache.py --data-root ../shared/data/cifar10 --samples 2048

All rates are measured in this one process, back to back, so their ratios hold even on a
shared, noisy machine; peak resident memory is reported next to each phase.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.config import DataConfig
from common.data import ViewDataset, build_splits
from common.data.sources import ImageSource, Stats
from common.data.views import ViewRecipe
from common.logging import NullLogger
from common.models import build_model
from distill.cache.layout import cache_identity
from distill.cache.reader import LogitCache
from distill.cache.writer import ShardWriter, build_spec, claim_spec, try_write_manifest
from distill.teachers import Ensemble
from launch.config import Config


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_ensemble(names: list[str], num_classes: int) -> Ensemble:
    torch.manual_seed(0)
    models = [build_model(n, num_classes) for n in names]
    return Ensemble(models, [{"spec": {"name": n}, "weights_sha256": None} for n in names], "probs")


def write_cache(
    root: Path, dataset, ensemble, views: int, storage: str, k: int, workers: int, batch: int
) -> float:
    cfg = Config()
    cfg.cache.views, cfg.cache.storage, cfg.cache.topk = views, storage, max(k, 1)
    cfg.cache.batch_size = batch
    spec = build_spec(cache_identity(cfg, dataset, ensemble.identities), cfg, 1, teachers=[])
    claim_spec(root, spec)
    cfg.data.num_workers = workers
    cpu = {"device": torch.device("cpu"), "autocast": torch.no_grad, "logger": NullLogger()}
    writer = ShardWriter.for_config(cfg, root, spec, dataset, ensemble, 1, **cpu)
    t0 = time.perf_counter()
    writer.write(0)
    try_write_manifest(root, writer.plan)
    return time.perf_counter() - t0


def bare_forward(dataset, ensemble, views: int, batch: int) -> float:
    """The same rows' forward passes on pre-rendered images: the cost caching cannot avoid."""
    keys = [(s, v) for s in range(len(dataset)) for v in range(views)]
    images = torch.stack([dataset[k]["image"] for k in keys])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            ensemble(images[i : i + batch])
    return time.perf_counter() - t0


def bytes_per_view(tmp: Path) -> dict:
    """Storage cost by class count: a synthetic source of 1x1 images keeps the forward free."""
    out = {}
    for classes in (10, 100, 1000):
        for storage, k in (("full", 0), ("topk", 10)):
            ds = _tiny_dataset(classes)
            ens = Ensemble(
                [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, classes))],
                [{"spec": {"name": "linear"}, "weights_sha256": None}],
                "probs",
            )
            root = tmp / f"bytes-{classes}-{storage}"
            write_cache(root, ds, ens, 1, storage, k, 0, 256)
            m = LogitCache(root).manifest
            out[f"{classes} classes, {storage}{' k=10' if k else ''}"] = m["bytes"] / m["num_rows"]
    return out


def _tiny_dataset(classes: int):
    class Tiny(ImageSource):
        def __init__(self):
            self.labels = np.arange(4096) % classes
            self.name, self.split, self.num_classes, self.native_size = "tiny", "train", classes, 1
            self.stats = Stats((0.5,) * 3, (0.5,) * 3)

        def image(self, sample_id: int) -> torch.Tensor:
            return torch.full((3, 1, 1), sample_id % 256, dtype=torch.uint8)

    src = Tiny()
    return ViewDataset(src, ViewRecipe(DataConfig(augment="none"), src, 0))


def read_rate(root: Path, batch: int, seconds: float = 5.0) -> float:
    cache = LogitCache(root)
    rng = np.random.default_rng(0)
    n, rows, t0 = 0, cache.num_rows, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        r = rng.integers(0, rows, size=batch)
        cache.rows(r // cache.views, r % cache.views)
        n += batch
    return n / (time.perf_counter() - t0)


def student_rate(dataset, name: str, batch: int, steps: int = 8) -> float:
    torch.manual_seed(0)
    model = build_model(name, dataset.source.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.stack([dataset[(i, 0)]["image"] for i in range(batch)])
    y = torch.tensor([dataset[(i, 0)]["label"] for i in range(batch)])
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--teachers", default="cifar_resnet56,cifar_resnet56")
    p.add_argument("--student", default="cifar_resnet20")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    cfg = DataConfig(name="cifar10", root=args.data_root, train_subset=args.samples)
    dataset = build_splits(cfg, seed=0).train
    ensemble = make_ensemble(args.teachers.split(","), 10)
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = args.samples * args.views
        bare = bare_forward(dataset, ensemble, args.views, args.batch)
        results["bare_forward_rows_per_s"] = rows / bare
        results["peak_mb_after_bare"] = peak_mb()
        cached = write_cache(
            tmp / "cache", dataset, ensemble, args.views, "full", 0, args.workers, args.batch
        )
        results["cache_rows_per_s"] = rows / cached
        results["cache_to_bare_throughput_ratio"] = bare / cached
        results["peak_mb_after_cache"] = peak_mb()
        results["bytes_per_view"] = bytes_per_view(tmp)
        results["random_read_rows_per_s"] = read_rate(tmp / "cache", 256)
        results["student_train_rows_per_s"] = student_rate(dataset, args.student, 128)
        results["read_to_train_ratio"] = (
            results["random_read_rows_per_s"] / results["student_train_rows_per_s"]
        )
        results["peak_mb"] = peak_mb()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
