"""Logit-distillation losses, one registry (`LOSSES`, `build_loss`), computed in at least
float32 whatever the autocast around them.

KL uses `batchmean` reduction: the sum over classes, averaged over the batch, which is the
actual KL divergence. `nn.KLDivLoss()`'s default element mean also divides by the class count
and silently shrinks the KD term (haitongli/knowledge-distillation-pytorch issues #2, #48, where
it forced T=6, alpha=0.95 to compensate). The T^2 factor keeps the soft-target gradients on the
same scale as the hard-label ones when T changes.

Every loss here reads the teacher's logits only, so every one runs from the cache. Full and
int8 rows hold the whole vector and serve all of them. A top-k row holds the k largest
log-probabilities at T = 1, the rest of the mass spread flat (`topk_to_logits`), plus per-row
extras (`distill.cache.layout.TOPK_EXTRAS`) that make parts of a loss exact; each loss declares
the extras it reads (`DistillLoss.topk_extras`), and DIST, which correlates whole vectors, is
refused on top-k rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import KDConfig
from common.errors import ConfigError
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
    student_logits = at_least_float32(student_logits)  # once, see `DistillLoss.terms`
    with torch.autocast(student_logits.device.type, enabled=False):
        ce = F.cross_entropy(student_logits, labels)
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
    topk_idx: torch.Tensor,
    topk_logp: torch.Tensor,
    num_classes: int,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dense teacher logits [B, C] from a top-k cache row (class indices and log-probabilities).

    Tail policy ("uniform", FKD's marginal smoothing): the probability mass the k stored classes
    leave, 1 - sum_k exp(logp_k), is spread evenly over the C - k others. At T = 1 the
    result's softmax equals the full teacher softmax on the kept classes exactly and has the
    right total tail mass; at other temperatures it is the temperature applied to that
    reconstruction (the tail's internal shape is unknown, so it stays flat).

    `extra` = (class [B], log-probability [B]): one more known class per row (the true class,
    from the cache's extras); where it is not among the k it is placed exactly and the tail
    spread over the C - k - 1 others.
    """
    vals = at_least_float32(topk_logp)
    k = vals.shape[1]
    out = torch.empty(vals.shape[0], num_classes, dtype=vals.dtype, device=vals.device)
    kept = torch.exp(vals).sum(1, keepdim=True)
    log_others: float | torch.Tensor = math.log(max(num_classes - k, 1))
    if extra is not None:
        cls, logp = extra[0].long()[:, None], extra[1].to(vals.dtype)[:, None]
        fresh = (topk_idx.long() != cls).all(1, keepdim=True)
        kept = kept + torch.where(fresh, logp.exp(), 0.0)
        log_others = torch.log((num_classes - k - fresh.to(vals.dtype)).clamp(min=1))
    if k < num_classes:
        tail = (1.0 - kept.clamp(max=1.0)).clamp(min=1e-12)
        out.copy_((torch.log(tail) - log_others).expand_as(out))
    if extra is not None:
        out.scatter_(1, cls, logp)  # first: where the class is among the k, they overwrite it
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


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftTarget:
    """The teacher side of a batch, as every loss reads it."""

    logits: torch.Tensor
    """[B, C]: the ensemble's logits (full and int8 rows, live teachers), or a top-k row's
    reconstruction (`topk_target`)."""
    mean: torch.Tensor | None = None
    """[B, 1]: the whole row's mean over the C classes, in the frame of `logits`, where
    `logits` is a reconstruction whose own mean is not the row's (top-k); None: `logits`'."""
    std: torch.Tensor | None = None
    """[B, 1]: likewise the whole row's standard deviation."""


