"""CPU synchronised BatchNorm: 2 processes with batch b each == 1 process with batch 2b."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.syncbn import AllReduceBatchNorm, convert_allreduce_batchnorm
from tests.conftest import free_port


def _reference(x, weight, bias):
    bn = nn.BatchNorm2d(x.shape[1], momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    out = bn(x)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
    return out.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _worker(rank, world, port, x, weight, bias, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn = convert_allreduce_batchnorm(nn.BatchNorm2d(x.shape[1], momentum=0.3)).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    n = x.shape[0] // world
    full_out_shape = x.shape
    xs = x[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    out = bn(xs)
    coeff = torch.arange(x.numel(), dtype=x.dtype).view(full_out_shape).sin()
    (out * coeff[rank * n : (rank + 1) * n]).sum().backward()
    grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    for g in grads:
        dist.all_reduce(g)  # what DDP does (it then divides by world; the loss here is a sum)
    tensors = (out.detach(), xs.grad, *grads, bn.running_mean, bn.running_var)
    queue.put((rank, *(t.numpy().copy() for t in tensors)))  # by value: we exit right after
    dist.destroy_process_group()


@pytest.mark.numerics
def test_two_process_allreduce_bn_equals_one_process_bn():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4, 4, dtype=torch.float64) * 3 + 1.5
    weight, bias = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    ref = _reference(x, weight, bias)

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, 2, port, x, weight, bias, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    results = [(r[0], *(torch.from_numpy(a) for a in r[1:])) for r in results]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    out = torch.cat([r[1] for r in results])
    xgrad = torch.cat([r[2] for r in results])
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(xgrad, ref[1], rtol=0, atol=1e-12)
    for r in results:
        torch.testing.assert_close(r[3], ref[2], rtol=0, atol=1e-12)  # weight grad
        torch.testing.assert_close(r[4], ref[3], rtol=0, atol=1e-12)  # bias grad
        torch.testing.assert_close(r[5], ref[4], rtol=0, atol=1e-12)  # running mean
        torch.testing.assert_close(r[6], ref[5], rtol=0, atol=1e-12)  # running var (unbiased)


def test_conversion_keeps_state_and_type_family():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm1d(2))
    model[1].running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_allreduce_batchnorm(model)
    assert isinstance(converted[1], AllReduceBatchNorm) and isinstance(converted[1], _BatchNorm)
    assert converted.state_dict().keys() == before.keys()
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in before.items())
    # Without a process group (one process, eval) it is plain BatchNorm.
    x = torch.randn(2, 3, 6, 6)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ref.load_state_dict({k: v for k, v in before.items() if k.split(".")[0] in "01"})
    torch.testing.assert_close(converted[:2](x), ref(x), rtol=0, atol=0)  # the same ops
