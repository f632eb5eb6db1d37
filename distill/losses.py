"""Knowledge-distillation losses (Hinton et al. 2015), computed in at least float32.

KL uses `batchmean` reduction: the sum over classes, averaged over the batch, which is the
actual KL divergence. `nn.KLDivLoss()`'s default element mean also divides by the class count
and silently shrinks the KD term (haitongli/knowledge-distillation-pytorch issues #2, #48, where
it forced T=6, alpha=0.95 to compensate). The T^2 factor keeps the soft-target gradients on the
same scale as the hard-label ones when T changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.precision import at_least_float32


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch; in the
    student's precision, at least float32 (soft targets read as float16 are promoted)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        s = F.log_softmax(at_least_float32(student_logits) / T, dim=-1)
        t = F.log_softmax(teacher_logits.to(s.dtype) / T, dim=-1)
        return F.kl_div(s, t, reduction="batchmean", log_target=True)


def kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce), each computed once: loss = alpha * T^2 * kl + (1 - alpha) * ce, with
    kl = `soft_kl(student, teacher, T)` (not T^2-scaled) and ce = CE(s, labels)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        ce = F.cross_entropy(at_least_float32(student_logits), labels)
        kl = soft_kl(student_logits, teacher_logits, T)
        if alpha == 0:
            return ce, kl, ce
        return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)."""
    return kd_terms(student_logits, teacher_logits, labels, T, alpha)[0]


def topk_to_logits(
    topk_idx: torch.Tensor, topk_logp: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Dense teacher logits [B, C] from a top-k cache row (class indices and log-probabilities).

    Tail policy ("uniform", FKD's marginal smoothing): the probability mass the k stored classes
    leave, 1 - sum_k exp(logp_k), is spread evenly over the C - k others. At T = 1 the
    result's softmax equals the full teacher softmax on the kept classes exactly and has the
    right total tail mass; at other temperatures it is the temperature applied to that
    reconstruction (the tail's internal shape is unknown, so it stays flat).
    """
    vals = at_least_float32(topk_logp)
    k = vals.shape[1]
    out = torch.empty(vals.shape[0], num_classes, dtype=vals.dtype, device=vals.device)
    if k < num_classes:
        kept = torch.exp(vals).sum(1, keepdim=True).clamp(max=1.0)
        tail = (1.0 - kept).clamp(min=1e-12)
        out.copy_((torch.log(tail) - math.log(num_classes - k)).expand_as(out))
    out.scatter_(1, topk_idx.long(), vals)
    return out


def kd_loss_topk(
    student_logits: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_logp: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    alpha: float,
) -> torch.Tensor:
    """`kd_loss` against a top-k cache row (see `topk_to_logits` for the tail policy)."""
    teacher = topk_to_logits(topk_idx, topk_logp, student_logits.shape[-1])
    return kd_loss(student_logits, teacher, labels, T, alpha)
