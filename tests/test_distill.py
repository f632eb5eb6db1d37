"""Distillation: the loss against a float64 reference, top-k reconstruction, cached vs online
KD on the same views, DDP equivalence and refusal of a mismatched cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from common.config import DataConfig
from common.data import build_splits
from distill.cache.writer import quantize
from distill.losses import kd_loss, kd_loss_topk, topk_to_logits
from distill.task import teacher_test_logits
from tests.artifacts import cache_args, cdir, copy_of
from tests.conftest import run_cli
from tests.equivalence import EXACT, F64, assert_same_weights, weights


def reference_kd(s, t, y, T, alpha):
    """Hand-written float64: sum_c p_t (log p_t - log p_s), averaged over the batch."""
    s, t = s.double(), t.double()
    p_t = torch.exp(t / T - torch.logsumexp(t / T, -1, keepdim=True))
    log_p_s = s / T - torch.logsumexp(s / T, -1, keepdim=True)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean()
    log_q = s - torch.logsumexp(s, -1, keepdim=True)
    ce = -log_q[torch.arange(len(y)), y].mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.5), (4.0, 0.9), (6.0, 1.0), (2.0, 0.0)])
def test_kd_loss_and_gradient_match_float64_reference(T, alpha):
    torch.manual_seed(0)
    s = (torch.randn(16, 10, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(16, 10, dtype=torch.float64) * 5
    y = torch.randint(0, 10, (16,))
    loss = kd_loss(s, t, y, T, alpha)  # float64 in, float64 arithmetic throughout
    loss.backward()
    s_ref = s.detach().clone().requires_grad_(True)
    ref = reference_kd(s_ref, t, y, T, alpha)
    ref.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-12, rtol=0)
    # float32 in: float32 arithmetic, within float32 rounding of the same reference (10-class
    # log-softmax and a 16-row mean: a few ulps of 2^-24; 1e-5 relative leaves >10x margin)
    s32 = s.detach().float()
    loss32 = kd_loss(s32, t.float(), y, T, alpha)
    assert loss32.dtype == torch.float32
    assert abs(loss32.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))


def test_kd_loss_is_float32_under_autocast():
    s = torch.randn(4, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(s, torch.randn(4, 10), torch.zeros(4, dtype=torch.long), 4.0, 0.9)
    assert loss.dtype == torch.float32


def test_topk_reconstruction_keeps_the_softmax_on_kept_classes():
    torch.manual_seed(1)
    full = torch.randn(8, 100, dtype=torch.float64) * 4
    logp = torch.log_softmax(full, -1)  # what a top-k row stores
    vals, idx = logp.topk(5, -1)
    dense = topk_to_logits(idx, vals, 100)
    p_full, p_dense = F.softmax(full, -1), F.softmax(dense, -1)
    exact = {"atol": 1e-12, "rtol": 0}  # float64 throughout
    torch.testing.assert_close(p_dense.gather(1, idx), p_full.gather(1, idx), **exact)
    tail = 1 - p_full.gather(1, idx).sum(1)
    mask = torch.ones_like(full, dtype=torch.bool).scatter_(1, idx, False)
    torch.testing.assert_close((p_dense * mask).sum(1), tail, **exact)
    rest = p_dense[mask].view(8, 95)
    torch.testing.assert_close(rest, rest[:, :1].expand_as(rest), atol=0, rtol=0)  # uniform
    # All classes kept: exactly the log-probabilities, and the top-k loss equals the full one.
    v, i = logp.topk(100, -1)
    torch.testing.assert_close(topk_to_logits(i, v, 100), logp, atol=0, rtol=0)
    y = torch.zeros(8, dtype=torch.long)
    torch.testing.assert_close(
        kd_loss_topk(full, i, v, y, 2.0, 0.7), kd_loss(full, full, y, 2.0, 0.7), **exact
    )


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_stored_soft_targets_against_full_logits_at_each_temperature(T):
    """int8 rows (as the reader rebuilds them: lo + q * step) give the full logits' KD loss and
    gradient at every T; top-k rows are exact at T = 1 only and drift as T grows (the error
    BENCHMARKS.md tabulates), in the direction of a too-sharp target."""
    torch.manual_seed(2)
    full = torch.randn(64, 100, dtype=torch.float64) * 3
    full[torch.arange(64), torch.randint(100, (64,))] += 12  # peaked, as a trained teacher
    student = torch.randn(64, 100, dtype=torch.float64, requires_grad=True)
    y = full.argmax(1)

    def loss_and_grad(target_logits=None, topk=None):
        if topk is None:
            loss = kd_loss(student, target_logits, y, T, 1.0)
        else:
            loss = kd_loss_topk(student, *topk, y, T, 1.0)
        (grad,) = torch.autograd.grad(loss, student)
        return loss.detach(), grad.flatten()

    ref, g_ref = loss_and_grad(full)
    q = quantize(full.float())
    rebuilt = (
        torch.from_numpy(q["logits_lo"]).double()[:, None]
        + torch.from_numpy(q["logits_q"]).double()
        * torch.from_numpy(q["logits_step"]).double()[:, None]
    )
    got, g = loss_and_grad(rebuilt)
    assert abs(got / ref - 1) < 2e-3 and F.cosine_similarity(g, g_ref, 0) > 0.9999
    logp = torch.log_softmax(full, -1)
    vals, idx = logp.topk(10, -1)
    got, g = loss_and_grad(topk=(idx, vals.half().double()))
    err = abs(got / ref - 1)
    if T == 1.0:  # exact on the kept classes; the flat tail's own entropy is off by < 1%
        assert err < 1e-2 and F.cosine_similarity(g, g_ref, 0) > 0.999
    else:
        assert err > 1e-2  # the flat tail is wrong off T = 1: a documented limit, not noise


class CountingTeacher(torch.nn.Module):
    """A stand-in ensemble (logits = the first pixels) that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return images.flatten(1)[:, :10].float(), None


