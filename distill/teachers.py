"""The teacher ensemble: frozen models in eval mode, combined into one soft target.

Teachers are plain modules, never wrapped for data parallelism (they have no gradients to
synchronise; wrapping them only costs memory and a broadcast). The same `Ensemble` serves the
offline cache writer, the cache verifier and online distillation, so the three cannot drift.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import load_model, model_spec, read_spec
from common.errors import ConfigError, ModelFileError
from common.files import MODEL_FILE, file_sha256
from common.models import build_model
from common.precision import at_least_float32
from distill.cache.layout import normalised
from distill.config import TeacherConfig


def combine(logits: torch.Tensor, mode: str, weights: list[float] | None = None) -> torch.Tensor:
    """Ensemble target as logits from per-teacher logits [T, B, C].

    probs: log of the mean probability (MEAL V2 averages in probability space); a valid logit
    vector whose softmax is the mean of the teachers' softmaxes. logits: the mean logit.
    `weights` (one per teacher, normalised here) make either mean a weighted one.
    """
    logits = at_least_float32(logits)
    if weights is not None:
        w = torch.tensor(normalised(weights), dtype=logits.dtype, device=logits.device)
        if mode == "logits":
            return torch.einsum("t,tbc->bc", w, logits)
        return torch.logsumexp(torch.log_softmax(logits, dim=-1) + w.log()[:, None, None], dim=0)
    if mode == "logits" or logits.shape[0] == 1:
        return logits.mean(0)
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


class Ensemble(nn.Module):
    def __init__(
        self,
        teachers: list[nn.Module],
        identities: list[dict],
        mode: str,
        weights: list[float] | None = None,
    ):
        super().__init__()
        if weights is not None and len(weights) != len(teachers):
            raise ConfigError(
                f"`cache.ensemble_weights` has {len(weights)} weights for {len(teachers)} "
                "teachers: give one per teacher"
            )
        self.teachers = nn.ModuleList(teachers)
        self.identities = identities  # for manifests: architecture and weights checksum
        self.mode, self.weights = mode, weights
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Ensemble:
        return super().train(False)  # always eval: BN running stats, no dropout

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target logits [B, C], per-teacher logits [T, B, C]), float32 (float64 for a
        float64 ensemble)."""
        images = images.to(next(self.parameters()).dtype)  # float32 under ZeRO-3, see
        per = torch.stack([at_least_float32(t(images)) for t in self.teachers])  # place_frozen
        return combine(per, self.mode, self.weights), per


def teacher_identity(cfg: TeacherConfig, num_classes: int) -> dict:
    """Architecture and weights checksum of a teacher, read without building it: what a cache
    manifest records and what a cache request is matched on."""
    if cfg.path is not None:
        spec = read_spec(cfg.path)
        weights = Path(cfg.path) / MODEL_FILE
    else:
        spec = model_spec(cfg.model, num_classes, cfg.kwargs)
        weights = Path(cfg.weights)
    if spec["num_classes"] != num_classes:
        raise ConfigError(
            f"teacher {cfg.path or cfg.model} predicts {spec['num_classes']} classes but the "
            f"dataset has {num_classes}: check `cache.teachers` and `data.name`"
        )
    if not weights.is_file():
        raise ModelFileError(f"teacher weights {weights} do not exist")
    return {"spec": spec, "weights_sha256": file_sha256(weights)}


def load_teacher(cfg: TeacherConfig, num_classes: int) -> tuple[nn.Module, dict]:
    identity = teacher_identity(cfg, num_classes)
    if cfg.path is not None:
        model, _ = load_model(cfg.path)
    else:
        model = build_model(cfg.model, num_classes, weights=cfg.weights, **cfg.kwargs)
    return model, identity


def build_ensemble(
    cfgs: list[TeacherConfig], num_classes: int, mode: str, weights: list[float] | None = None
) -> Ensemble:
    if not cfgs:
        raise ConfigError("no teachers configured: set cache.teachers (a list of model dirs)")
    loaded = [load_teacher(c, num_classes) for c in cfgs]
    return Ensemble([m for m, _ in loaded], [i for _, i in loaded], mode, weights)
