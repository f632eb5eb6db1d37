"""The distillation task for the shared training loop, and the two teacher sides behind it.

The teacher side, cached or live, answers one question: "the ensemble's logits for this batch"
(`targets(batch)`). Cached targets arrive with the batch, looked up by (sample_id, view_id) in
the loader workers; live targets are computed under `torch.no_grad` (not `inference_mode`,
whose tensors cannot enter the student's autograd graph).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.data import ViewDataset
from common.data.seeding import mix
from common.trainer import label_targets
from distill.cache import LogitCache
from distill.losses import kd_terms, soft_kl, topk_to_logits
from distill.teachers import Ensemble

_CHOICE_SALT = 0xC40


def replay_cached_views(views: int, seed: int):
    """Each step trains every sample on one of its `views` cached views, drawn afresh per
    epoch from (seed, sample_id, epoch): the student sees exactly the pixels the teachers saw."""

    def choose(sample_ids: np.ndarray, epoch: int) -> np.ndarray:
        return np.array(
            [mix(seed, _CHOICE_SALT, int(s), epoch) % views for s in sample_ids], dtype=np.int64
        )

    return choose


class CachedTargetDataset(ViewDataset):
    """Training views plus their cached soft targets, fetched one batch at a time."""

    def __init__(self, base: ViewDataset, cache: LogitCache):
        super().__init__(base.source, base.recipe)
        self.cache = cache

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        items = [self[k] for k in keys]
        sids = np.array([i["sample_id"] for i in items])
        vids = np.array([i["view_id"] for i in items])
        for name, values in self.cache.rows(sids, vids).items():
            for item, v in zip(items, values):
                item[f"teacher_{name}"] = v
        return items


class CachedTeacher:
    """Soft targets that came with the batch from a `CachedTargetDataset`."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def targets(self, batch: dict) -> torch.Tensor:
        if "teacher_logits" in batch:
            return batch["teacher_logits"]
        return topk_to_logits(
            batch["teacher_topk_idx"], batch["teacher_topk_logp"], self.num_classes
        )


class OnlineTeacher:
    """The ensemble run live on the same batch; never wrapped for data parallelism."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble

    def targets(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return self.ensemble(batch["image"])[0]


class KDTask:
    """Student loss = alpha T^2 KL + (1 - alpha) CE; test-split agreement with the teachers."""

    def __init__(self, teacher, T: float, alpha: float, test_teacher_logits=None):
        self.teacher, self.T, self.alpha = teacher, T, alpha
        self.test_teacher_logits = test_teacher_logits  # [N_test, C] or None

    @property
    def live_teacher(self) -> bool:
        """Teachers run in the loop (what a ZeRO-3 launch config shards)."""
        return isinstance(self.teacher, OnlineTeacher)

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])
        t = self.teacher.targets(batch)
        loss, kl, ce = kd_terms(logits, t, label_targets(batch, logits), self.T, self.alpha)
        return {"loss": loss, "kl": kl.detach(), "ce": ce.detach()}

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        return {}

    def eval_terms(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Agreement with the ensemble on the test split (the trainer asks on test only)."""
        if self.test_teacher_logits is None:
            return {}
        t = self.test_teacher_logits[batch["sample_id"].cpu()].to(logits.device).float()
        n = len(logits)
        return {
            "teacher_agreement": (logits.argmax(1) == t.argmax(1)).sum().float(),
            "teacher_kl": soft_kl(logits, t, 1.0) * n,
            "teacher_acc": (t.argmax(1) == batch["label"]).sum().float(),
        }


def teacher_test_logits(
    teacher: nn.Module,
    test: ViewDataset,
    rank: int,
    world: int,
    device: torch.device,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ensemble logits on the plain test views of this process's evaluation share (every
    `world`-th sample from `rank`), computed once so every epoch's agreement metric costs
    nothing.

    Every process runs the same number of forward passes, repeating its last batch where its
    share is shorter: a ZeRO-3 teacher gathers its weights collectively in each forward, so
    one process calling it once more than the others would wait forever."""
    ids = list(range(rank, len(test), world))
    share = -(-len(test) // world)  # the longest share
    out = torch.zeros(len(test), test.source.num_classes, dtype=torch.float16)
    with torch.no_grad():  # not inference_mode: ZeRO-3 swaps gathered weights into parameters
        for start in range(0, share, batch_size):
            chunk = ids[start : start + batch_size] or ids[-batch_size:] or [0]
            images = torch.stack([test[(s, -1)]["image"] for s in chunk]).to(device, dtype)
            logits = teacher(images)[0]
            if start < len(ids):
                out[chunk] = logits.cpu().half()
    return out
