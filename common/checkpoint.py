"""Weights and resumable training state, written atomically and loaded without pickle.

Two artifacts:
- a *model*: `model.safetensors` + `model.json` (the architecture spec: registry name, class
  count, factory kwargs and, for pruned models, the per-layer widths), rebuildable with
  `load_model(dir)` and nothing else: no pickled modules, no original model needed;
- a *checkpoint*: `ckpt-<step>/` with the model, optimizer state (`torch.save`, read back with
  `weights_only=True`), RNG state and the trainer's counters as JSON.

We do not use `accelerator.save_state`: accelerate 1.15 reads custom objects and RNG state back
with `weights_only=False` (arbitrary pickle). Every directory is written under a temporary name
and renamed when complete, so a job killed mid-write never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.models import build_model

MODEL_FILE, SPEC_FILE = "model.safetensors", "model.json"
_CKPT_PREFIX = "ckpt-"


def model_spec(name: str, num_classes: int, kwargs: dict | None = None, widths=None) -> dict:
    """Everything `build_model` needs to rebuild the architecture."""
    return {
        "name": name,
        "num_classes": num_classes,
        "kwargs": dict(kwargs or {}),
        "widths": widths,
    }


def build_from_spec(spec: dict) -> nn.Module:
    return build_model(
        spec["name"], spec["num_classes"], widths=spec.get("widths"), **spec.get("kwargs", {})
    )


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone to contiguous, detached CPU tensors.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_model_files(directory: Path, model: nn.Module, spec: dict) -> None:
    save_file(_plain_state(model), str(directory / MODEL_FILE))
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1))


def save_model(directory: str | Path, model: nn.Module, spec: dict) -> Path:
    """Write weights + spec into `directory` atomically."""
    final = Path(directory)
    tmp = _atomic_dir(final)
    write_model_files(tmp, model, spec)
    _commit_dir(tmp, final)
    return final


def load_model(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model from `save_model` output."""
    d = Path(directory)
    if not (d / SPEC_FILE).is_file() or not (d / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{d} is not a saved model: it needs {MODEL_FILE} and {SPEC_FILE} "
            f"(written by the train, distill, prune and finetune stages)"
        )
    spec = json.loads((d / SPEC_FILE).read_text())
    model = build_from_spec(spec)
    model.load_state_dict(load_file(str(d / MODEL_FILE)))
    return model, spec


class CheckpointManager:
    """Keeps the newest `keep` resumable checkpoints of one stage; only rank 0 writes."""

    def __init__(self, root: str | Path, keep: int, is_main: bool):
        self.root, self.keep, self.is_main = Path(root), max(1, keep), is_main

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.name.startswith(_CKPT_PREFIX) and (p / "trainer_state.json").is_file()
        ]
        return sorted(found, key=lambda p: int(p.name[len(_CKPT_PREFIX) :]))

    def latest(self) -> Path | None:
        done = self._complete()
        return done[-1] if done else None

    def save(self, step: int, model: nn.Module, spec: dict, optimizer, state: dict) -> None:
        if not self.is_main:
            return
        final = self.root / f"{_CKPT_PREFIX}{step:09d}"
        tmp = _atomic_dir(final)
        write_model_files(tmp, model, spec)
        torch.save(
            {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
            tmp / "optim.pt",
        )
        # Written last: its presence marks the directory complete even before the rename.
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        _commit_dir(tmp, final)
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        return {
            "model": load_file(str(path / MODEL_FILE)),
            "optimizer": blob["optimizer"],
            "torch_rng": blob["torch_rng"],
            "state": json.loads((path / "trainer_state.json").read_text()),
        }
