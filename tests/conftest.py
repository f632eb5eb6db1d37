"""Shared test fixtures: small real data on disk, the session's tiny teachers and reference
cache (`tests/artifacts.py`), the command-line runners (`tests/cli.py`), and how pytest-xdist
hands tests to its workers."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.files import PREDICTIONS_FILE
from tests.artifacts import (
    build_reference_cache,
    build_teachers,
    built_once,
    cdir,
    teacher_paths,
)
from tests.cli import PY, ROOT, cli_command, cli_env, free_port, run_cli

__all__ = ["PY", "ROOT", "cli_command", "cli_env", "free_port", "run_cli"]

os.environ.setdefault("WANDB_MODE", "disabled")
# decoded-once datasets (common/data/decoded.py) go to a throwaway directory, not ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="kdslim-tests-")
# DeepSpeed JIT-compiles its CPU communication op on first use (~25 s): build it once per
# environment, not once per test session (torch's build lock serialises concurrent workers)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# Tests share 2 cores with the workers they fork: one thread each avoids oversubscription
# (10-20x slowdowns were measured with the default under load).
torch.set_num_threads(1)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist: one test at a time to whichever worker is free, except the SLURM tests,
    which all go to one worker: one local cluster per session (a session fixture), started
    once. (xdist's own `--dist loadgroup` marks tests by rewriting node ids, which pytest 9
    no longer reads; grouping by path needs no marker.)"""
    from xdist.scheduler import LoadScopeScheduling

    class OneSlurmWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if nodeid.startswith("tests/slurm/") else nodeid

    return OneSlurmWorker(config, log)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """One directory for the whole session, shared by every pytest-xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def teachers(shared_dir: Path) -> list[str]:
    """Two small random teachers, saved as `train` saves models (`tests/artifacts.py`)."""
    return teacher_paths(built_once(shared_dir, "teachers", build_teachers))


@pytest.fixture(scope="session")
def reference_cache(shared_dir: Path, teachers: list[str]) -> Path:
    """The single-process cache of `teachers` other caches are compared with (read-only)."""
    return cdir(built_once(shared_dir, "reference", build_reference_cache(teachers)))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def parquet_cifar(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 in the Hugging Face Parquet layout (img PNG bytes + label columns)."""
    import datasets

    root = tmp_path / "cifar10"
    root.mkdir()
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    for split, n, seed in (("train", 40, 0), ("test", 12, 1)):
        imgs = random_images(n, 32, seed)
        ds = datasets.Dataset.from_dict(
            {
                "img": [{"bytes": png_bytes(a), "path": None} for a in imgs],
                "label": [i % 10 for i in range(n)],
            },
            features=features,
        )
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """`root/{train,test}/<class>/*.png` with images of different sizes."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("test", 2)):
        for c in ("fire", "smoke", "clear"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(20, 60, size=2))
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                (d / f"{i:03d}.png").write_bytes(png_bytes(arr))
    return root


def interrupt(node_dir: Path, after_step: int) -> None:
    """Make a finished node look killed right after its checkpoint at `after_step`: no
    outputs, no key, no later checkpoints (what a kill leaves, without racing a real one)."""
    for name in ("model", "best", "metrics.json", "key.json", "config.yaml", PREDICTIONS_FILE):
        path = node_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for ckpt in (node_dir / "checkpoints").glob("ckpt-*"):
        if int(ckpt.name.removeprefix("ckpt-")) > after_step:
            shutil.rmtree(ckpt)
    assert (node_dir / "checkpoints" / f"ckpt-{after_step:09d}").is_dir()
