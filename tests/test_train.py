"""The shared training loop, end to end through the CLI: DDP equivalence, exact resume."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint import load_model
from tests.conftest import PY, ROOT, cli_env, run_cli
from tests.equivalence import EXACT, F64, assert_same_weights, max_weight_diff, weights

T = "train/cifar_resnet20-s0"
"""The one teacher member SMALL trains: `train/<model>-s<seed>`."""
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
        str(ROOT / "tests/configs/base.yaml"),
        *SMALL,
        *F64,
        "train.loop.epochs=1",
        "train.loop.max_steps=3",
        f"train.loop.grad_accum={accum}",
        "train.loop.log_every=1",
    ]
    run_cli(*args, f"run.out_dir={tmp_path / 'one'}")
    run_cli(*args, f"run.out_dir={tmp_path / 'two'}", processes=2)
    one, two = weights(tmp_path / "one" / T), weights(tmp_path / "two" / T)
    assert {t.dtype for t in [*one.values(), *two.values()] if t.is_floating_point()} == {
        torch.float64
    }
    assert_same_weights(one, two, EXACT)
    m1 = json.loads((tmp_path / "one" / T / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / T / "metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["last"]["test_num_samples"] == m2["last"]["test_num_samples"] == 359
    assert m1["last"]["val_num_samples"] == m2["last"]["val_num_samples"] == 144
    assert m1["last"]["test_acc"] == m2["last"]["test_acc"]
    # per-image predictions gathered from both ranks, in sample order: those of one process
    p1, p2 = (np.load(tmp_path / r / T / "test_predictions.npz") for r in ("one", "two"))
    assert all(np.array_equal(p1[k], p2[k]) for k in ("sample_id", "label", "pred"))
    assert list(p2["sample_id"]) == list(range(359))
    # the logged loss is the global batch's, not rank 0's half of it
    s1, s2 = (
        [json.loads(x)["loss"] for x in (tmp_path / r / T / "steps.jsonl").open()]
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
        assert max_weight_diff(one, weights(tmp_path / "unsynced" / T)) > 1e-3


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path):
    """With a weight average (`loop.ema_decay`): what is saved is the average, which depends
    on every step since the first, so it is identical only if the checkpoint restored it."""
    args = [
        "train",
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        *SMALL,
        "train.loop.epochs=2",
        "train.loop.checkpoint_every_steps=3",
        "train.loop.keep_checkpoints=1",
        "train.loop.ema_decay=0.9",
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
    ckpts = out / T / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(ckpts.glob("ckpt-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / T / "model").exists(), "the run finished before it was killed"
    [ckpt] = list(ckpts.glob("ckpt-*"))

    resumed = run_cli(*args, f"run.out_dir={out}")
    assert "resumed from" in resumed.stdout
    assert_same_weights(weights(tmp_path / "straight" / T), weights(out / T), atol=0)
    m = json.loads((out / T / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert ckpt.name.startswith("ckpt-") and m["ema_decay"] == 0.9
    # the trained weights resumed identically too, and the saved model is not them
    [last] = list(ckpts.glob("ckpt-*"))
    [straight] = list((tmp_path / "straight" / T / "checkpoints").glob("ckpt-*"))
    trained = load_file(str(last / "model.safetensors"))
    assert_same_weights(load_file(str(straight / "model.safetensors")), trained, atol=0)
    assert max_weight_diff(trained, weights(out / T)) > 1e-3


@pytest.mark.slow
def test_cli_train_on_digits_learns_and_saves_a_rebuildable_model(tmp_path):
    proc = run_cli(
        "train",
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        f"run.out_dir={tmp_path}",
        "train.loop.epochs=3",
        "logging.progress=true",
        "logging.progress_every_s=0.001",  # a line at every 10% even of these short epochs
    )
    assert f"[{T.replace('/', ':')}] done" in proc.stdout
    # not a terminal (as a SLURM .out file): whole progress lines on stdout, no bar frames
    assert "\r" not in proc.stdout + proc.stderr
    lines = re.findall(
        r"^epoch (\d)/3: (\d+)/20 \(\d+%\)(?:, loss [\d.]+, lr \S+)?, \S+ steps/s, "
        r"\d+ images/s, ETA \S+$",
        proc.stdout,
        flags=re.M,
    )
    assert {e for e, _ in lines} == {"1", "2", "3"} and ("3", "20") in lines
    metrics = json.loads((tmp_path / T / "metrics.json").read_text())
    assert metrics["selected"]["test_acc"] > 0.8  # chance is 0.1
    assert metrics["splits"] == {"train": 1294, "val": 144, "test": 359}
    history = metrics["history"]
    assert metrics["selection_split"] == "val" and len(history) == 3
    # the kept epoch is the best on validation (the earliest of ties), whatever test says
    best_val = max(h["val_acc"] for h in history)
    assert metrics["selected"] == next(h for h in history if h["val_acc"] == best_val)
    model, spec = load_model(tmp_path / T / "model")
    assert spec["name"] == "cifar_resnet20" and spec["num_classes"] == 10
    assert (tmp_path / T / "config.yaml").is_file() and (tmp_path / T / "key.json").is_file()
    assert not (tmp_path / T / "best").exists()  # folded into model/
    with torch.no_grad():  # model/ holds the selected epoch's weights: its accuracy is its
        from accelerate import Accelerator

        from common.config import DataConfig
        from common.data import build_splits
        from common.evaluate import evaluate

        splits = build_splits(DataConfig(name="digits", image_size=16, pad=2, hflip=False), 0)
        acc = evaluate(model, splits.test, Accelerator(cpu=True), batch_size=64)["acc"]
    assert acc == metrics["selected"]["test_acc"]
    # beside it, its prediction for every test image (what paired comparisons read)
    table = np.load(tmp_path / T / "test_predictions.npz")
    assert list(table["sample_id"]) == list(range(359))
    assert list(table["label"]) == list(splits.test.source.labels)
    assert (table["pred"] == table["label"]).mean() == metrics["selected"]["test_acc"]


@pytest.mark.slow
def test_testing_only_the_selected_epoch_reports_what_testing_every_epoch_does(tmp_path):
    """`loop.test_every_epoch: false`: validation every epoch, the test split only for the
    selected epoch (from the weights saved when it was selected) and the last. A user reads
    the same numbers as when every epoch is tested, and the same as `model/` gives; the node
    key does not change, so the option never makes finished work stale."""
    args = ["train", "--config", str(ROOT / "tests/configs/base.yaml"), *SMALL, *F64]
    # one validation image: once the model gets it right, later epochs tie and the earlier one
    # is kept, so the selected epoch comes before the last and its test pass runs on weights
    # reloaded from `best/` (a wrong reload would report the last epoch's accuracy instead)
    args += ["train.loop.epochs=4", "data.val_fraction=0.001"]
    run_cli(*args, f"run.out_dir={tmp_path / 'every'}")
    run_cli(*args, f"run.out_dir={tmp_path / 'once'}", "train.loop.test_every_epoch=false")

    def read(name: str, file: str) -> dict:
        return json.loads((tmp_path / name / T / file).read_text())

    every, once = read("every", "metrics.json"), read("once", "metrics.json")
    assert read("every", "key.json")["key"] == read("once", "key.json")["key"]
    assert [h["val_acc"] for h in once["history"]] == [h["val_acc"] for h in every["history"]]
    selected, last = once["selected"]["epoch"], once["last"]["epoch"]
    assert once["splits"]["val"] == 1 and selected < last == 4
    assert [h["epoch"] for h in once["history"] if "test_acc" in h] == [selected, last]
    assert once["selected"]["test_acc"] != once["last"]["test_acc"]

    def numbers(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "elapsed_s"}

    assert numbers(once["selected"]) == numbers(every["selected"])
    assert numbers(once["last"]) == numbers(every["last"])
    assert_same_weights(weights(tmp_path / "once" / T), weights(tmp_path / "every" / T), atol=0)
    model, _ = load_model(tmp_path / "once" / T / "model")
    with torch.no_grad():
        from accelerate import Accelerator

        from common.config import DataConfig
        from common.data import build_splits
        from common.evaluate import evaluate

        splits = build_splits(DataConfig(name="digits", image_size=8, pad=1, hflip=False), 0)
        acc = evaluate(model, splits.test, Accelerator(cpu=True), batch_size=32)["acc"]
    assert acc == once["selected"]["test_acc"]


@pytest.mark.slow
def test_resume_under_a_changed_config_is_refused(tmp_path):
    """A run stopped after a checkpoint, restarted with another learning rate, must not mix
    the two: refused with the differing key, unless `loop.resume=force` (then recorded)."""
    args = [
        "train",
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        *SMALL,
        f"run.out_dir={tmp_path}",
        "train.loop.epochs=1",
        "train.loop.max_steps=4",
        "train.loop.checkpoint_every_steps=2",
    ]
    run_cli(*args)
    node = tmp_path / T
    for done in ("model", "metrics.json", "key.json", "config.yaml"):  # as if killed at step 4
        path = node / done
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    refused = run_cli(*args, "train.loop.optim.lr=0.5", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "train.loop.optim.lr: 0.05 -> 0.5" in refused.stderr, refused.stderr
    assert "resume=force" in refused.stderr
    assert not (node / "model").exists() and not (node / "key.json").exists()
    forced = run_cli(*args, "train.loop.optim.lr=0.5", "train.loop.resume=force")
    assert "resumed from" in forced.stdout
    m = json.loads((node / "metrics.json").read_text())
    assert m["resumed_with_changed_config"] == ["train.loop.optim.lr: 0.05 -> 0.5"]


@pytest.mark.slow
def test_diverging_run_fails_and_saves_nothing(tmp_path):
    proc = run_cli(
        "train",
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        *SMALL,
        f"run.out_dir={tmp_path}",
        "train.loop.epochs=1",
        "train.loop.log_every=1",
        "train.loop.optim.lr=1e6",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "diverged" in proc.stderr and "train.loop.optim.lr" in proc.stderr
    node = tmp_path / T
    assert not any((node / f).exists() for f in ("model", "metrics.json", "key.json", "best"))


@pytest.mark.slow
@pytest.mark.extended  # inductor compiles for ~40 s; the eager path is proved everywhere else
def test_compiled_training_equals_eager(tmp_path):
    """`run.compile`: the same 3 steps through inductor land on the eager run's weights (in
    float64: to rounding, inductor fuses and reorders sums) and save plain state dicts."""
    args = ["train", "--config", str(ROOT / "tests/configs/base.yaml"), *SMALL, *F64]
    args += ["train.loop.epochs=1", "train.loop.max_steps=3", "logging.progress=false"]
    run_cli(*args, f"run.out_dir={tmp_path / 'eager'}")
    run_cli(*args, f"run.out_dir={tmp_path / 'compiled'}", "run.compile=true", timeout=900)
    eager, compiled = weights(tmp_path / "eager" / T), weights(tmp_path / "compiled" / T)
    assert eager.keys() == compiled.keys()  # no `_orig_mod.` prefixes
    assert_same_weights(eager, compiled, 1e-9)


def test_weight_average_is_the_exponential_average_of_every_step():
    """`common.ema` against the formula, in float64: the first update copies, the one after n
    others is d * average + (1 - d) * weights with d = min(decay, 1 - (1 + n)^(-3/4)) (the
    warm-up, then the decay: both reached here), BN statistics included; the batch counter is
    copied; the state round-trips through its flat dict."""
    from common.ema import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    average = WeightAverage(model, decay=0.6)
    expected, used = None, []
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3, dtype=torch.float64))  # moves the BN statistics
        now = {k: v.clone() for k, v in model.state_dict().items()}
        d = min(0.6, 1 - (1 + n) ** -0.75)
        if n:
            used.append(d)
        expected = (
            now
            if expected is None
            else {
                k: d * expected[k] + (1 - d) * v if v.is_floating_point() else v
                for k, v in now.items()
            }
        )
        average.update(model)
    assert used == [1 - 2**-0.75, 1 - 3**-0.75, 0.6]  # warm-up, then the decay
    got = average.module.state_dict()
    assert got["1.num_batches_tracked"] == 4 and average.updates == 4
    assert max_weight_diff(expected, got) <= 1e-15
    assert max_weight_diff(now, got) > 0.1  # the average is not the last weights
    again = WeightAverage(model, decay=0.6)
    again.load_state_dict(average.state_dict())
    assert again.updates == 4 and max_weight_diff(got, again.module.state_dict()) == 0
