"""The distillation losses: each against a float64 reference written from its paper's formula
(value and gradient with respect to the student's logits, C = 10, 100, 1000), in float32 under
bf16 autocast, the registry against the config, DKD's warm-up, what a top-k row's extras make
exact, and how the ensemble is averaged with per-teacher weights."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from common.config import ConfigError, DISTConfig, DKDConfig, KDConfig, LSConfig, load_config
from distill.cache.writer import topk_extras
from distill.losses import (
    LOSSES,
    SoftTarget,
    build_loss,
    dkd_parts,
    kd_terms,
    standardise,
    topk_target,
    topk_to_logits,
)
from distill.task import CachedTeacher, KDTask
from distill.teachers import Ensemble, combine
from launch import freshness, graph
from launch.config import Config

U32 = 2.0**-24
"""float32 unit roundoff."""
U_BF16 = 2.0**-8
"""bf16 unit roundoff (8 significant bits, round to nearest)."""
B = 16


# -- float64 references, from the papers' formulas ------------------------------------------


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(-1, keepdim=True).values)  # exp(z_i) / sum_j exp(z_j)
    return e / e.sum(-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i log(p_i / q_i) per row."""
    return (p * torch.log(p / q)).sum(-1)


def ce(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log(softmax(s)[torch.arange(len(y)), y]).mean()


def ref_kd(s, t, y, c: KDConfig):
    """Hinton et al. 2015: alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE."""
    T = c.temperature
    return c.alpha * T * T * kl(softmax(t / T), softmax(s / T)).mean() + (1 - c.alpha) * ce(s, y)


def ref_dkd(s, t, y, c: DKDConfig):
    """Zhao et al. 2022, eqs. (1)-(4): b = [p_y, p_rest] with p_rest = sum_{i != y} p_i, and
    p^_i = p_i / p_rest over the other classes; CE + T^2 (alpha KL(b_t || b_s) + beta KL(p^_t ||
    p^_s)), T^2 as in the authors' code."""
    T, rows = c.temperature, torch.arange(len(y))
    others = torch.ones_like(s, dtype=torch.bool)
    others[rows, y] = False

    def parts(z):
        p = softmax(z / T)
        rest = (p * others).sum(-1)
        return torch.stack([p[rows, y], rest], 1), p[others].view(len(y), -1) / rest[:, None]

    (bs, hs), (bt, ht) = parts(s), parts(t)
    tckd, nckd = kl(bt, bs).mean(), kl(ht, hs).mean()
    return c.ce_weight * ce(s, y) + T * T * (c.alpha * tckd + c.beta * nckd)


def ref_ls(s, t, y, c: LSConfig):
    """Sun et al. 2024: KD on Z(z) = (z - mean) / (sigma + 1e-7), sigma the Bessel-corrected
    std of Algorithm 1 (torch.std), base temperature T."""
    n = s.shape[-1]

    def z(x):
        m = x.sum(-1, keepdim=True) / n
        sigma = torch.sqrt(((x - m) ** 2).sum(-1, keepdim=True) / (n - 1))
        return (x - m) / (sigma + 1e-7)

    T = c.temperature
    return (
        c.ce_weight * ce(s, y)
        + c.kd_weight * T * T * kl(softmax(z(t) / T), softmax(z(s) / T)).mean()
    )


def ref_dist(s, t, y, c: DISTConfig):
    """Huang et al. 2022: tau^2 (beta mean_i (1 - rho(P_s[i], P_t[i])) + gamma mean_j (1 -
    rho(P_s[:, j], P_t[:, j]))), rho Pearson's correlation, P the softmax at tau; plus CE."""

    def rho(u, v):
        u, v = u - u.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
        return (u * v).sum(-1) / torch.sqrt((u * u).sum(-1) * (v * v).sum(-1))

    ps, pt = softmax(s / c.tau), softmax(t / c.tau)
    inter, intra = (1 - rho(ps, pt)).mean(), (1 - rho(ps.T, pt.T)).mean()
    return c.ce_weight * ce(s, y) + c.tau**2 * (c.beta * inter + c.gamma * intra)


REFERENCES = {
    "kd": lambda s, t, y, kd: ref_kd(s, t, y, kd),
    "dkd": lambda s, t, y, kd: ref_dkd(s, t, y, kd.dkd),
    "ls": lambda s, t, y, kd: ref_ls(s, t, y, kd.ls),
    "dist": lambda s, t, y, kd: ref_dist(s, t, y, kd.dist),
}


def total_weight(kd: KDConfig) -> float:
    """The sum of the loss's weights (T^2 included): how far one rounding error in a term can
    move the loss."""
    return {
        "kd": 1 + kd.temperature**2,
        "dkd": kd.dkd.ce_weight + kd.dkd.temperature**2 * (kd.dkd.alpha + kd.dkd.beta),
        "ls": kd.ls.ce_weight + kd.ls.kd_weight * kd.ls.temperature**2,
        "dist": kd.dist.ce_weight + kd.dist.tau**2 * (kd.dist.beta + kd.dist.gamma),
    }[kd.loss]


def inputs(num_classes: int):
    """Student logits N(0, 3^2), a teacher peaked on the label (N(0, 2^2) + 6), labels."""
    g = torch.Generator().manual_seed(num_classes)
    y = torch.randint(0, num_classes, (B,), generator=g)
    s = torch.randn(B, num_classes, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, num_classes, generator=g, dtype=torch.float64) * 2
    return s, t + 6 * torch.nn.functional.one_hot(y, num_classes), y


def value_and_grad(fn, s, t, y):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, y)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def ours(kd: KDConfig):
    return lambda s, t, y: LOSSES[kd.loss].terms(s, SoftTarget(t), y, y, kd, 1.0)["loss"]


