"""L1 on BatchNorm scales: the subgradient step is the analytic one, once per optimizer step."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from common.config import DataConfig, LoopConfig, OptimConfig, RunConfig
from common.data import build_splits
from common.logging import NullLogger
from common.optim import lr_at
from common.runtime import StageContext
from common.syncbn import AllReduceBatchNorm, convert_allreduce_batchnorm
from common.trainer import CrossEntropyTask, Trainer
from prune.config import DEFAULT_SHRINK
from prune.l1 import SparsityTask, add_l1_subgradient, bn_layers, s_at, s_for_shrink


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids spin-wait stalls on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny() -> nn.Module:
    """float64, so gradients compare to 1e-12 whatever kernels the CPU picks."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([0.5, -0.3, 0.2, -0.7, 0.1, 0.4]))
    return m.double()


def batch(n: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64),
        "label": torch.arange(n) % 4,
    }


def trainer_step(model: nn.Module, task, b: dict, accum: int) -> None:
    """What `Trainer._train_step` does with the gradients: micro-batch losses / accum,
    backward each, then `after_backward` once."""
    images, labels = b["image"].chunk(accum), b["label"].chunk(accum)
    for x, y in zip(images, labels):
        (task.losses(model, {"image": x, "label": y})["loss"] / accum).backward()
    task.after_backward(model)


def reference_grad(model: nn.Module, b: dict, s: float) -> torch.Tensor:
    """d/dgamma [CE(full batch) + s * sum|gamma|] by autograd."""
    model.zero_grad()
    loss = F.cross_entropy(model(b["image"]), b["label"]) + s * model[1].weight.abs().sum()
    loss.backward()
    return model[1].weight.grad.clone()


@pytest.mark.numerics
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("in_loss", [False, True])
def test_l1_step_is_analytic_subgradient(accum, in_loss):
    s = 0.05
    model, b = tiny().eval(), batch()  # eval: BN statistics don't depend on the micro-batch
    expected = reference_grad(copy.deepcopy(model), b, s)
    task = SparsityTask(
        CrossEntropyTask(), s=s, total_steps=10, steps_per_epoch=10, penalty_in_loss=in_loss
    )
    trainer_step(model, task, b, accum)
    torch.testing.assert_close(model[1].weight.grad, expected, rtol=0, atol=1e-12)
    # and the penalty part alone is exactly s * sign(gamma), added once per step
    ce_only = reference_grad(copy.deepcopy(tiny().eval()), b, 0.0)
    torch.testing.assert_close(
        model[1].weight.grad - ce_only, s * torch.sign(model[1].weight.detach()), rtol=0, atol=1e-12
    )


def test_every_batchnorm_kind_is_regularised():
    model = convert_allreduce_batchnorm(tiny())
    assert isinstance(model[1], AllReduceBatchNorm)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(tiny())
    assert isinstance(sync[1], nn.SyncBatchNorm) and not isinstance(sync[1], nn.BatchNorm2d)
    for m in (model, sync):
        assert len(bn_layers(m)) == 1
        m[1].weight.grad = torch.zeros(6, dtype=torch.float64)
        assert add_l1_subgradient(m, 0.1) == 1
        assert torch.equal(m[1].weight.grad, 0.1 * torch.sign(m[1].weight.detach()))


def test_penalty_that_reaches_no_layer_is_an_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).double()
    task = SparsityTask(CrossEntropyTask(), s=0.1, total_steps=1, steps_per_epoch=1)
    task.losses(model, batch())["loss"].backward()
    with pytest.raises(RuntimeError, match="no BatchNorm"):
        task.after_backward(model)
    m = tiny()  # grads freed (DeepSpeed ZeRO): the message names the setting to change
    with pytest.raises(RuntimeError, match="penalty_in_loss"):
        add_l1_subgradient(m, 0.1)


def test_s_schedules():
    assert s_at(5, 100, 1e-4, "constant", 0.1) == 1e-4
    assert s_at(4, 100, 1.0, "warmup", 0.1) == pytest.approx(0.5)
    assert s_at(50, 100, 1.0, "warmup", 0.1) == 1.0
    assert s_at(0, 100, 1.0, "decay", 0.1) == 1.0
    assert s_at(75, 100, 1.0, "decay", 0.1) == pytest.approx(0.25)


