"""The names, hashes and manifests of the files kdslim writes.

Torch-free on purpose: the command line, the stage graph and the freshness checks name and
hash these files without paying for `import torch` (`kdslim --help` and `kdslim plan` start in
a fraction of a second); `common.checkpoint` writes and reads what they name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

MODEL_FILE, SPEC_FILE = "model.safetensors", "model.json"
MANIFEST_FILE = "manifest.json"
PREDICTIONS_FILE = "test_predictions.npz"
"""Beside a trained model: its prediction for every test image (`sample_id`, `label`,
`pred`), which paired comparisons over test images read (`common.stats`)."""
ENSEMBLE_PREDICTIONS = "ensemble_test_predictions.npz"
"""Beside a KD student: the teacher ensemble's prediction for every test image."""
UNPRUNED_EXPORT = "unpruned"
"""In an export after slimming: the unpruned student's formats, measured like the pruned one's."""
INT8_PREDICTIONS = "int8_test_predictions.npz"
"""In an export: the int8 model's prediction for every test image (the float ONNX model's are
in PREDICTIONS_FILE beside it), paired by test image with any other model's."""


def honour_umask(path: str | Path) -> None:
    """Give a file the permissions the user's umask asks for: the safetensors writer creates
    its files 0600, so colleagues on a shared file system could not read the models."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks; remembered per (inode, size,
    modification time), since freshness checks ask for the same teachers' hashes often."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and SHA-256 of every file under `directory`; written last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in files
    }
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=1))


def verify_manifest(directory: Path) -> str | None:
    """None when every file listed in the manifest is present and intact, else why not."""
    try:
        entries = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST_FILE}: {e}"
    for rel, want in entries.items():
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want["size"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {want['size']}"
        if file_sha256(p) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def save_predictions(path: Path, table: dict) -> None:
    """`table` ({"sample_id", "label", "pred"} arrays) as .npz, under a temporary name first."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **table)
    os.replace(tmp, path)


def load_predictions(path: Path) -> dict | None:
    """The table `save_predictions` wrote, or None when there is none (older runs)."""
    if not path.is_file():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