def reference(kd: KDConfig):
    return lambda s, t, y: REFERENCES[kd.loss](s, t, y, kd)


CASES = [(name, c) for name in LOSSES for c in (10, 100, 1000)]


@pytest.mark.parametrize(("name", "num_classes"), CASES)
def test_loss_and_gradient_match_the_float64_reference(name, num_classes):
    """float64 in, float64 arithmetic: the two formulas (log-space here, probability ratios
    there) agree to a few hundred float64 roundings."""
    kd = KDConfig(loss=name)
    s, t, y = inputs(num_classes)
    (got, g), (ref, g_ref) = (
        value_and_grad(ours(kd), s, t, y),
        value_and_grad(reference(kd), s, t, y),
    )
    assert got.dtype == torch.float64
    assert abs(got - ref) <= 1e-12 * abs(ref), (got, ref)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12 * g_ref.abs().max().item())


@pytest.mark.numerics
@pytest.mark.parametrize(("name", "num_classes"), CASES)
def test_loss_under_bf16_autocast_is_float32_and_matches_the_reference(name, num_classes):
    """As the trainer calls it: bf16 logits from an autocast forward. The loss must be float32
    arithmetic on those logits, so it is compared with the float64 reference on the same
    bf16-rounded values within a float32 bound: every log-probability carries ~u32 (|z| / T +
    ln C) of rounding, the loss sums them with its total weight W, and 32x covers the
    handful of operations per term. Arithmetic in bf16 would be off by ~u_bf16 = 2^-8 of the
    loss, 2^16 times the float32 unit: far outside. The gradient reaches the float32 leaf
    through the bf16 cast, so it is float32's rounded once to bf16."""
    kd = KDConfig(loss=name)
    s64, t64, y = inputs(num_classes)
    s32, t32 = s64.float(), t64.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, g = value_and_grad(lambda s, t, y: ours(kd)(s.bfloat16(), t, y), s32, t32, y)
    assert got.dtype == torch.float32 and g.dtype == torch.float32
    ref, g_ref = value_and_grad(reference(kd), s32.bfloat16().double(), t32.double(), y)
    scale = (s64.abs().max() + t64.abs().max()).item() + math.log(num_classes)
    tol = 32 * U32 * total_weight(kd) * scale
    assert abs(got.double() - ref) <= tol, (got, ref, tol)
    assert tol < U_BF16 * abs(ref)  # the bound tells float32 from bf16 arithmetic
    g_tol = U_BF16 * g_ref.abs() + tol / B
    assert ((g.double() - g_ref).abs() <= g_tol).all()


# -- the registry -----------------------------------------------------------------------------


def test_registry_is_what_the_config_accepts_and_unknown_names_are_refused(tmp_path):
    hints = typing.get_type_hints(KDConfig)
    assert set(typing.get_args(hints["loss"])) == set(LOSSES)
    with pytest.raises(ConfigError, match="valid: kd, dkd, ls, dist"):
        build_loss("nkd")
    with pytest.raises(ConfigError, match=r"`sparsity.kd.loss` must be 'kd' \| 'dkd'"):
        load_config(Config, None, ["sparsity.kd.loss=nkd"])
    for section in ("distill", "sparsity", "finetune"):  # one KD section type for all three
        cfg = load_config(Config, None, [f"{section}.kd.loss=dkd", f"{section}.kd.dkd.beta=6"])
        assert getattr(cfg, section).kd.dkd.beta == 6.0


