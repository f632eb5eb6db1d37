"""What many tests read and none may change: two tiny teachers and their reference cache.

Built once per test session, even with several pytest-xdist workers (the first worker to ask
builds under a file lock into the session's shared directory; the others wait and reuse it),
and then read-only: a test that changes a cache works on a copy (`copy_of`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from common.checkpoint import model_spec, save_model
from common.models import build_model
from tests.cli import ROOT, run_cli

DATA = [
    "data.image_size=8",
    "data.pad=1",
    "data.hflip=false",
    "data.train_subset=150",
    "logging.progress=false",
]
N = 135
"""Training samples in DATA: 150, less the validation split's 10%."""


def cdir(out: Path) -> Path:
    """Where the `cache` stage of run `out` keeps the cache itself (its default)."""
    return out / "cache" / "data"


def cache_args(out: Path, teachers: list[str], *extra: str) -> list[str]:
    tlist = "[" + ",".join(f"{{path: {p}}}" for p in teachers) + "]"
    return [
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        f"run.out_dir={out}",
        *DATA,
        f"cache.teachers={tlist}",
        "cache.views=3",
        "cache.batch_size=32",
        "cache.rows_per_part=64",
        "cache.per_teacher=true",
        *extra,
    ]


def copy_of(reference_cache: Path, tmp_path: Path) -> Path:
    """A copy of the reference run's `cache` node (its stage directory, the cache inside):
    complete in the copy as in the original, since a node's key ignores `run.out_dir`."""
    shutil.copytree(reference_cache.parent, tmp_path / "cache")
    return tmp_path


def built_once(shared: Path, name: str, build: Callable[[Path], None]) -> Path:
    """`shared/name`, made by `build(directory)` unless a worker already made it; a directory
    is only ever seen complete (built under a temporary name, then renamed)."""
    done = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_dir():
            tmp = shared / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            build(tmp)
            tmp.rename(done)
    return done


def build_teachers(root: Path) -> None:
    """Two small teachers with fixed random weights (the cache cares about consistency, not
    accuracy), saved as `train` would save them."""
    for i, name in enumerate(["cifar_resnet20", "cifar_resnet20"]):
        torch.manual_seed(i)
        model = build_model(name, 10)
        save_model(root / f"t{i}", model.eval(), model_spec(name, 10))


def teacher_paths(root: Path) -> list[str]:
    return [str(root / f"t{i}") for i in range(2)]


def build_reference_cache(teachers: list[str]) -> Callable[[Path], None]:
    """One single-process cache of `teachers` that other runs are compared with."""

    def build(out: Path) -> None:
        run_cli("cache", *cache_args(out, teachers))

    return build
