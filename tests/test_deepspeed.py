"""Launcher configs in configs/accelerate/ and the trainer under DeepSpeed ZeRO-1/2/3 (CPU, gloo).

DeepSpeed runs on these CPU machines (deepspeed 0.19.8 installed with DS_BUILD_OPS=0): the
engine trains over gloo, checkpoints its partitioned optimizer state and resumes from it.

Equivalence runs in float64 (`run.dtype=float64`), but ZeRO's optimizer keeps float32 master
weights whatever the model's dtype (deepspeed/runtime/zero/stage_1_and_2.py), so a ZeRO run
cannot equal a float64 run to 1e-9: each step rounds the weights to float32. Those tests bound
the difference by a noise floor measured on this machine (`tests/equivalence.py`
`float32_master_bound`), not by a constant.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from common.config import load_config
from common.distributed import configure_deepspeed
from common.models import build_model
from launch.config import Config
from tests.artifacts import DATA, cache_args
from tests.conftest import ROOT, cli_env, interrupt, run_cli
from tests.equivalence import (
    EXACT,
    F64,
    assert_same_weights,
    float32_master_bound,
    weights,
    write_init,
)
from tests.test_distill import DISTILL, steps
from tests.test_train import SMALL, T

ACC = ROOT / "configs" / "accelerate"
ARGS = [
    "train",
    "--config",
    str(ROOT / "tests/configs/base.yaml"),
    *SMALL,
    "train.loop.epochs=1",
    "train.loop.checkpoint_every_steps=2",
    "train.loop.log_every=1",
]

# --------------------------------------------------------------------------------------------
# the config files themselves
# --------------------------------------------------------------------------------------------

EXPECTED = {
    "1gpu.yaml": ("NO", 1),
    "multigpu.yaml": ("MULTI_GPU", None),
    "multinode.yaml": ("MULTI_GPU", None),
    "cpu2.yaml": ("MULTI_GPU", 2),
    "deepspeed_zero1.yaml": ("DEEPSPEED", None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", None),
    "deepspeed_zero3.yaml": ("DEEPSPEED", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_files_are_consistent(name):
    cfg = yaml.safe_load((ACC / name).read_text())
    dtype, procs = EXPECTED[name]
    assert cfg["distributed_type"] == dtype
    assert cfg["compute_environment"] == "LOCAL_MACHINE"
    if procs is not None:
        assert cfg["num_processes"] == procs
    if name == "cpu2.yaml":
        assert cfg["use_cpu"] is True
    if name == "multinode.yaml":
        assert cfg["num_machines"] >= 2
    if dtype == "DEEPSPEED":
        stage = int(name[-6])
        ds_file = ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["zero_allow_untested_optimizer"] is True
        # filled by the trainer from the run config (no dataloader goes through prepare)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert ds[key] == "auto", key
        assert cfg["deepspeed_config"].get("zero3_init_flag") is False


def _fake_acc(ds: dict, mixed_precision: str = "no"):
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)),
        mixed_precision=mixed_precision,
    )


def test_configure_deepspeed_fills_auto_batch_keys():
    ds = json.loads((ACC / "ds_zero2.json").read_text())
    configure_deepspeed(
        _fake_acc(ds), micro_batch=8, grad_accum=2, global_batch=32, clip_grad_norm=None
    )
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 0.0
    assert ds["zero_allow_untested_optimizer"] is True


def test_configure_deepspeed_rejects_conflicts_and_zero3():
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4"):
        configure_deepspeed(
            _fake_acc(ds), micro_batch=8, grad_accum=1, global_batch=16, clip_grad_norm=None
        )
    ds3 = json.loads((ACC / "ds_zero3.json").read_text())
    with pytest.raises(ValueError, match="ZeRO-3"):
        configure_deepspeed(
            _fake_acc(ds3), micro_batch=8, grad_accum=1, global_batch=16, clip_grad_norm=None
        )


def test_configure_deepspeed_turns_mixed_precision_into_torch_autocast():
    # accelerate fills `bf16.enabled: auto` with true, which casts the weights to bf16
    ds = json.loads((ACC / "ds_zero2.json").read_text()) | {"bf16": {"enabled": True}}
    configure_deepspeed(
        _fake_acc(ds, "bf16"), micro_batch=8, grad_accum=1, global_batch=16, clip_grad_norm=None
    )
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    with pytest.raises(ValueError, match="mixed_precision=bf16"):
        configure_deepspeed(
            _fake_acc(ds, "fp16"), micro_batch=8, grad_accum=1, global_batch=16, clip_grad_norm=None
        )


# --------------------------------------------------------------------------------------------
# real launches
# --------------------------------------------------------------------------------------------


def _launch(
    config_file: str | None,
    out: Path,
    *extra: str,
    timeout: float = 400,
    use_cpu_env=False,
    args: list[str] = ARGS,
    launcher: str = "inprocess",
):
    """One process, or `accelerate launch --config_file configs/accelerate/<config_file>`
    (forked workers with the environment accelerate computes from that file, or the real
    launcher with `launcher="subprocess"`)."""
    env = cli_env()
    if not use_cpu_env:
        env.pop("ACCELERATE_USE_CPU", None)  # the config files alone must be enough
    flags = None if config_file is None else ["--config_file", str(ACC / config_file)]
    return run_cli(
        *args,
        *extra,
        f"run.out_dir={out}",
        flags=flags,
        env=env,
        timeout=timeout,
        launcher=launcher,
    )


@pytest.fixture(scope="module")
def inits(tmp_path_factory) -> tuple[str, str]:
    """The student's initial weights as float64 files: as built, and moved by one float32
    rounding (for the noise floor of ZeRO's float32 master weights)."""
    d = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10)
    return (
        f"train.model.weights={write_init(d / 'init.safetensors', model)}",
        f"train.model.weights={write_init(d / 'perturbed.safetensors', model, perturb=True)}",
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inits) -> Path:
    """One process, three float64 steps: what every launcher below must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    _launch(None, out, "train.loop.max_steps=3", inits[0], *F64)
    return out / T


@pytest.fixture(scope="module")
def zero_bound(tmp_path_factory, inits, reference) -> float:
    """How far a ZeRO run (float32 master weights) may be from `reference`: see the module
    docstring and `float32_master_bound`."""
    out = tmp_path_factory.mktemp("floor")
    _launch(None, out, "train.loop.max_steps=3", inits[1], *F64)
    bound = float32_master_bound(weights(reference), weights(out / T), steps=3)
    assert bound < 1e-4  # still far below what a wrong batch split or unsynced BN gives
    return bound


@pytest.fixture(scope="module")
def zero2_straight(tmp_path_factory, inits) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    _launch("deepspeed_zero2.yaml", out, "train.loop.max_steps=3", inits[0], *F64)
    return out / T


def _metrics(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.numerics
def test_cpu2_config_starts_two_ranks_of_one_group(tmp_path, inits, reference):
    """Through the real `accelerate launch` (the other launches here fork their workers with
    the environment accelerate computes): the shipped config file starts one gloo group."""
    args = ("train.loop.max_steps=3", inits[0], *F64)
    _launch("cpu2.yaml", tmp_path, *args, launcher="subprocess")
    m = _metrics(tmp_path / T)
    # world_size 2 and a test count summed over both ranks: one group, not two rank-0 copies
    assert m["world_size"] == 2
    assert m["last"]["test_num_samples"] == 359
    assert_same_weights(weights(reference), weights(tmp_path / T), EXACT)


@pytest.mark.slow
@pytest.mark.numerics
def test_deepspeed_zero1_trains_like_ddp(tmp_path, inits, reference, zero_bound):
    # with the CPU recipe's ACCELERATE_USE_CPU=1 exported (slurm/stage.sbatch does so), which
    # would make accelerate drop DeepSpeed silently unless common/distributed.py clears it
    _launch(
        "deepspeed_zero1.yaml",
        tmp_path,
        "train.loop.max_steps=3",
        inits[0],
        *F64,
        use_cpu_env=True,
    )
    m = _metrics(tmp_path / T)
    assert m["world_size"] == 2 and m["last"]["test_num_samples"] == 359
    assert_same_weights(weights(reference), weights(tmp_path / T), zero_bound)
    # the DeepSpeed engine really ran: its checkpoint holds one optimizer shard per rank
    ckpt = sorted((tmp_path / T / "checkpoints").glob("ckpt-*"))[-1]
    assert len(list((ckpt / "deepspeed" / "engine").glob("zero_pp_rank_*_optim_states.pt"))) == 2


@pytest.mark.slow
@pytest.mark.numerics
def test_deepspeed_zero2_trains_like_ddp_and_shards_optimizer_state(
    zero2_straight, reference, zero_bound
):
    m = _metrics(zero2_straight)
    assert m["world_size"] == 2 and m["last"]["test_num_samples"] == 359
    assert_same_weights(weights(reference), weights(zero2_straight), zero_bound)
    ckpt = sorted((zero2_straight / "checkpoints").glob("ckpt-*"))[-1]
    shards = sorted(p.name for p in (ckpt / "deepspeed" / "engine").glob("zero_pp_rank_*"))
    assert shards == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (ckpt / "manifest.json").is_file()


@pytest.mark.slow
def test_deepspeed_zero2_resumes_exactly_from_its_sharded_checkpoint(
    tmp_path, inits, zero2_straight
):
    shutil.copytree(zero2_straight.parents[1], tmp_path, dirs_exist_ok=True)
    interrupt(tmp_path / T, after_step=2)  # as if killed after the step-2 checkpoint
    proc = _launch("deepspeed_zero2.yaml", tmp_path, "train.loop.max_steps=3", inits[0], *F64)
    assert "resumed from" in proc.stdout and "ckpt-000000002" in proc.stdout, proc.stdout
    # momentum buffers came back from the shards: bit-identical to the straight run
    assert_same_weights(weights(zero2_straight), weights(tmp_path / T), atol=0)


def _first_loss(stage_dir: Path) -> float:
    return json.loads((stage_dir / "steps.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.slow
@pytest.mark.numerics
def test_deepspeed_bf16_trains_under_torch_autocast(tmp_path, inits, reference):
    """run.mixed_precision=bf16 under ZeRO means float32 weights and autocast, as under DDP
    (DeepSpeed's own bf16 mode casts the weights and then fails on float32 images).

    Compared at the first step, before any update can amplify rounding: both runs compute
    the same bf16-autocast forward pass of the same weights on the same micro-batches."""
    bf16 = ("train.loop.max_steps=3", "run.mixed_precision=bf16", inits[0])
    _launch("cpu2.yaml", tmp_path / "ddp", *bf16)
    _launch("deepspeed_zero2.yaml", tmp_path, *bf16)
    w = weights(tmp_path / T)
    floats = [t for t in w.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)
    ddp, zero, exact = (_first_loss(d) for d in (tmp_path / "ddp" / T, tmp_path / T, reference))
    assert abs(zero - ddp) <= 2**-8 * ddp  # at most one bf16 rounding apart (8-bit mantissa)
    # and bf16 really ran: its loss is further from the float64 one than float32 rounding
    # (2^-24, ~6e-8 relative) could ever put it; bf16 puts it ~1e-3 away
    assert abs(zero - exact) > 1e-5 * exact


def _online(tmp_path: Path, teachers: list[str], *extra: str) -> list[str]:
    return [
        "distill",
        *cache_args(
            tmp_path,
            teachers,
            *DISTILL,
            *F64,
            "distill.mode=online",
            "distill.loop.epochs=1",
            *extra,
        ),
    ]


@pytest.fixture(scope="module")
def student_inits(tmp_path_factory) -> tuple[str, str]:
    """The base config's student's initial weights, as built and moved by one float32 rounding."""
    cfg = load_config(Config, ROOT / "tests/configs/base.yaml").distill.student
    d = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    model = build_model(cfg.name, 10, **cfg.kwargs)
    save = {"init": False, "perturbed": True}
    return tuple(  # type: ignore[return-value]
        f"distill.student.weights={write_init(d / f'{k}.safetensors', model, perturb=p)}"
        for k, p in save.items()
    )


@pytest.fixture(scope="module")
def zero3_straight(tmp_path_factory, teachers, student_inits) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    args = _online(out, teachers, student_inits[0])
    out.joinpath("stdout").write_text(
        _launch("deepspeed_zero3.yaml", out, "distill.loop.max_steps=3", args=args).stdout
    )
    return out


@pytest.mark.slow
@pytest.mark.numerics
def test_zero3_shards_the_live_teacher_and_distills_like_one_process(
    tmp_path,
    teachers,
    student_inits,
    zero3_straight,
):
    for name, init in zip(("one", "floor"), student_inits):
        args = _online(tmp_path / name, teachers, init)
        _launch(None, tmp_path / name, "distill.loop.max_steps=3", args=args)
    stdout = (zero3_straight / "stdout").read_text()
    shared = re.search(
        r"teacher sharded by ZeRO-3 over 2 processes: this process holds ([\d,]+) of its "
        r"([\d,]+) parameters",
        stdout,
    )
    assert shared, stdout[-3000:]
    local, total = (int(g.replace(",", "")) for g in shared.groups())
    assert total == 2 * sum(p.numel() for p in build_model("cifar_resnet20", 10).parameters())
    assert local <= total / 2 * 1.01  # rank 0 keeps its half (plus alignment padding)

    one, zero3 = tmp_path / "one" / "distill" / "seed0", zero3_straight / "distill" / "seed0"
    # the sharded ensemble computes the same soft targets: same teacher accuracy and, before
    # the student's first update, the same KL up to float32 rounding (ZeRO-3 shards float32
    # weights only, so the frozen teacher runs in float32 in this float64 run: ~1e-7 relative
    # measured, bounded by 2^-20)
    a, b = _metrics(one)["last"], _metrics(zero3)["last"]
    assert a["test_teacher_acc"] == b["test_teacher_acc"]
    assert "the frozen teacher runs in float32" in (zero3_straight / "stdout").read_text()
    first = steps(one)[0]["kl"], steps(zero3)[0]["kl"]
    assert abs(first[0] - first[1]) <= 2**-20 * first[0], first
    # the student trains under ZeRO-2, whose float32 master weights set the bound
    bound = float32_master_bound(weights(one), weights(tmp_path / "floor" / "distill" / "seed0"), 3)
    assert_same_weights(weights(one), weights(zero3), bound)
    # the student itself trained under ZeRO-2: one optimizer shard per rank
    ckpt = sorted((zero3 / "checkpoints").glob("ckpt-*"))[-1]
    assert len(list((ckpt / "deepspeed" / "engine").glob("zero_pp_rank_*_optim_states.pt"))) == 2


@pytest.mark.slow
def test_zero3_online_distill_resumes_exactly(tmp_path, teachers, student_inits, zero3_straight):
    args = [*_online(tmp_path, teachers, student_inits[0]), "distill.loop.checkpoint_every_steps=1"]
    _launch("deepspeed_zero3.yaml", tmp_path, "distill.loop.max_steps=3", args=args)
    interrupt(tmp_path / "distill" / "seed0", after_step=2)
    proc = _launch("deepspeed_zero3.yaml", tmp_path, "distill.loop.max_steps=3", args=args)
    assert "resumed from" in proc.stdout and "ckpt-000000002" in proc.stdout, proc.stdout
    # student weights and ZeRO-2 optimizer shards came back; the teacher is rebuilt from disk
    assert_same_weights(
        weights(zero3_straight / "distill" / "seed0"),
        weights(tmp_path / "distill" / "seed0"),
        atol=0,
    )


@pytest.mark.slow
@pytest.mark.numerics
def test_sparsity_trains_under_zero2_with_the_penalty_in_the_loss(tmp_path, teachers):
    """One step from a random-init model, whose train-mode BatchNorms make the dynamics too
    sensitive for a multi-step floor (a 6e-8 nudge of the weights moves the next loss by 1e-5).
    One step has no dynamics to amplify anything: from the same (float32-exact) weights the
    float64 gradients agree, and ZeRO's float32 master rounds the updated weights once
    (<= 2^-24 relative) after a float32 reduction of the gradient (<= lr 2^-24 |g|, smaller
    still), so the runs agree to 2^-22 max|w|; a dropped penalty moves gamma by lr s = 2.5e-3."""
    args = [
        "sparsity",
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        *DATA,
        *F64,
        f"sparsity.init={teachers[0]}",
        "sparsity.s=0.05",
        "sparsity.loop.batch_size=32",
        "sparsity.loop.epochs=1",
        "sparsity.loop.max_steps=1",
        "sparsity.loop.optim.lr=0.05",
        "sparsity.loop.optim.warmup_epochs=0",
    ]
    _launch(None, tmp_path / "one", args=args)
    in_loss = "sparsity.penalty_in_loss=true"
    _launch(None, tmp_path / "in_loss", in_loss, args=args)
    _launch("deepspeed_zero2.yaml", tmp_path / "zero2", in_loss, args=args)
    one = weights(tmp_path / "one" / "sparsity")
    # the penalty in the loss is the subgradient after backward, exactly (float64)
    assert_same_weights(one, weights(tmp_path / "in_loss" / "sparsity"), EXACT)
    bound = 2.0**-22 * max(t.abs().max().item() for t in one.values() if t.is_floating_point())
    assert_same_weights(one, weights(tmp_path / "zero2" / "sparsity"), bound)
    with pytest.raises(AssertionError, match="sparsity.penalty_in_loss=true"):
        _launch("deepspeed_zero2.yaml", tmp_path / "refused", args=args)
    # testing only the selected epoch reloads its weights into the bare model: refused, with why
    no_test = "sparsity.loop.test_every_epoch=false"
    with pytest.raises(AssertionError, match="test_every_epoch: false.* set it to true"):
        _launch("deepspeed_zero2.yaml", tmp_path / "refused_test", in_loss, no_test, args=args)
    # so does a weight average beside the engine
    ema = "sparsity.loop.ema_decay=0.9"
    with pytest.raises(AssertionError, match="ema_decay` averages.* leave it unset"):
        _launch("deepspeed_zero2.yaml", tmp_path / "refused_ema", in_loss, ema, args=args)