def test_teacher_test_logits_keeps_processes_in_lockstep():
    """A ZeRO-3 teacher gathers weights collectively in each forward: every process must call
    it equally often even when the test split does not divide evenly."""
    test = build_splits(DataConfig(name="digits", image_size=8, pad=0), seed=0).test
    assert len(test) == 359  # shares of 180 and 179: two and one batches of 179
    calls, outs = [], []
    for rank in (0, 1):
        teacher = CountingTeacher()
        outs.append(teacher_test_logits(teacher, test, rank, 2, torch.device("cpu"), 179))
        calls.append(teacher.calls)
    assert calls == [2, 2]
    full = torch.stack([test[(s, -1)]["image"] for s in range(len(test))]).flatten(1)[:, :10]
    for rank, out in enumerate(outs):
        mine = list(range(rank, len(test), 2))
        assert torch.equal(out[mine], full[mine].half())
        others = list(range(1 - rank, len(test), 2))
        assert not out[others].any()  # rows of the other process are left to it


DISTILL = [
    "distill.loop.batch_size=32",
    "distill.loop.optim.lr=0.02",
    "distill.loop.optim.warmup_epochs=0",
    "distill.loop.log_every=1",
    "distill.kd.temperature=4",
    "distill.kd.alpha=0.9",
]
S0 = "distill/seed0"
"""The KD student of the one seed these tests train (`distill/seed<seed>`)."""