@functools.cache
def _digits():
    return build_splits(DataConfig(name="digits", image_size=8, augment="none"), 0)


def _one_step(tmp_path, s: float, accum: int, in_loss: bool) -> torch.Tensor:
    """One optimizer step of the real Trainer (SGD, no momentum/decay) from a fixed init."""
    from common.models import build_model

    splits = _digits()
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            bn.weight.uniform_(-1, 1)
    loop = LoopConfig(
        epochs=1,
        batch_size=16,
        grad_accum=accum,
        max_steps=1,
        optim=OptimConfig(lr=0.5, momentum=0.0, weight_decay=0.0, schedule="constant"),
        sync_bn=False,
    )
    task = SparsityTask(
        CrossEntropyTask(), s=s, total_steps=1, steps_per_epoch=10**6, penalty_in_loss=in_loss
    )
    ctx = StageContext(
        Accelerator(cpu=True), tmp_path / f"s{s}-{accum}-{in_loss}", NullLogger(), "t"
    )
    trainer = Trainer(
        ctx=ctx,
        run=RunConfig(out_dir=str(tmp_path), dtype="float64"),
        loop=loop,
        loop_key="sparsity.loop",
        model=model,
        spec={},
        task=task,
        splits=splits,
    )
    trainer._train_step(iter(trainer_batches(trainer)))
    return torch.cat([bn.weight.detach().clone() for _, bn in bn_layers(trainer.unwrapped)])


def trainer_batches(trainer):
    from common.data import make_loader

    trainer.sampler.set_epoch(0, start_step=0)
    return make_loader(trainer.splits.train, trainer.sampler, 0)


@pytest.mark.numerics
@pytest.mark.parametrize("in_loss", [False, True])
def test_trainer_step_moves_gamma_by_lr_s_sign(tmp_path, in_loss):
    """gamma(s) - gamma(0) after one real step with 2 accumulation steps = -lr * s *
    sign(gamma): same batch, same init; the penalty is applied once, not per micro-batch."""
    s, lr, accum = 0.01, 0.5, 2
    plain = _one_step(tmp_path, 0.0, accum, in_loss)
    slim = _one_step(tmp_path, s, accum, in_loss)
    torch.manual_seed(0)
    from common.models import build_model

    ref = build_model("cifar_resnet20", 10)
    with torch.no_grad():
        for _, bn in bn_layers(ref):
            bn.weight.uniform_(-1, 1)
    sign = torch.cat([torch.sign(bn.weight.detach()) for _, bn in bn_layers(ref)])
    torch.testing.assert_close(slim - plain, -lr * s * sign.double(), rtol=0, atol=1e-12)


def test_shrink_is_s_times_the_sum_of_the_learning_rates():
    """NS's regime as arithmetic: s=1e-4 over 160 epochs of 782 steps at lr 0.1 / 0.01 / 0.001
    (x0.1 at 50% and 75%) is a total shrinkage of ~0.66; `sparsity.shrink` asks for the total
    and gets s for the run's own schedule."""
    steps_per_epoch, epochs = 782, 160
    ns = OptimConfig(lr=0.1, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    total = steps_per_epoch * epochs
    lrs = [lr_at(t, total, steps_per_epoch, ns) for t in range(total)]
    assert 1e-4 * sum(lrs) == pytest.approx(0.66, abs=0.005)
    assert pytest.approx(1e-4 * sum(lrs), abs=0.07) == DEFAULT_SHRINK
    assert s_for_shrink(1e-4 * sum(lrs), lrs) == pytest.approx(1e-4, rel=1e-12)
    # a 5-epoch cosine run at lr 0.1 needs a ~34x larger s for the same regime
    short = [lr_at(t, 5 * 782, 782, OptimConfig(lr=0.1)) for t in range(5 * 782)]
    assert 30 < s_for_shrink(0.66, short) / 1e-4 < 40
    with pytest.raises(ValueError, match="sum to 0"):
        s_for_shrink(0.6, [0.0, 0.0])
