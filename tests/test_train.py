"""The shared training loop, end to end through the CLI: DDP equivalence, exact resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from common.checkpoint import load_model
from tests.conftest import PY, ROOT, cli_env, run_cli
from tests.equivalence import EXACT, F64, assert_same_weights, max_weight_diff, weights

SMALL = [
    "data.image_size=8",
    "data.pad=1",
    "data.hflip=false",
    "train.model.name=cifar_resnet20",
    "train.loop.batch_size=32",
    "train.loop.optim.lr=0.05",
    "train.loop.optim.warmup_epochs=0",
    "logging.progress=false",
]


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("accum", [1, 2])
def test_two_process_ddp_equals_one_process(tmp_path, accum):
    args = [
        "train",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        *SMALL,
        *F64,
        "train.loop.epochs=1",
        "train.loop.max_steps=3",
        f"train.loop.grad_accum={accum}",
        "train.loop.log_every=1",
    ]
    run_cli(*args, f"run.out_dir={tmp_path / 'one'}")
    run_cli(*args, f"run.out_dir={tmp_path / 'two'}", processes=2)
    one, two = weights(tmp_path / "one/train"), weights(tmp_path / "two/train")
    assert {t.dtype for t in [*one.values(), *two.values()] if t.is_floating_point()} == {
        torch.float64
    }
    assert_same_weights(one, two, EXACT)
    m1 = json.loads((tmp_path / "one/train/metrics.json").read_text())
    m2 = json.loads((tmp_path / "two/train/metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["last"]["test_num_samples"] == m2["last"]["test_num_samples"] == 359
    assert m1["last"]["test_acc"] == m2["last"]["test_acc"]
    # the logged loss is the global batch's, not rank 0's half of it
    s1, s2 = (
        [json.loads(x)["loss"] for x in (tmp_path / f"{r}/train/steps.jsonl").open()]
        for r in ("one", "two")
    )
    assert len(s1) == len(s2) == 3
    assert all(abs(a - b) <= EXACT * a for a, b in zip(s1, s2)), (s1, s2)
    if accum == 1:
        # the check has teeth: the same 2-process run with each rank normalising its own half
        # of the batch (no BatchNorm synchronisation) is far outside the bound
        run_cli(
            *args, f"run.out_dir={tmp_path / 'unsynced'}", "train.loop.sync_bn=false", processes=2
        )
        assert max_weight_diff(one, weights(tmp_path / "unsynced/train")) > 1e-3


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path):
    args = [
        "train",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        *SMALL,
        "train.loop.epochs=2",
        "train.loop.checkpoint_every_steps=3",
        "train.loop.keep_checkpoints=1",
    ]
    run_cli(*args, f"run.out_dir={tmp_path / 'straight'}")

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [PY, "-m", "launch", *args, f"run.out_dir={out}"],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpts = out / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(ckpts.glob("ckpt-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train" / "model").exists(), "the run finished before it was killed"
    [ckpt] = list(ckpts.glob("ckpt-*"))

    resumed = run_cli(*args, f"run.out_dir={out}")
    assert "resumed from" in resumed.stdout
    assert_same_weights(weights(tmp_path / "straight/train"), weights(out / "train"), atol=0)
    m = json.loads((out / "train/metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert ckpt.name.startswith("ckpt-")


@pytest.mark.slow
def test_cli_train_on_digits_learns_and_saves_a_rebuildable_model(tmp_path):
    proc = run_cli(
        "train",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        f"run.out_dir={tmp_path}",
        "train.loop.epochs=3",
        "logging.progress=false",
    )
    assert "metrics in" in proc.stdout
    metrics = json.loads((tmp_path / "train/metrics.json").read_text())
    assert metrics["last"]["test_acc"] > 0.8  # chance is 0.1
    assert metrics["selection_split"] == "test" and len(metrics["history"]) == 3
    model, spec = load_model(tmp_path / "train/model")
    assert spec["name"] == "cifar_resnet20" and spec["num_classes"] == 10
    assert (tmp_path / "train/config.yaml").is_file()
    assert sum(p.numel() for p in model.parameters()) > 0
