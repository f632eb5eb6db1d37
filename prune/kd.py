"""Knowledge distillation from a live, frozen teacher for the fine-tuning stage.

The loss is the project's one KD loss, `distill.losses.kd_loss` (Hinton et al. 2015:
alpha * T^2 * KL + (1 - alpha) * CE). The teacher is a plain module in eval mode, run under
`torch.no_grad`, and never DDP-wrapped (it has no gradients to all-reduce). Fine-tuning from the
logit cache instead is the lead's wiring through `distill.task.KDTask` with a `CachedTeacher`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import kd_loss


class LiveKDTask:
    """Student trained on `kd_loss` against a live teacher's logits."""

    def __init__(self, teacher: nn.Module, T: float, alpha: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.T, self.alpha = T, alpha

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(batch["image"]).float()
        logits = model(batch["image"])
        loss = kd_loss(logits, teacher_logits, batch["label"], self.T, self.alpha)
        return {"loss": loss, "ce": F.cross_entropy(logits.float().detach(), batch["label"])}

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        return {}

    def eval_terms(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher(batch["image"]).float()
        return {"teacher_agree": (logits.argmax(1) == t.argmax(1)).sum().float()}
