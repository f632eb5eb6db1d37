"""BatchNorm statistics: recalibration (EagleEye's adaptive BN) and the eval-collapse warning."""

from __future__ import annotations

import functools
import json

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from common.bnstats import eval_collapse, recalibrate_bn
from common.config import DataConfig
from common.data import build_splits, make_loader
from common.evaluate import evaluate
from common.models import build_model
from tests.conftest import ROOT, run_cli


@functools.cache
def digits():
    return build_splits(DataConfig(name="digits", image_size=8, augment="none"), 0)


def trained() -> torch.nn.Module:
    """A small VGG trained for 10 epochs on digits (plain SGD, BN momentum 0.1)."""
    torch.manual_seed(0)
    model = build_model("cifar_vgg11", 10, cfg=[16, "M", 32])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = digits().train
    keys = [(i, 0) for i in range(len(train))]
    for _ in range(10):
        for batch in make_loader(train, [keys[i : i + 64] for i in range(0, len(keys), 64)], 0):
            F.cross_entropy(model(batch["image"]), batch["label"]).backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def accuracy(model) -> float:
    return evaluate(model, digits().test, Accelerator(cpu=True), batch_size=128)["acc"]


def test_recalibration_restores_a_stale_models_accuracy():
    model = trained()
    good = accuracy(model)
    assert good > 0.8
    with torch.no_grad():  # stale: the statistics of another network (as after pruning)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.mul_(-3.0).add_(1.0)
                m.running_var.mul_(20.0)
    stale = accuracy(model)
    assert stale < good - 0.3
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    used = recalibrate_bn(model, digits().train, num_batches=8, batch_size=64)
    assert used == 512 and not model.training
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    assert accuracy(model) > max(good - 0.03, stale + 0.3)
    # the same samples every time: replicated models stay bit-identical
    again = trained()
    recalibrate_bn(again, digits().train, num_batches=8, batch_size=64)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_eval_collapse_warns_on_stale_statistics_only():
    model = trained()
    images = torch.stack([digits().test[(i, -1)]["image"] for i in range(32)])
    assert eval_collapse(model, images) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # running variances far above the activations': eval output ~ beta
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1e12)
    message = eval_collapse(model, images)
    assert message is not None and "BN momentum" in message and "recalibrate" in message
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or k.endswith("running_var") for k, v in before.items())
    assert not model.training


def test_trainer_recalibrates_before_evaluation_where_asked(tmp_path):
    """The issue's case: torchvision's MobileNetV3 (BN momentum 0.01) after 40 steps. Its
    running statistics are still near 0 / 1, eval-mode outputs collapse to one class and the
    run says so; `loop.recalibrate_bn` re-estimates them before each evaluation."""
    args = [
        "train",
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        "train.model.name=tv_mobilenet_v3_small",
        "data.image_size=32",
        "train.loop.epochs=2",
    ]
    stale = run_cli(*args, f"run.out_dir={tmp_path / 'stale'}")
    assert "BN momentum [0.01]" in stale.stdout and "loop.recalibrate_bn" in stale.stdout
    fixed = run_cli(*args, f"run.out_dir={tmp_path / 'fixed'}", "train.loop.recalibrate_bn=4")
    assert "BN momentum" not in fixed.stdout

    def acc(out):
        metrics = json.loads(
            (out / "train" / "tv_mobilenet_v3_small-s0" / "metrics.json").read_text()
        )
        return metrics["selected"]["test_acc"]

    assert acc(tmp_path / "stale") < 0.2  # chance is 0.1
    assert acc(tmp_path / "fixed") > acc(tmp_path / "stale") + 0.3