def steps(stage_dir) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.numerics
def test_cached_kd_follows_online_kd_on_the_same_views(tmp_path, teachers):
    """With the teachers and the cache in float64, a student trained on cached targets is the
    student trained on live ones: the cache replays exactly the views the teachers saw."""
    args = cache_args(
        tmp_path,
        teachers,
        *F64,
        "cache.logit_dtype=float64",
        "cache.per_teacher=false",
        *DISTILL,
        "distill.loop.epochs=1",
        "distill.loop.max_steps=4",
    )
    run_cli("cache", *args)
    cached = run_cli("distill", *args)
    online = tmp_path / "online"
    run_cli("distill", *args, "distill.mode=online", f"run.out_dir={online}")
    assert "agreement with teachers" in cached.stdout
    a, b = steps(tmp_path / S0), steps(online / S0)
    assert [s["step"] for s in a] == [1, 2, 3, 4] == [s["step"] for s in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= EXACT * abs(y["loss"]), (x, y)
        assert abs(x["kl"] - y["kl"]) <= EXACT * abs(y["kl"]), (x, y)
    assert_same_weights(weights(tmp_path / S0), weights(online / S0), EXACT)
    m = json.loads((tmp_path / S0 / "metrics.json").read_text())
    chosen = m["selected"]
    assert {"test_acc", "test_teacher_agreement", "test_teacher_kl", "test_teacher_acc"} <= set(
        chosen
    )
    assert m["selection_split"] == "val" and "val_acc" in chosen


@pytest.mark.slow
@pytest.mark.numerics
def test_two_process_distill_equals_one_process_and_mismatch_is_refused(tmp_path, teachers):
    args = cache_args(
        tmp_path, teachers, *F64, *DISTILL, "distill.loop.epochs=1", "distill.loop.max_steps=3"
    )
    run_cli("cache", *args)
    run_cli("distill", *args, f"run.out_dir={tmp_path}")
    # a second run shares the first one's cache: its `cache` step finds it complete
    two, shared = tmp_path / "two", f"cache.dir={tmp_path / 'cache' / 'data'}"
    reuse = run_cli("cache", *args, f"run.out_dir={two}", shared)
    assert "reusing the complete cache" in reuse.stdout and "0 rows written" in reuse.stdout
    run_cli("distill", *args, f"run.out_dir={two}", shared, processes=2)
    assert_same_weights(weights(tmp_path / S0), weights(two / S0), EXACT)

    for change in ("data.pad=2", f"cache.dir={tmp_path / 'nowhere'}"):  # not the cache it reads
        bad = run_cli("distill", *args, change, check=False)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert "reads cache" in bad.stderr and "not complete" in bad.stderr


@pytest.mark.slow
def test_each_loss_trains_from_a_cache_it_can_read(tmp_path, teachers, reference_cache):
    """`distill.kd.loss` picks the loss, whatever else the configuration sets: DIST from full
    rows, DKD (with its warm-up) and LS from a top-k cache's extras, which reach the loss
    through the loader; each logs its own named terms."""
    short = [*DISTILL, "distill.loop.epochs=1", "distill.loop.max_steps=2"]
    copy_of(reference_cache, tmp_path)
    run_cli("distill", *cache_args(tmp_path, teachers, *short, "distill.kd.loss=dist"))
    assert {"loss", "inter", "intra", "ce"} == set(steps(tmp_path / S0)[0]) - {"step", "time", "lr"}
    topk = ["cache.storage=topk", "cache.topk=3", "cache.per_teacher=false"]
    top = tmp_path / "top"
    run_cli("cache", *cache_args(top, teachers, *topk))
    for loss, terms in (("dkd", {"tckd", "nckd", "dkd_ramp"}), ("ls", {"kl"})):
        out = [f"run.out_dir={top / loss}", f"cache.dir={cdir(top)}", f"distill.kd.loss={loss}"]
        args = cache_args(top, teachers, *topk, *short, *out)
        assert "reusing the complete cache" in run_cli("cache", *args).stdout
        run_cli("distill", *args)
        logged = steps(top / loss / S0)
        assert terms <= set(logged[0]) and all(math.isfinite(s["loss"]) for s in logged)


@pytest.mark.slow
def test_ce_baseline_needs_no_teachers(tmp_path):
    proc = run_cli(
        "distill-ce",
        "--config",
        "tests/configs/base.yaml",
        f"run.out_dir={tmp_path}",
        "data.train_subset=150",
        "data.image_size=8",
        "data.pad=1",
        "distill.loop.batch_size=32",
        "distill.loop.epochs=1",
        "logging.progress=false",
    )
    assert "distill-ce:seed0: student test acc" in proc.stdout
    chosen = json.loads((tmp_path / "distill-ce/seed0/metrics.json").read_text())["selected"]
    assert "test_teacher_agreement" not in chosen and 0 <= chosen["test_acc"] <= 1