def topk_target(
    topk_idx: torch.Tensor,
    topk_logp: torch.Tensor,
    num_classes: int,
    classes: torch.Tensor | None = None,
    *,
    target_logit: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> SoftTarget:
    """The soft target a loss reads from a top-k row and the extras it declared (all [B], of
    the ensemble's logits z at T = 1; `classes` [B] the true classes).

    target_logit z_y and lse = logsumexp(z) give the true class's exact log-probability
    z_y - lse, placed also where the class is not among the k (DKD's target term is then exact
    at T = 1, as KD is). mean and std standardise the reconstruction with the whole row's
    statistics (LS) instead of those of its flat tail; the reconstruction holds z - lse, so the
    mean moves by -lse and the std stays.
    """
    extra = None if target_logit is None else (classes, target_logit - lse)
    logits = topk_to_logits(topk_idx, topk_logp, num_classes, extra)
    if mean is None:
        return SoftTarget(logits)
    return SoftTarget(logits, (mean - lse).to(logits.dtype)[:, None], std.to(logits.dtype)[:, None])


Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DistillLoss:
    """One registered loss: how it is computed and what it needs from a cache row."""

    terms: Callable[[torch.Tensor, SoftTarget, torch.Tensor, torch.Tensor, KDConfig, float], Terms]
    """(student logits [B, C], soft target, label targets (class indices [B], or class
    probabilities [B, C] for mixed views), true classes [B] (a mixed view's own label: DKD
    splits off one class), settings, weight of the distillation term during a warm-up) ->
    named terms; `loss` is the one optimised.

    Each converts bf16/fp16 student logits (an autocast forward's) to float32 once, before
    its terms use them: converted per term, each term's gradient would be rounded to bf16
    apart and summed in bf16, losing what cancels between CE and the distillation term."""
    topk_extras: tuple[str, ...] | None
    """What the loss reads from a top-k row besides the k log-probabilities (names from
    `distill.cache.layout.TOPK_EXTRAS`); None: the whole vector (a top-k cache is refused)."""


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.autocast(student_logits.device.type, enabled=False):
        return F.cross_entropy(at_least_float32(student_logits), labels)


def _kd(s, target: SoftTarget, labels, classes, kd: KDConfig, ramp: float) -> Terms:
    loss, kl, ce = kd_terms(s, target.logits, labels, kd.temperature, kd.alpha)
    return {"loss": loss, "kl": kl, "ce": ce}


def dkd_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, classes: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of decoupled KD, neither T^2-scaled, each summed over its classes and
    averaged over the batch: KL between the binary [p_y, 1 - p_y] distributions at T, and KL
    between the distributions over the non-target classes renormalised.

    Both come from one log-softmax per side, 1 - p_y as the log-sum-exp of the other classes:
    no cancellation when p_y is near 1, and no log of a sum of probabilities that can
    underflow (mdistiller takes log(sum p) and masks the target by subtracting 1000)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        s = F.log_softmax(at_least_float32(student_logits) / T, dim=-1)
        t = F.log_softmax(teacher_logits.to(s.dtype) / T, dim=-1)
        target = F.one_hot(classes, s.shape[-1]).bool()
        (bs, ns), (bt, nt) = _decouple(s, target, classes), _decouple(t, target, classes)
        tckd = F.kl_div(bs, bt, reduction="batchmean", log_target=True)
        nckd = F.kl_div(ns, nt, reduction="none", log_target=True).masked_fill(target, 0)
        return tckd, nckd.sum(-1).mean()


def _decouple(logp: torch.Tensor, target: torch.Tensor, classes: torch.Tensor):
    """(log [p_y, 1 - p_y] [B, 2], log-probabilities renormalised over the non-target classes
    [B, C], whose target column is left finite and not a probability)."""
    rest = logp.masked_fill(target, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([logp.gather(1, classes[:, None]), rest], 1), logp - rest


def _dkd(s, target: SoftTarget, labels, classes, kd: KDConfig, ramp: float) -> Terms:
    c, s = kd.dkd, at_least_float32(s)
    tckd, nckd = dkd_parts(s, target.logits, classes, c.temperature)
    ce = cross_entropy(s, labels)
    soft = c.temperature**2 * (c.alpha * tckd + c.beta * nckd)
    return {"loss": c.ce_weight * ce + ramp * soft, "tckd": tckd, "nckd": nckd, "ce": ce}


LS_EPS = 1e-7
"""Added to the std, as in the authors' code (and torchdistill's `LogitStdKDLoss`)."""


def standardise(
    z: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """(z - mean) / (1e-7 + std) of each row over the classes. The std is torch's default,
    Bessel-corrected (n - 1), as in the paper's Algorithm 1 and the authors' code: the
    population std would make it KD at a temperature sqrt(C / (C - 1)) higher."""
    mean = z.mean(-1, keepdim=True) if mean is None else mean
    std = z.std(-1, keepdim=True) if std is None else std
    return (z - mean) / (LS_EPS + std)


def _ls(s, target: SoftTarget, labels, classes, kd: KDConfig, ramp: float) -> Terms:
    c, s = kd.ls, at_least_float32(s)
    with torch.autocast(s.device.type, enabled=False):
        t = standardise(target.logits.to(s.dtype), target.mean, target.std)
        kl = soft_kl(standardise(s), t, c.temperature)
    ce = cross_entropy(s, labels)
    return {"loss": c.ce_weight * ce + c.kd_weight * c.temperature**2 * kl, "kl": kl, "ce": ce}


def pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - the Pearson correlation of a and b along the last dimension, averaged over rows: the
    cosine of the centred rows with the authors' eps (1e-8 on each norm)."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return 1 - F.cosine_similarity(a, b, dim=-1, eps=1e-8).mean()


def dist_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) of DIST, not tau^2-scaled: 1 - Pearson over the classes of each row, and
    over the batch of each class, of the softmax at tau. The intra-class term relates the
    images of one (micro-)batch on one process, as in the authors' per-GPU code."""
    with torch.autocast(student_logits.device.type, enabled=False):
        ps = F.softmax(at_least_float32(student_logits) / tau, dim=-1)
        pt = F.softmax(teacher_logits.to(ps.dtype) / tau, dim=-1)
        return pearson_distance(ps, pt), pearson_distance(ps.T, pt.T)


def _dist(s, target: SoftTarget, labels, classes, kd: KDConfig, ramp: float) -> Terms:
    c, s = kd.dist, at_least_float32(s)
    inter, intra = dist_parts(s, target.logits, c.tau)
    ce = cross_entropy(s, labels)
    soft = c.tau**2 * (c.beta * inter + c.gamma * intra)
    return {"loss": c.ce_weight * ce + soft, "inter": inter, "intra": intra, "ce": ce}


LOSSES: dict[str, DistillLoss] = {
    "kd": DistillLoss(_kd, topk_extras=()),
    "dkd": DistillLoss(_dkd, topk_extras=("target_logit", "lse")),
    "ls": DistillLoss(_ls, topk_extras=("lse", "mean", "std")),
    "dist": DistillLoss(_dist, topk_extras=None),
}
"""`kd.loss` -> loss. kd reads a top-k row as its flat-tail reconstruction (exact at T = 1);
dkd adds the true class's exact log-probability; ls the whole row's mean and std."""


def build_loss(name: str) -> DistillLoss:
    if name not in LOSSES:
        valid = ", ".join(LOSSES)
        raise ConfigError(f"`kd.loss` {name!r} is not a registered loss; valid: {valid}")
    return LOSSES[name]


def warmup_ramp(kd: KDConfig, epoch: float | None, epochs: int | None) -> float:
    """Weight of the distillation term `epoch` epochs (fractional, the current step included)
    into a stage of `epochs`: DKD's linear warm-up (`kd.dkd.warmup_epochs`), 1 for the others."""
    if kd.loss != "dkd":
        return 1.0
    if epoch is None or epochs is None:
        raise RuntimeError("DKD's warm-up follows the schedule: call KDTask.start first")
    warm = epochs / 12 if kd.dkd.warmup_epochs is None else kd.dkd.warmup_epochs
    return 1.0 if warm <= 0 else min(epoch / warm, 1.0)
