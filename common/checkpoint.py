"""Weights and resumable training state, written atomically and loaded without pickle.

Two artifacts:
- a *model*: `model.safetensors` + `model.json` (the architecture spec: registry name, class
  count, factory kwargs and, for pruned models, the per-layer widths), rebuildable with
  `load_model(dir)` and nothing else: no pickled modules, no original model needed;
- a *checkpoint*: `ckpt-<step>/` with the model, optimizer state (`torch.save`, read back with
  `weights_only=True`), RNG state, the trainer's counters as JSON and, where the loop keeps
  one, the weight average (safetensors). Under DeepSpeed ZeRO the
  optimizer state is partitioned over ranks: it is written by DeepSpeed's own
  `engine.save_checkpoint` into `ckpt-<step>/deepspeed/` (one shard per rank, loaded back by
  `engine.load_checkpoint`, which unpickles: DeepSpeed offers no weights-only path); the
  safetensors model, RNG state and counters are ours as everywhere else.

We do not use `accelerator.save_state`: accelerate 1.15 reads custom objects and RNG state back
with `weights_only=False` (arbitrary pickle). Every directory is written under a temporary name
and renamed when complete, so a job killed mid-write never leaves a checkpoint that looks valid.
A checkpoint's last file is `manifest.json` (size and SHA-256 of every other file): a directory
without it is incomplete, and one whose files no longer match it (truncated by a full disk, a
half-synced copy, a crash of the file system rather than of the job) is skipped on resume with
a warning, falling back to the next older checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import ModelFileError
from common.files import (
    MANIFEST_FILE,
    MODEL_FILE,
    SPEC_FILE,
    honour_umask,
    verify_manifest,
    write_manifest,
)
from common.models import build_model
from common.models.fold import restructure
from common.precision import match_state_precision

_CKPT_PREFIX = "ckpt-"
SHARDED_DIR = "deepspeed"
AVERAGE_FILE = "average.safetensors"
"""The weight average (`loop.ema_decay`) inside a ckpt dir, when the loop keeps one."""
"""DeepSpeed engine checkpoint inside a ckpt dir (ZeRO optimizer shards, one file per rank)."""


def model_spec(name: str, num_classes: int, kwargs: dict | None = None, widths=None) -> dict:
    """Everything `build_model` needs to rebuild the architecture."""
    return {
        "name": name,
        "num_classes": num_classes,
        "kwargs": dict(kwargs or {}),
        "widths": widths,
    }


def build_from_spec(spec: dict) -> nn.Module:
    """The architecture `spec` describes; `folded_bn` (export's deployment model) lists the
    (conv, bn) pairs whose BN lives in the conv's weights."""
    model = build_model(
        spec["name"], spec["num_classes"], widths=spec.get("widths"), **spec.get("kwargs", {})
    )
    if spec.get("folded_bn"):
        restructure(model, [tuple(p) for p in spec["folded_bn"]])
    return model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone to contiguous, detached CPU tensors.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def atomic_dir(final: Path) -> Path:
    """A fresh temp dir next to `final` (`.<name>.tmp-<pid>`); `commit_dir` renames it."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` (if any) with the finished temp dir `tmp`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_model_files(directory: Path, model: nn.Module, spec: dict) -> None:
    save_file(_plain_state(model), str(directory / MODEL_FILE))
    honour_umask(directory / MODEL_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1))


def save_model(directory: str | Path, model: nn.Module, spec: dict) -> Path:
    """Write weights + spec into `directory` atomically."""
    final = Path(directory)
    tmp = atomic_dir(final)
    write_model_files(tmp, model, spec)
    commit_dir(tmp, final)
    return final


def read_spec(directory: str | Path) -> dict:
    """The architecture spec of a saved model (`model.json`), or a ModelFileError."""
    d = Path(directory)
    if not (d / SPEC_FILE).is_file() or not (d / MODEL_FILE).is_file():
        raise ModelFileError(
            f"{d} is not a saved model: it needs {MODEL_FILE} and {SPEC_FILE} "
            f"(written by the train, distill, prune and finetune stages)"
        )
    try:
        spec = json.loads((d / SPEC_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read {d / SPEC_FILE}: {e}") from None
    if not isinstance(spec, dict) or not {"name", "num_classes"} <= set(spec):
        raise ModelFileError(f"{d / SPEC_FILE} is not a kdslim model spec")
    return spec


def load_model(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model from `save_model` output. A missing, truncated or foreign file is a
    ModelFileError that names it (never a library traceback)."""
    d = Path(directory)
    spec = read_spec(d)
    model = build_from_spec(spec)
    try:
        state = load_file(str(d / MODEL_FILE))
        match_state_precision(model, state).load_state_dict(state)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelFileError(
            f"cannot load {d / MODEL_FILE} ({first}): the file is truncated, damaged or "
            f"does not belong to {d / SPEC_FILE}; re-create it with the stage that wrote it"
        ) from None
    return model, spec


class CheckpointManager:
    """Keeps the newest `keep` resumable checkpoints of one stage; only rank 0 writes."""

    def __init__(self, root: str | Path, keep: int, is_main: bool):
        self.root, self.keep, self.is_main = Path(root), max(1, keep), is_main

    def complete(self) -> list[Path]:
        """Checkpoint dirs with a manifest, oldest first (files not verified)."""
        if not self.root.is_dir():
            return []
        # Temp dirs start with "." and never match; the manifest is the completion marker.
        found = [
            p
            for p in self.root.iterdir()
            if p.name.startswith(_CKPT_PREFIX)
            and p.name[len(_CKPT_PREFIX) :].isdigit()
            and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=lambda p: int(p.name[len(_CKPT_PREFIX) :]))

    def latest(self) -> Path | None:
        """The newest checkpoint whose files match its manifest (corrupt ones are skipped)."""
        for path in reversed(self.complete()):
            problem = verify_manifest(path)
            if problem is None:
                return path
            warnings.warn(
                f"ignoring corrupt checkpoint {path}: {problem}; trying an older one",
                stacklevel=2,
            )
        return None

    def save(
        self,
        step: int,
        model: nn.Module,
        spec: dict,
        optimizer,
        state: dict,
        *,
        sharded: Callable[[Path], None] | None = None,
        barrier: Callable[[], None] | None = None,
        average: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Rank 0 writes the checkpoint. With `sharded` (DeepSpeed ZeRO, whose optimizer state
        is partitioned over ranks) EVERY rank must call this: each runs `sharded(dir)` into one
        shared temp dir (a file system all nodes see), then rank 0 adds the rest, the manifest
        and renames; `optimizer` is then None (its state lives in the shards). `average`: the
        weight average's state (`common.ema`), kept beside the weights."""
        final = self.root / f"{_CKPT_PREFIX}{step:09d}"
        if sharded is None:
            if not self.is_main:
                return
            tmp = atomic_dir(final)
        else:
            assert barrier is not None, "a sharded checkpoint needs a barrier"
            tmp = final.with_name(f".{final.name}.tmp-sharded")
            if self.is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            barrier()
            sharded(tmp / SHARDED_DIR)
            barrier()
            if not self.is_main:
                return
        write_model_files(tmp, model, spec)
        torch.save(
            {
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "torch_rng": torch.get_rng_state(),
            },
            tmp / "optim.pt",
        )
        if average is not None:
            save_file(average, str(tmp / AVERAGE_FILE))
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        # Written last: its presence marks the directory complete even before the rename.
        write_manifest(tmp)
        commit_dir(tmp, final)
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        # temp dirs of writers that were killed mid-write (other pids)
        for stale in self.root.glob(f".{_CKPT_PREFIX}*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        return {
            "model": load_file(str(path / MODEL_FILE)),
            "optimizer": blob["optimizer"],
            "torch_rng": blob["torch_rng"],
            "state": json.loads((path / "trainer_state.json").read_text()),
            "average": load_file(str(path / AVERAGE_FILE))
            if (path / AVERAGE_FILE).is_file()
            else None,
        }