def test_classic_kd_through_the_registry_is_bit_identical():
    s, t, y = inputs(100)
    s, t = s.float(), t.float()
    kd = KDConfig(temperature=3.0, alpha=0.7)
    terms = LOSSES["kd"].terms(s, SoftTarget(t), y, y, kd, 1.0)
    for a, b in zip((terms["loss"], terms["kl"], terms["ce"]), kd_terms(s, t, y, 3.0, 0.7)):
        assert torch.equal(a, b)
    # a top-k row read for KD (no extras) is the reconstruction it always was
    logp, idx = torch.log_softmax(t, -1).topk(5, -1)
    task = KDTask(CachedTeacher(100), kd)
    batch = {"teacher_topk_idx": idx, "teacher_topk_logp": logp, "label": y, "image": s}
    got = task.losses(lambda x: x, batch)
    old = kd_terms(s, topk_to_logits(idx, logp, 100), y, 3.0, 0.7)
    assert torch.equal(got["loss"], old[0]) and set(got) == {"loss", "kl", "ce"}


def test_dkd_warm_up_follows_the_schedule_and_resumes():
    """The DKD term ramps linearly over `warmup_epochs` (default 1/12 of the stage's epochs,
    the published 20 of 240), step by step, from where a resumed run stands."""
    s, t, y = inputs(10)
    batch = {"teacher_logits": t, "label": y, "image": s}
    task = KDTask(CachedTeacher(10), KDConfig(loss="dkd"))
    with pytest.raises(RuntimeError, match="KDTask.start"):
        task.losses(lambda x: x, batch)
    task.start(step=0, steps_per_epoch=4, epochs=24)  # warm-up 2 epochs: 8 steps
    ramps = []
    for _ in range(10):
        terms = task.losses(lambda x: x, batch)
        ramps.append(task.after_backward(None)["dkd_ramp"])
        soft = 16 * (terms["tckd"] + 8 * terms["nckd"])
        torch.testing.assert_close(terms["loss"], terms["ce"] + ramps[-1] * soft)
    assert ramps == [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1.0, 1.0, 1.0]
    task.start(step=5, steps_per_epoch=4, epochs=24)  # resumed after 5 steps
    task.losses(lambda x: x, batch)
    assert task.after_backward(None)["dkd_ramp"] == 6 / 8
    fixed = KDTask(CachedTeacher(10), KDConfig(loss="dkd", dkd=DKDConfig(warmup_epochs=0)))
    fixed.start(step=0, steps_per_epoch=4, epochs=24)
    assert fixed.after_backward(None) == {"dkd_ramp": 1.0}
    assert KDTask(CachedTeacher(10), KDConfig()).after_backward(None) == {}


# -- what a top-k row's extras make exact ------------------------------------------------------


def test_topk_extras_make_dkd_target_term_and_ls_standardisation_exact():
    """Rows whose true class is outside the top k: with the extras a top-k cache stores (from
    the writer's own `topk_extras`), DKD's target term at T = 1 and LS's standardised values of
    the kept classes equal the full row's; without them they do not."""
    z, _, _ = inputs(100)
    y = z.argmin(-1)  # the true class is the least likely: never among the k
    logp, idx = torch.log_softmax(z, -1).topk(10, -1)
    extras = topk_extras(z, y)

    def read(names):
        return topk_target(idx, logp, 100, y, **{n: extras[n] for n in names})

    student = torch.randn(B, 100, dtype=torch.float64)
    full_tckd, _ = dkd_parts(student, z, y, 1.0)
    with_extras, _ = dkd_parts(student, read(LOSSES["dkd"].topk_extras).logits, y, 1.0)
    without, _ = dkd_parts(student, read(()).logits, y, 1.0)
    assert abs(with_extras - full_tckd) <= 1e-12 * full_tckd and abs(without - full_tckd) > 1e-3
    dense = read(LOSSES["dkd"].topk_extras).logits  # the true class placed, the tail re-spread
    torch.testing.assert_close(dense.logsumexp(-1), torch.zeros(B, dtype=torch.float64))

    full = standardise(z).gather(1, idx)
    target = read(LOSSES["ls"].topk_extras)
    kept = standardise(target.logits, target.mean, target.std).gather(1, idx)
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-12)
    flat = read(()).logits
    assert (standardise(flat).gather(1, idx) - full).abs().max() > 0.1


