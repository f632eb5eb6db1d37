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

from common.config import KDConfig
from common.data import ViewDataset
from common.data.seeding import mix
from common.trainer import label_targets
from distill.cache import LogitCache
from distill.losses import SoftTarget, build_loss, soft_kl, topk_target, warmup_ramp
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
    """Soft targets that came with the batch from a `CachedTargetDataset`; from top-k rows,
    read with the extras the loss declared (`DistillLoss.topk_extras`) and no others, so a
    loss's target does not depend on what else the cache happens to store."""

    def __init__(self, num_classes: int, extras: tuple[str, ...] = ()):
        self.num_classes, self.extras = num_classes, extras

    def targets(self, batch: dict) -> SoftTarget:
        if "teacher_logits" in batch:
            return SoftTarget(batch["teacher_logits"])
        return topk_target(
            batch["teacher_topk_idx"],
            batch["teacher_topk_logp"],
            self.num_classes,
            batch["label"],
            **{name: batch[f"teacher_{name}"] for name in self.extras},
        )


class OnlineTeacher:
    """The ensemble run live on the same batch; never wrapped for data parallelism."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble

    def targets(self, batch: dict) -> SoftTarget:
        with torch.no_grad():
            return SoftTarget(self.ensemble(batch["image"])[0])


class KDTask:
    """Student loss = the distillation loss `kd.loss` (`distill.losses.LOSSES`) against the
    teacher side's soft targets; test-split agreement with the teachers."""

    def __init__(self, teacher, kd: KDConfig, test_teacher_logits=None):
        self.teacher, self.kd, self.loss = teacher, kd, build_loss(kd.loss)
        self.test_teacher_logits = test_teacher_logits  # [N_test, C] or None
        self.step, self.steps_per_epoch, self.epochs = 0, None, None

    def start(self, step: int, steps_per_epoch: int, epochs: int) -> None:
        """Where the schedule stands (optimizer steps done, steps per epoch, the stage's
        epochs), for a loss that follows it (DKD's warm-up), also after a resume."""
        self.step, self.steps_per_epoch, self.epochs = step, steps_per_epoch, epochs

    def ramp(self) -> float:
        """The distillation term's weight at this step (1 outside DKD's warm-up)."""
        epoch = None if self.steps_per_epoch is None else (self.step + 1) / self.steps_per_epoch
        return warmup_ramp(self.kd, epoch, self.epochs)

    @property
    def live_teacher(self) -> bool:
        """Teachers run in the loop (what a ZeRO-3 launch config shards)."""
        return isinstance(self.teacher, OnlineTeacher)

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])
        target, labels = self.teacher.targets(batch), label_targets(batch, logits)
        terms = self.loss.terms(logits, target, labels, batch["label"], self.kd, self.ramp())
        return {k: v if k == "loss" else v.detach() for k, v in terms.items()}

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        ramp = self.ramp()
        self.step += 1
        return {"dkd_ramp": ramp} if self.kd.loss == "dkd" else {}

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
