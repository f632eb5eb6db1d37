"""Shared test fixtures: small real data on disk, a free port, a multi-process launcher."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

os.environ.setdefault("WANDB_MODE", "disabled")
# decoded-once datasets (common/data/decoded.py) go to a throwaway directory, not ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="kdslim-tests-")
# Tests share 2 cores with the subprocesses they start: one thread each avoids oversubscription
# (10-20x slowdowns were measured with the default under load).
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        GLOO_SOCKET_IFNAME="lo",
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def cli_command(*args: str, processes: int = 1) -> list[str]:
    """`python -m launch ...`, or the same under `accelerate launch` with N CPU processes."""
    if processes == 1:
        return [PY, "-m", "launch", *args]
    return [
        PY,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "launch",
        *args,
    ]


def run_cli(
    *args: str,
    processes: int = 1,
    timeout: float = 600,
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run `cli_command(*args, processes)` to completion; raise with its output on failure."""
    cmd = cli_command(*args, processes=processes)
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env or cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


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
    for name in ("model", "best", "metrics.json", "key.json", "config.yaml"):
        path = node_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for ckpt in (node_dir / "checkpoints").glob("ckpt-*"):
        if int(ckpt.name.removeprefix("ckpt-")) > after_step:
            shutil.rmtree(ckpt)
    assert (node_dir / "checkpoints" / f"ckpt-{after_step:09d}").is_dir()