# -- the ensemble's average ------------------------------------------------------------------


def test_weighted_ensemble_average_in_probabilities_and_logits():
    per = torch.randn(3, B, 10, dtype=torch.float64) * 3
    w = [1.0, 2.0, 1.0]
    p = sum(wi / 4 * softmax(per[i]) for i, wi in enumerate(w))
    torch.testing.assert_close(softmax(combine(per, "probs", w)), p, rtol=0, atol=1e-15)
    torch.testing.assert_close(combine(per, "probs", w).exp().sum(-1), torch.ones(B).double())
    torch.testing.assert_close(
        combine(per, "logits", w), (per[0] + 2 * per[1] + per[2]) / 4, rtol=0, atol=1e-14
    )
    assert torch.equal(combine(per, "probs", [2.0, 4.0, 2.0]), combine(per, "probs", w))
    equal = combine(per, "probs", [1.0, 1.0, 1.0])
    torch.testing.assert_close(equal, combine(per, "probs"), rtol=0, atol=1e-14)
    with pytest.raises(ConfigError, match="ensemble_weights` has 2 weights for 3 teachers"):
        Ensemble([torch.nn.Identity()] * 3, [{}] * 3, "probs", [1.0, 2.0])


def test_weights_and_whole_row_losses_are_checked_at_load():
    members = "train.members=[{seed: 0}, {seed: 1}]"
    load_config(Config, None, [members, "cache.ensemble_weights=[1, 3]"])
    with pytest.raises(ConfigError, match="2 weights for 1 teachers.*`train.members`"):
        load_config(Config, None, ["cache.ensemble_weights=[1, 3]"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(Config, None, [members, "cache.ensemble_weights=[1, 0]"])
    topk = ["cache.storage=topk", "cache.topk=3"]
    with pytest.raises(ConfigError, match=r"`distill.kd.loss: dist`.*keeps only the 3 most"):
        load_config(Config, None, [*topk, "distill.kd.loss=dist"])
    with pytest.raises(ConfigError, match=r"`sparsity.kd.loss: dist`"):
        load_config(Config, None, [*topk, "sparsity.kd_from=cache", "sparsity.kd.loss=dist"])
    # live targets hold every class; so do full and int8 rows; the other losses read top-k
    load_config(Config, None, [*topk, "distill.mode=online", "distill.kd.loss=dist"])
    load_config(Config, None, ["cache.storage=int8", "distill.kd.loss=dist"])
    for loss in ("kd", "dkd", "ls"):
        load_config(Config, None, [*topk, f"distill.kd.loss={loss}"])
    # the losses compared with kd.loss (`distill-loss`): the same checks, each listed once
    with pytest.raises(ConfigError, match=r"`distill.compare: dist`.*keeps only the 3 most"):
        load_config(Config, None, [*topk, "distill.compare=[dkd, dist]"])
    load_config(Config, None, [*topk, "distill.compare=[dkd, ls]"])
    for bad in ("[kd]", "[dkd, dkd]"):
        with pytest.raises(ConfigError, match="other losses than `distill.kd.loss` \\(kd\\)"):
            load_config(Config, None, [f"distill.compare={bad}"])
    with pytest.raises(ConfigError, match="distill.compare"):
        load_config(Config, None, ["distill.compare=[dkdd]"])


def test_finished_runs_stay_fresh_and_a_new_loss_reruns_what_reads_it():
    """The new keys at their defaults leave node keys as they were (`ADDED_LATER`): upgrading
    does not re-run finished students or caches; choosing a loss enters the student's key."""
    cfg = load_config(Config, None, [])
    distill = next(n for n in graph.nodes(cfg) if n.stage == "distill")
    cache = next(n for n in graph.nodes(cfg) if n.stage == "cache")
    assert freshness.values(cfg, distill)["distill.kd"] == {"temperature": 4.0, "alpha": 0.9}
    assert "ensemble_weights" not in freshness.values(cfg, cache)["cache"]
    dkd = load_config(Config, None, ["distill.kd.loss=dkd", "distill.kd.dkd.beta=6"])
    assert freshness.values(dkd, distill)["distill.kd"]["dkd"]["beta"] == 6.0
    assert freshness.identity(dkd, distill).key != freshness.identity(cfg, distill).key
